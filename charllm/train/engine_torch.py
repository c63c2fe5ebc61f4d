"""The PyTorch-native engine: one optimizer step per :meth:`TorchEngine.step`.

Layout. Ranks form a (pp, dp, cp, tp) device mesh, tp innermost (tensor parallelism within a
node), pp outermost. The model is built on the meta device, parallelised, then materialised
with ``to_empty`` and initialised, so no rank ever holds more than its shard:

- TP: ``parallelize_module`` per block, Q/K/V and MLP-in colwise, attention-out and
  MLP-out rowwise (Megatron's split). Embeddings, norms and the output layer are replicated.
- FSDP (``parallel.fsdp``): FSDP2 ``fully_shard`` per block and on the root over the dp
  dimension (2-D with TP); bf16 parameters for compute, fp32 gradient reduction.
- DDP (dp > 1, no fsdp, tp = pp = 1, ``opt.overlap``): ``DistributedDataParallel``, whose
  bucketed all-reduce overlaps backward. Without ``opt.overlap`` (PPT's base code 00000,
  Megatron's default) and with TP/PP, gradients are all-reduced over dp after backward in
  flat buckets, not overlapped.
- PP: ``torch.distributed.pipelining`` with a ``PipelineStage`` per rank and a GPipe or
  1F1B schedule whose micro batches are the cell's gradient-accumulation micro batches; with
  ``parallel.pp_virtual`` = v > 1, v stages per rank (rank r holds stages r, r + pp, ...) under
  ``ScheduleInterleaved1F1B``.
- One GPU in bf16 (``opt.bf16_params``, on by default on CUDA): FSDP2 on the one-rank mesh,
  which holds bf16 compute copies of the fp32 weights, gathered once per optimizer step.
- CP (``parallel.cp``, with dp/fsdp/zero only): ring attention over the cp group with a
  load-balanced causal split (:mod:`charllm.train.context_parallel`); gradients are synchronised
  over the flattened dp x cp group.
- ZeRO (``opt.zero``): 1 = DDP + ``ZeroRedundancyOptimizer`` (optimizer state sharded over
  dp); 2 = FSDP2 keeping parameters gathered through the step; 3 = FSDP2 (as ``fsdp``);
  ``opt.cpu_offload``: FSDP2 ``CPUOffloadPolicy`` (parameters, gradients and the AdamW step on the host).
- ``opt.recompute``: ``full`` (``torch.utils.checkpoint`` per block), ``selective`` (the SDPA
  call) or ``kwai`` (norms + MLP activation), for every block or the first
  ``opt.recompute_layers`` of the stage (:mod:`charllm.train.recompute`).
- ``opt.offload_alpha``: activation offload to pinned host memory (:mod:`charllm.train.offload`);
  per step counters in :meth:`TorchEngine.extra_metrics`.
- ``opt.compile``: ``torch.compile`` of each block in place (one graph, reused by all blocks).

Gradient accumulation: ``global_batch / (micro_batch * dp)`` micro batches per step; gradient
sync only after the last. bf16 runs under autocast with fp32 master weights; AdamW is fused
on GPU. Expert parallelism is not implemented here (clear error).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from charllm.capabilities import torch_recompute_words
from charllm.train.cell import CellSpec
from charllm.train.data import token_source
from charllm.train.dist import DistEnv, reduce_step_stats
from charllm.train.errors import EngineUnavailableError
from charllm.train.model import Transformer, is_gated, loss_fn, split_layers


def tp_plan(model: Transformer) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    shape = model.shape
    plan: dict[str, Any] = {
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(),
    }
    if shape.num_experts:
        for e in range(shape.num_experts):
            plan[f"ff.experts.{e}.w1"] = ColwiseParallel()
            plan[f"ff.experts.{e}.w3"] = ColwiseParallel()
            plan[f"ff.experts.{e}.w2"] = RowwiseParallel()
    elif is_gated(shape):
        plan.update({"ff.w1": ColwiseParallel(), "ff.w3": ColwiseParallel(), "ff.w2": RowwiseParallel()})
    else:
        plan.update({"ff.fc1": ColwiseParallel(), "ff.fc2": RowwiseParallel()})
    return plan


def allreduce_grads(params: list[nn.Parameter], group: Any, group_size: int, bucket_bytes: int = 64 << 20) -> None:
    """Average gradients over ``group`` in flat buckets (after backward, not overlapped)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        grads.append(g.to_local() if hasattr(g, "to_local") else g)  # DTensor: this rank's shard
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for g in tensors:
            if size >= bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel() * g.element_size()
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.div_(group_size)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                dst.copy_(src)


def select_attention_backend(name: str, device: torch.device) -> str:
    """Enable only the named SDPA backend on a CUDA device; returns what the job will use.

    Global flags, not a context manager: ``torch.compile`` picks the backend when it traces,
    and pipeline or recompute code paths call attention outside any one context.
    """
    if device.type != "cuda":
        return "auto (cpu)"
    if name == "auto":
        return "auto"
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(name == "flash")
    cuda.enable_cudnn_sdp(name == "cudnn")
    cuda.enable_mem_efficient_sdp(name == "efficient")
    cuda.enable_math_sdp(name == "math")
    return name


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class TorchEngine:
    """Builds the model, optimizer and data of one rank and runs optimizer steps."""

    def __init__(self, cell: CellSpec, denv: DistEnv, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        p = cell.parallel
        if p.cp > 1 and (p.tp > 1 or p.pp > 1):
            raise EngineUnavailableError("context parallelism runs with dp/fsdp/zero only in the torch engine")
        if p.ep > 1:
            raise EngineUnavailableError(
                "expert parallelism (ep > 1) is not implemented in the torch engine: "
                "experts are replicated across dp ranks (use ep = 1)"
            )
        if cell.dataset.kind not in ("synthetic", "indexed"):
            raise EngineUnavailableError(f"dataset kind {cell.dataset.kind!r} is not supported")
        self.cell, self.denv, self.device = cell, denv, device
        self.accum = cell.grad_accum
        self.mesh = init_device_mesh(device.type, (p.pp, p.dp, p.cp, p.tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
        self.pp_rank = self.mesh.get_local_rank("pp")
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.cp_rank = self.mesh.get_local_rank("cp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        # gradients are averaged over dp x cp (cp ranks hold the same weights, other tokens)
        self.sync_mesh = self.mesh["dp", "cp"]._flatten("dp_cp") if p.cp > 1 else self.mesh["dp"]
        self.sync_size = p.dp * p.cp
        self.first = self.pp_rank == 0
        self.last = self.pp_rank == p.pp - 1
        autocast = torch.bfloat16 if cell.precision == "bf16" else None
        self.attn_backend = select_attention_backend(cell.opt.attn_backend, device)
        # virtual stages (interleaved 1F1B): pipeline rank r holds stages r, r + pp, r + 2 pp, ...
        vp = p.pp_virtual
        self.n_stages = p.pp * vp
        self.stage_ids = [self.pp_rank + k * p.pp for k in range(vp)]
        ranges = split_layers(cell.model.n_layers, self.n_stages, p.pp_partition if vp == 1 else "")
        chunks: list[Transformer] = []
        for sid in self.stage_ids:
            with torch.device("meta"):
                chunks.append(
                    Transformer(
                        cell.model,
                        cell.seq_len,
                        ranges[sid],
                        first=sid == 0,
                        last=sid == self.n_stages - 1,
                        recompute=cell.opt.recompute_granularity if cell.opt.recompute else "none",
                        autocast_dtype=autocast,
                        recompute_layers=cell.opt.recompute_layers,
                    )
                )
        model = chunks[0]
        blocks = [block for chunk in chunks for block in chunk.layers.values()]
        if p.tp > 1:
            from torch.distributed.tensor.parallel import parallelize_module

            plan = tp_plan(model)
            for block in blocks:
                parallelize_module(block, self.mesh["tp"], plan)
        self.loss_fn: Any = loss_fn
        if cell.opt.compile:
            for block in blocks:
                block.compile(mode=cell.opt.compile_mode)
            if cell.opt.compile_loss and self.last:
                # fuses the float32 upcast of the logits with log-softmax and its backward
                self.loss_fn = torch.compile(loss_fn)
        zero = cell.opt.zero
        self.zero = zero
        # ZeRO-2/3 are FSDP2 over dp (2: parameters kept gathered through the step)
        sharded = p.fsdp or zero in (2, 3)
        # one GPU, bf16: FSDP2 over the one-rank dp mesh is mixed precision with bf16 weights
        self.bf16_params = (
            cell.opt.bf16_params != "off"
            and autocast is not None
            and not sharded
            and zero == 0
            and p.world_size == 1
            and (device.type == "cuda" or cell.opt.bf16_params == "on")
        )
        # FSDP2 keeps parameters gathered through the step's micro batches (ZeRO-2-like)
        self.keep_gathered = not cell.opt.fsdp_reshard_after_forward or self.bf16_params or zero == 2
        self.cpu_offload = cell.opt.cpu_offload
        if sharded or self.bf16_params:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

            # cast_forward_inputs off: the RoPE table a block gets stays float32, in forward and in a
            # checkpoint's recompute alike (FSDP2 casts inputs in forward only); activations are bf16 anyway
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
                if autocast
                else None
            )
            kw: dict[str, Any] = {"mesh": self.sync_mesh}
            if mp is not None:
                kw["mp_policy"] = mp
            if self.cpu_offload:
                kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
            # with pipelining, or when asked, keep params gathered across micro batches
            reshard = p.pp == 1 and not self.keep_gathered
            for block in blocks:
                fully_shard(block, reshard_after_forward=reshard, **kw)
            for chunk in chunks:
                fully_shard(chunk, reshard_after_forward=reshard, **kw)
        for chunk in chunks:
            # CPU offload: FSDP2 keeps the sharded parameters (and the optimizer step) on the host
            chunk.to_empty(device="cpu" if self.cpu_offload else device)
            chunk.init_weights(cell.seed)
            if self.cpu_offload:
                for mod in chunk.modules():
                    for name, buf in list(mod._buffers.items()):
                        if buf is not None:
                            mod._buffers[name] = buf.to(device)
            chunk.train()
        self.chunks = chunks
        if p.cp > 1:
            from charllm.train.context_parallel import local_positions

            model.positions = local_positions(cell.seq_len, p.cp, self.cp_rank, device)
            ring = (self.mesh["cp"].get_group(), p.cp, self.cp_rank)
            for block in model.layers.values():
                cast(Any, block).attn.cp = ring
        self.offloader: Any = None
        if cell.opt.offload_alpha > 0:
            from charllm.train.offload import Offloader

            self.offloader = Offloader(cell.opt.offload_alpha, device)
            for chunk in chunks:  # one offloader per rank: each chunk's forward is its own group
                self.offloader.register_buffers(chunk)
                chunk.offloader = self.offloader
        self.offload_steps: list[tuple[int, int]] = []
        self.model: nn.Module = model
        self.stage_model = model

        self.grad_sync = "none"
        if sharded or self.bf16_params:
            self.grad_sync = "fsdp2"
        elif zero == 1 or (self.sync_size > 1 and p.tp == 1 and p.pp == 1 and cell.opt.overlap):
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                process_group=self.sync_mesh.get_group(),
                gradient_as_bucket_view=True,
                bucket_cap_mb=cell.opt.ddp_bucket_mb,
            )
            self.grad_sync = "ddp-overlapped"
        elif self.sync_size > 1:
            self.grad_sync = "allreduce-after-backward"

        params = [q for chunk in chunks for q in chunk.parameters() if q.requires_grad]
        self.params = params
        # Fused/foreach AdamW steps each group in one call, which must not mix DTensor (TP
        # shards) with plain tensors (replicated norms, embeddings): one group per kind.
        groups = []
        for is_dt in (False, True):
            for decay in (True, False):
                ps = [q for q in params if _is_dtensor(q) == is_dt and (q.ndim >= 2) == decay]
                if ps:
                    groups.append({"params": ps, "weight_decay": cell.opt.weight_decay if decay else 0.0})
        fused = device.type == "cuda" and not self.cpu_offload
        adam: dict[str, Any] = {"lr": cell.opt.lr, "betas": (0.9, 0.95), "eps": 1e-8, "fused": fused}
        self.optimizer: Any
        if zero == 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            # ZeRO-1: each dp rank keeps and steps the AdamW state of its share of the parameters
            self.optimizer = ZeroRedundancyOptimizer(
                groups[0]["params"],
                optimizer_class=torch.optim.AdamW,
                process_group=self.sync_mesh.get_group(),
                weight_decay=groups[0]["weight_decay"],
                **adam,
            )
            for grp in groups[1:]:
                self.optimizer.add_param_group(grp)
        else:
            self.optimizer = torch.optim.AdamW(groups, **adam)
        self.optimizer_impl = ("fused" if fused else "foreach") + (", ZeroRedundancyOptimizer" if zero == 1 else "")

        self.data = token_source(cell, self.dp_rank, device)
        self.schedule: Any = None
        if p.pp > 1:
            from torch.distributed.pipelining import (
                PipelineStage,
                Schedule1F1B,
                ScheduleGPipe,
                ScheduleInterleaved1F1B,
            )

            group = self.mesh["pp"].get_group()
            stages: list[Any] = [
                PipelineStage(chunk, sid, self.n_stages, device, group=group)
                for chunk, sid in zip(chunks, self.stage_ids, strict=True)
            ]
            if vp > 1:
                self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=self.accum, loss_fn=self.loss_fn)
            else:
                cls = ScheduleGPipe if cell.opt.pp_schedule == "gpipe" else Schedule1F1B
                self.schedule = cls(stages[0], n_microbatches=self.accum, loss_fn=self.loss_fn)
        # the rank whose loss is reported for its dp shard: last pipeline stage, tp rank 0
        self.reports_loss = self.last and self.tp_rank == 0
        self.n_params_local = sum(q.numel() for q in params)

    # ---- one optimizer step -------------------------------------------------------------
    def step(self, step: int) -> torch.Tensor:
        """Run one optimizer step; returns this rank's mean micro-batch loss (0 if not a reporter)."""
        loss = self._step_pipelined(step) if self.schedule is not None else self._step_flat(step)
        if self.grad_sync == "allreduce-after-backward":
            allreduce_grads(self.params, self.sync_mesh.get_group(), self.sync_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.offloader is not None:
            self.offload_steps.append(self.offloader.take_counters())
        return loss

    def _step_flat(self, step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for m in range(self.accum):
            last = m == self.accum - 1
            x, y = self.data.micro_batch(step * self.accum + m)
            if self.cell.parallel.cp > 1:
                from charllm.train.context_parallel import split_batch

                x = split_batch(x, self.cell.parallel.cp, self.cp_rank)
                y = split_batch(y, self.cell.parallel.cp, self.cp_rank)
            ctx: Any = contextlib.nullcontext()
            if self.grad_sync == "ddp-overlapped" and not last:
                ctx = self.model.no_sync()  # type: ignore[operator]
            if self.grad_sync == "fsdp2":
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
                if self.keep_gathered:
                    self.model.set_reshard_after_backward(last)  # type: ignore[operator]
            with ctx:
                loss = self.loss_fn(self.model(x), y) / self.accum
                loss.backward()
            total += loss.detach()
        return total

    def _step_pipelined(self, step: int) -> torch.Tensor:
        x, y = self.data.batch(step, self.accum)
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        if self.last and losses:
            return torch.stack([t.detach().float() for t in losses]).mean()
        return torch.zeros((), device=self.device)

    # ---- per-step bookkeeping shared by all ranks ----------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reduce_step_stats(
        self, loss: torch.Tensor, step_time_s: float, temp_slope: float
    ) -> tuple[float, float, float]:
        """See :func:`charllm.train.dist.reduce_step_stats`."""
        return reduce_step_stats(loss, step_time_s, temp_slope, self.reports_loss, self.device)

    def describe(self) -> dict[str, Any]:
        p = self.cell.parallel
        return {
            "engine": "torch",
            "mesh": {"pp": p.pp, "dp": p.dp, "cp": p.cp, "tp": p.tp, "vp": p.pp_virtual},
            "coords": {"pp": self.pp_rank, "dp": self.dp_rank, "cp": self.cp_rank, "tp": self.tp_rank},
            "grad_sync": self.grad_sync,
            "grad_accum": self.accum,
            "pp_schedule": type(self.schedule).__name__ if self.schedule is not None else None,
            "optimizer": f"AdamW ({self.optimizer_impl})",
            "autocast": self.cell.precision if self.device.type == "cuda" or self.cell.precision == "bf16" else None,
            "compile": (
                f"blocks ({self.cell.opt.compile_mode})" + (" + loss" if self.cell.opt.compile_loss else "")
                if self.cell.opt.compile
                else False
            ),
            "recompute": torch_recompute_words(
                self.cell.opt.recompute_granularity if self.cell.opt.recompute else "none",
                self.cell.opt.recompute_layers,
            ),
            "zero": self.zero,
            "cpu_offload": self.cpu_offload,
            "offload_alpha": self.cell.opt.offload_alpha,
            "attention": f"sdpa {self.attn_backend}",
            "params": "bf16 compute copies via FSDP2 (1 rank), fp32 master" if self.bf16_params else "fp32 (autocast)",
            "params_local": self.n_params_local,
        }

    def extra_metrics(self) -> dict[str, float]:
        """Offload counters of this rank: bytes to host per step (mean over steps after the first two,
        whose pools are still filling), bytes back per step, and the pinned host pool's size."""
        if self.offloader is None:
            return {}
        steps = self.offload_steps[2:] or self.offload_steps
        n = max(1, len(steps))
        return {
            "offload_bytes_per_step": sum(o for o, _ in steps) / n,
            "offload_fetch_bytes_per_step": sum(i for _, i in steps) / n,
            "offload_host_pinned_bytes": float(self.offloader.pinned_bytes),
        }

    @property
    def profiles(self) -> bool:
        """One rank per pipeline stage writes a kernel breakdown: dp rank 0, tp rank 0."""
        return self.dp_rank == 0 and self.tp_rank == 0
