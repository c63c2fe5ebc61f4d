"""The megatron-core engine (``engine: megatron``): Megatron's GPTModel, DDP, optimizer and schedules.

One optimizer step per :meth:`MegatronEngine.step`, the way Megatron-LM's ``train_step`` runs
it, on megatron-core 0.16.1:

- **Model**: ``megatron.core.models.gpt.GPTModel`` shaped by the cell's
  :class:`charllm.modelcat.ModelShape`: ``gpt3`` (LayerNorm, GELU, biases, learned positions),
  ``llama3`` (RMSNorm, gated SiLU MLP, GQA, RoPE base 500000, no biases), ``mixtral`` (as
  llama3, MLP replaced by megatron-core's MoE layer: ``num_experts`` SiLU-gated experts, top-k
  router with softmax after top-k and the load-balancing aux loss (coefficient 0.01, NeMo's
  Mixtral recipe), the all-to-all token dispatcher, ``moe_grouped_gemm=False``). Output
  weights untied, vocabulary padded as in the torch engine. Layer spec: Transformer Engine's
  where ``transformer_engine`` imports on a GPU, megatron-core's local spec otherwise, with
  SDPA core attention and sequence-parallel torch norms (:mod:`charllm.train.megatron_spec`).
- **Parallelism**: ``initialize_model_parallel(tp, pp, vp, ep)`` over the process group of
  :mod:`charllm.train.dist` (Megatron's rank order tp-cp-ep-dp-pp: tp innermost as in the
  torch engine). Sequence parallelism whenever tp > 1 (as the seed's NeMo configs). Pipeline
  parallelism through ``get_forward_backward_func()``: 1F1B, or interleaved 1F1B with
  ``parallel.pp_virtual`` model chunks per rank; the micro batches are the cell's gradient
  accumulation micro batches (``cell.grad_accum``); the loss is computed on the last stage and
  reported by its tp-rank-0 ranks (``reports_loss``), averaged over dp by
  :func:`charllm.train.dist.reduce_step_stats`. Expert parallelism (ep, carved out of dp):
  experts split over ep ranks, tokens exchanged by all-to-all.
- **Data parallelism**: Megatron's ``DistributedDataParallel`` (contiguous gradient buffers,
  gradients reduced in fp32 for bf16) and the **distributed optimizer**
  (``get_megatron_optimizer`` with ``use_distributed_optimizer=True``: gradients
  reduce-scattered, fp32 main parameters and Adam states sharded over dp, bf16 model
  parameters all-gathered). Adam(W) is torch's (no apex/TE here), fused on GPU; gradient
  clipping at 1.0 (Megatron's default).
- **bf16**: bf16 model parameters (``Float16Module``) with fp32 main parameters in the
  optimizer, no autocast. fp32 cells run fp32 throughout.
- **opt.overlap** (the seed's "cc" bit): ``overlap_grad_reduce`` and ``overlap_param_gather``
  in the DDP config (bucketed reduce-scatter during backward, parameter all-gather during the
  next forward), and ``tp_comm_overlap`` (TE userbuffers) where Transformer Engine imports
  and tp > 1. Without it nothing is overlapped. ``describe()`` records the exact settings.
  docs/optimisation-codes.md maps each bit of the code to these settings.
- **opt.recompute**: ``full`` -> ``recompute_granularity="full"``, method ``uniform``, 1 layer
  per group; ``selective`` -> ``recompute_granularity="selective"``,
  ``recompute_modules=["core_attn"]`` (megatron-core checkpoints the core-attention call, here
  the SDPA kernel: flash attention keeps no s x s scores, so this saves little and costs a
  second attention forward; recorded as such).
- **parallel.fsdp**: torch FSDP2 ``fully_shard`` over Megatron's data-parallel group around
  Megatron's (tensor-parallel) model: every ``TransformerLayer`` and the embedding are their
  own FSDP units, the root holds the rest; bf16 cells keep fp32 parameters and compute in bf16
  through FSDP2's ``MixedPrecisionPolicy`` (fp32 gradient reduce-scatter); megatron-core's
  FP32Optimizer steps the sharded fp32 parameters (FSDP2 already shards optimizer state, so
  no distributed optimizer). This is what megatron-core's ``TorchFullyShardedDataParallel``
  does, rewritten because that class builds a ``"cuda"`` DeviceMesh (so it cannot run on
  CPU); megatron-core's own Megatron-FSDP (``use_megatron_fsdp``) places its buffers on
  ``cuda:current_device`` and drives CUDA streams, so it cannot run on the CPU test ranks, and
  no multi-GPU machine was available to validate it. FSDP2 over gloo and NCCL is what the
  torch engine already runs (and this path ran on one H200: MFU 0.525 at GPT-3 1.3B). Gradients are
  reduce-scattered after each micro batch (as megatron-core's FSDP2 wrapper), so no
  unsharded gradient is kept across micro batches. Works with pipeline parallelism (1F1B and
  interleaved: the same losses as Megatron DDP on 4 CPU ranks).
- **Fusions** (GPU only, none needs apex or TE): ``bias_activation_fusion`` (GELU: Megatron's
  tanh-approximated bias-GELU; SwiGLU), ``bias_dropout_fusion``, ``cross_entropy_loss_fusion``
  (native), each a ``torch.compile``'d function. Not on CPU (inductor's C++ build takes tens
  of seconds per function there and needs a compiler on the node).

On CPU (gloo, tests and demos) megatron-core's CUDA placements, streams and RNG calls are
mapped to the CPU by :func:`charllm.train.megatron_cpu.cpu_shim`, entered around the engine's
own calls only when its device is the CPU; nothing is computed differently.

What :func:`check_layout` refuses, with :class:`EngineUnavailableError` (everywhere, CPU and
GPU alike): cp > 1 (context parallelism is not wired), opt.compile (tried on an H200: no
speed-up for GPT-3 1.3B, and the MoE dispatcher does not compile), ``opt.pp_schedule: gpipe``
with pp > 1 (megatron-core has only 1F1B schedules), ``pp_virtual > 1`` with pp = 1,
``n_layers`` not divisible by ``pp * pp_virtual``, ``seq_len`` or the padded vocabulary not
divisible by tp (sequence parallelism, vocabulary-parallel embedding), interleaving (``pp_virtual > 1``) with
micro batches per step not a multiple of pp, ep not dividing dp, and fsdp together with
ep > 1 (FSDP2 would shard each rank's own experts over the whole dp group and average
different experts' gradients; they would have to be sharded over the expert-data-parallel
group instead, which is not wired).
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from charllm.train.cell import CellSpec
from charllm.train.data import token_source
from charllm.train.dist import DistEnv, reduce_step_stats
from charllm.train.errors import EngineUnavailableError
from charllm.train.megatron_spec import block_spec, select_layer_spec, transformer_engine_importable
from charllm.train.model import is_gated, padded_vocab, uses_rope

ROPE_BASE = 500000  # as the torch engine (llama3, mixtral)
MOE_AUX_LOSS_COEFF = 0.01  # NeMo's Mixtral recipe
CLIP_GRAD = 1.0  # Megatron's default


def _import_megatron() -> Any:
    try:
        import megatron.core
    except ImportError as err:
        raise EngineUnavailableError(
            "engine 'megatron' needs megatron-core (pip install megatron-core==0.16.1, see requirements.lock) "
            "on the compute nodes; or set engine: torch"
        ) from err
    return megatron.core


def check_layout(cell: CellSpec, device: torch.device) -> None:
    """Raise :class:`EngineUnavailableError` for what this engine cannot run (the same on CPU and GPU)."""
    p, m = cell.parallel, cell.model
    refuse = []
    if p.cp > 1:
        refuse.append("context parallelism (cp > 1) is not wired (it needs Transformer Engine's attention)")
    if cell.opt.compile:
        # tried on one H200 (torch 2.11): compiling each TransformerLayer gave GPT-3 1.3B no gain
        # (MFU 0.550 either way: the layers graph-break at Megatron's autograd Functions) and the
        # MoE token dispatcher does not compile (Tensor.record_stream cannot be functionalised)
        refuse.append(
            "opt.compile is not supported (torch.compile of Megatron's layers gave no speed-up and fails on MoE layers)"
        )
    if p.pp > 1 and cell.opt.pp_schedule == "gpipe":
        refuse.append("opt.pp_schedule 'gpipe': megatron-core has only 1F1B schedules (use 1f1b)")
    if p.pp_virtual < 1:
        refuse.append(f"parallel.pp_virtual must be >= 1, got {p.pp_virtual}")
    elif p.pp_virtual > 1 and p.pp == 1:
        refuse.append("parallel.pp_virtual > 1 needs pp > 1 (interleaved 1F1B)")
    if p.pp_virtual >= 1 and m.n_layers % (p.pp * p.pp_virtual):
        refuse.append(
            f"model.n_layers {m.n_layers} is not divisible by pp * pp_virtual = {p.pp} * {p.pp_virtual} "
            "(megatron-core splits layers evenly over pipeline stages)"
        )
    if p.pp_virtual > 1 and p.pp > 1 and cell.global_batch % (cell.micro_batch * p.dp) == 0 and cell.grad_accum % p.pp:
        refuse.append(
            f"interleaved 1F1B needs the micro batches per step (global_batch / (micro_batch * dp) = "
            f"{cell.grad_accum}) to be a multiple of pp {p.pp} (megatron-core's schedule groups them by pp)"
        )
    if p.tp > 1 and cell.seq_len % p.tp:
        refuse.append(
            f"seq_len {cell.seq_len} is not divisible by tp {p.tp} (sequence parallelism, on with tp > 1, "
            "splits the sequence over the tensor-parallel ranks)"
        )
    if padded_vocab(m.vocab_size) % p.tp:
        refuse.append(
            f"the padded vocabulary {padded_vocab(m.vocab_size)} is not divisible by tp {p.tp} "
            "(megatron-core splits the embedding and output layer over tp)"
        )
    if p.ep > 1 and p.dp % p.ep:
        refuse.append(f"ep {p.ep} must divide dp {p.dp} (megatron-core carves expert parallelism out of dp)")
    if m.num_experts and m.family != "mixtral":
        # megatron-core's MoE with biased GELU experts failed in backward on CPU (an in-place
        # update of _ReduceFromModelParallelRegion's output); the catalog's MoE shapes are mixtral
        refuse.append(f"MoE models of family {m.family!r}: only the mixtral family (gated SiLU experts, no biases)")
    if p.fsdp and p.ep > 1:
        refuse.append("parallel.fsdp with ep > 1 is not supported (experts would be sharded over the wrong group)")
    if refuse:
        raise EngineUnavailableError("engine 'megatron' cannot run this cell: " + "; ".join(refuse))


def _fix_megatron_core() -> None:
    """megatron-core 0.16.1's MoE router reads ``moe_utils.te_general_gemm``, defined only when TE imports.

    Without TE every MoE forward raised ``NameError: name 'te_general_gemm' is not defined``
    (``RouterGatingLinearFunction``); ``None`` is the value its own check expects for "no TE".
    """
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # the MoE aux-loss logging tracker is module state sized by the first model's layer count;
    # a new engine in the same process (tests) starts it afresh
    moe_utils.get_moe_layer_wise_logging_tracker().clear()


class _Fsdp2Chunk:
    """Factory of the FSDP2 wrapper (a megatron ``_BaseDataParallel``), built lazily (megatron import)."""

    @staticmethod
    def wrap(config: Any, module: torch.nn.Module, dp_group: Any, device: torch.device, cell: CellSpec) -> Any:
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.distributed.data_parallel_base import _BaseDataParallel
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
        from megatron.core.transformer.transformer_layer import TransformerLayer
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        class Fsdp2Chunk(_BaseDataParallel):  # type: ignore[misc]
            def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
                pass  # FSDP2 reduce-scatters in backward

            def zero_grad_buffer(self) -> None:
                pass  # gradients are plain .grad, zeroed by the optimizer

        mesh = DeviceMesh.from_group(dp_group, device.type)
        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cell.opt.fsdp_reshard_after_forward}
        if cell.precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # FSDP2 replaces parameters by DTensors: keep Megatron's attributes (tensor_model_parallel,
        # partition_dim, sequence_parallel, ...) that finalize_model_grads and the optimizer read
        saved = {n: dict(vars(q)) for n, q in module.named_parameters()}
        for sub in module.modules():
            if isinstance(sub, (TransformerLayer, LanguageModelEmbedding)):
                fully_shard(sub, **kw)
        fully_shard(module, **kw)
        for n, q in module.named_parameters():
            for k, v in saved.get(n, {}).items():
                setattr(q, k, v)
        chunk = Fsdp2Chunk(config, module)
        chunk.ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False)
        return chunk


class MegatronEngine:
    """Builds Megatron's model chunks, DDP/FSDP, optimizer and schedule for one rank; runs optimizer steps."""

    def __init__(self, cell: CellSpec, denv: DistEnv, device: torch.device) -> None:
        _import_megatron()
        check_layout(cell, device)
        if not dist.is_initialized():
            raise EngineUnavailableError("engine 'megatron' needs torch.distributed initialised first")
        self.cell, self.denv, self.device = cell, denv, device
        self.on_gpu = device.type == "cuda"
        self.accum = cell.grad_accum
        if self.on_gpu:
            self._device_ctx: Callable[[], Any] = contextlib.nullcontext
        else:
            from charllm.train.megatron_cpu import cpu_shim

            self._device_ctx = cpu_shim
        with self._device_ctx():
            self._build()

    # ---- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        cell, p, device = self.cell, self.cell.parallel, self.device
        _fix_megatron_core()
        self.vp = p.pp_virtual
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=self.vp if self.vp > 1 else None,
            expert_model_parallel_size=p.ep,
        )
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        torch.manual_seed(cell.seed)
        model_parallel_cuda_manual_seed(cell.seed)

        self.bf16 = cell.precision == "bf16"
        self.te = transformer_engine_importable()
        self.config = self._transformer_config()
        self.layer_spec, self.spec_name = select_layer_spec(
            cell.model.num_experts, self.config.normalization, self.on_gpu, self.te
        )
        self.vocab = padded_vocab(cell.model.vocab_size)
        self.chunks = [self._gpt_model(v) for v in range(self.vp)]  # the bare GPTModels
        self.tp_comm_overlap = bool(self.config.tp_comm_overlap)
        if self.tp_comm_overlap:
            self._init_userbuffers()

        if p.fsdp:
            self.model = [_Fsdp2Chunk.wrap(self.config, c, self.dp_group, device, cell) for c in self.chunks]
            self.ddp_config: Any = None
            self.grad_sync = "fsdp2 (reduce-scatter per micro batch)"
        else:
            self.model = self._wrap_ddp()
        self.optimizer = self._megatron_optimizer()
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = finalize_model_grads
        if self.ddp_config is not None and self.ddp_config.overlap_grad_reduce:
            self.config.no_sync_func = self._per_chunk([c.no_sync for c in self.model])
            self.config.grad_sync_func = self._per_chunk([c.start_grad_sync for c in self.model])
        self.forward_backward = get_forward_backward_func()

        self.data = token_source(cell, self.dp_rank, device)
        self.position_ids = torch.arange(cell.seq_len, device=device).unsqueeze(0).expand(cell.micro_batch, -1)
        self.last_stage = self.pp_rank == p.pp - 1
        # the rank whose loss is reported for its dp shard: last pipeline stage, tp rank 0
        self.reports_loss = self.last_stage and self.tp_rank == 0
        self.n_params_local = sum(q.numel() for c in self.chunks for q in c.parameters())
        self.last_grad_norm: float | None = None

    def _transformer_config(self) -> Any:
        from megatron.core.transformer.transformer_config import TransformerConfig

        cell, p, shape = self.cell, self.cell.parallel, self.cell.model
        gated = is_gated(shape)
        dtype = torch.bfloat16 if self.bf16 and not p.fsdp else torch.float32
        kw: dict[str, Any] = {}
        if cell.opt.recompute:
            if cell.opt.recompute_granularity == "selective":
                kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
            elif cell.opt.recompute_layers:  # the first N layers of each (virtual) stage
                kw.update(
                    recompute_granularity="full",
                    recompute_method="block",
                    recompute_num_layers=cell.opt.recompute_layers,
                )
            else:
                kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if gated:
            kw.update(gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm")
        else:
            kw.update(activation_func=F.gelu, normalization="LayerNorm")
        if shape.num_experts:
            kw.update(
                num_moe_experts=shape.num_experts,
                moe_router_topk=shape.top_k,
                moe_ffn_hidden_size=shape.ffn_hidden,
                moe_token_dispatcher_type="alltoall",
                moe_grouped_gemm=False,
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=MOE_AUX_LOSS_COEFF,
            )
        fuse = self.on_gpu  # torch.compile'd fusions: slow C++ builds (and maybe no compiler) on CPU
        return TransformerConfig(
            num_layers=shape.n_layers,
            hidden_size=shape.hidden,
            num_attention_heads=shape.n_heads,
            num_query_groups=shape.kv_heads,
            ffn_hidden_size=shape.ffn_hidden,
            kv_channels=shape.head_dim,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=self.vp if self.vp > 1 else None,
            expert_model_parallel_size=p.ep,
            sequence_parallel=p.tp > 1,
            tp_comm_overlap=bool(cell.opt.overlap and p.tp > 1 and self.te and self.on_gpu),
            # interleaved 1F1B: Megatron-LM's defaults; its batched P2P would pair the two
            # directions of a 2-stage ring wrongly (the even/odd split keeps them apart)
            overlap_p2p_comm=self.vp > 1,
            batch_p2p_comm=self.vp == 1,
            # Megatron-LM's default on GPU (NCCL keeps a sent activation's memory alive for its
            # stream); gloo's asynchronous send would read a freed tensor, so not on CPU
            deallocate_pipeline_outputs=self.on_gpu,
            add_bias_linear=not gated,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            layernorm_epsilon=1e-5,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            pipeline_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            use_cpu_initialization=not self.on_gpu,
            masked_softmax_fusion=False,
            bias_activation_fusion=fuse,
            bias_dropout_fusion=fuse,
            cross_entropy_loss_fusion=fuse,
            cross_entropy_fusion_impl="native",
            apply_rope_fusion=False,  # needs Transformer Engine or apex
            gradient_accumulation_fusion=False,  # needs apex's/TE's fused_weight_gradient_mlp_cuda
            persist_layer_norm=False,
            **kw,
        )

    def _gpt_model(self, vp_stage: int) -> Any:
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt.gpt_model import GPTModel

        vps = vp_stage if self.vp > 1 else None
        model = GPTModel(
            config=self.config,
            transformer_layer_spec=block_spec(self.layer_spec, self.spec_name, self.config, vps),
            vocab_size=self.vocab,
            max_sequence_length=self.cell.seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vps),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vps),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope" if uses_rope(self.cell.model) else "learned_absolute",
            rotary_base=ROPE_BASE,
            vp_stage=vps,
        )
        model.to(self.device)
        return model

    def _init_userbuffers(self) -> None:  # pragma: no cover - needs Transformer Engine on GPUs
        """TE's userbuffers for tensor-parallel communication overlap (Megatron-LM's ``_initialize_tp_communicators``)."""
        from transformer_engine.pytorch import module as te_module

        c = self.cell
        te_module.base.initialize_ub(
            shape=[c.seq_len * c.micro_batch, c.model.hidden], tp_size=c.parallel.tp, use_fp8=False
        )

    def _wrap_ddp(self) -> list[Any]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        overlap = self.cell.opt.overlap
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.bf16,
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap,
            use_distributed_optimizer=True,
        )
        wrapped = []
        for i, c in enumerate(self.chunks):
            module = Float16Module(self.config, c) if self.bf16 else c
            # as Megatron-LM: bucketing only for the first chunk (interleaved pipelines)
            wrapped.append(DistributedDataParallel(self.config, self.ddp_config, module, disable_bucketing=i > 0))
        dp = self.cell.parallel.dp
        self.grad_sync = (
            "megatron-ddp reduce-scatter (distributed optimizer)"
            + (", overlapped with backward" if overlap else ", after backward")
            if dp > 1
            else "megatron-ddp (dp 1: no reduction)"
        )
        return wrapped

    def _megatron_optimizer(self) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        fsdp = self.cell.parallel.fsdp
        cfg = OptimizerConfig(
            optimizer="adam",
            lr=self.cell.opt.lr,
            weight_decay=self.cell.opt.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=CLIP_GRAD,
            bf16=self.bf16 and not fsdp,
            params_dtype=torch.bfloat16 if self.bf16 and not fsdp else torch.float32,
            use_distributed_optimizer=not fsdp,
        )
        opt = get_megatron_optimizer(cfg, self.model)
        # MoE: one optimizer for the dense and one for the expert parameters, chained
        parts = list(getattr(opt, "chained_optimizers", [opt]))
        self.optimizer_impl = "foreach"
        if self.on_gpu:  # torch's fused AdamW kernel over the (sharded) fp32 main parameters
            for part in parts:
                if part.optimizer is not None:
                    for group in part.optimizer.param_groups:
                        group["fused"], group["foreach"] = True, False
            self.optimizer_impl = "fused"
        names = " + ".join(type(part).__name__ for part in parts)
        self.optimizer_desc = f"megatron {names} over torch AdamW ({self.optimizer_impl}), clip_grad {CLIP_GRAD}"
        return opt

    @staticmethod
    def _per_chunk(funcs: list[Any]) -> Any:
        return funcs[0] if len(funcs) == 1 else funcs

    # ---- one optimizer step -------------------------------------------------------------
    def _micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for m in range(self.accum):
            yield self.data.micro_batch(step * self.accum + m)

    def _forward_step(self, data_iterator: Iterator[Any], model: Any) -> tuple[torch.Tensor, Any]:
        x, y = next(data_iterator)
        return model(x, self.position_ids, None, labels=y), self._loss

    @staticmethod
    def _loss(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    def step(self, step: int) -> torch.Tensor:
        """Run one optimizer step; returns this rank's mean micro-batch loss (0 where no loss is computed)."""
        with self._device_ctx():
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            iters = [self._micro_batches(step) for _ in self.model]
            losses = self.forward_backward(
                forward_step_func=self._forward_step,
                data_iterator=self._per_chunk(iters),
                model=self._per_chunk(self.model),
                num_microbatches=self.accum,
                seq_length=self.cell.seq_len,
                micro_batch_size=self.cell.micro_batch,
                forward_only=False,
            )
            _, grad_norm, _ = self.optimizer.step()
        self.last_grad_norm = grad_norm
        if losses:
            return torch.stack([d["loss"] for d in losses]).mean()
        return torch.zeros((), device=self.device)

    # ---- per-step bookkeeping shared by all ranks ----------------------------------------
    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def reduce_step_stats(
        self, loss: torch.Tensor, step_time_s: float, temp_slope: float
    ) -> tuple[float, float, float]:
        """See :func:`charllm.train.dist.reduce_step_stats`."""
        return reduce_step_stats(loss, step_time_s, temp_slope, self.reports_loss, self.device)

    def describe(self) -> dict[str, Any]:
        import megatron.core

        c, p = self.cell, self.cell.parallel
        cfg = self.config
        ddp = None
        if self.ddp_config is not None:
            d = self.ddp_config
            ddp = {
                "use_distributed_optimizer": d.use_distributed_optimizer,
                "overlap_grad_reduce": d.overlap_grad_reduce,
                "overlap_param_gather": d.overlap_param_gather,
                "grad_reduce_in_fp32": d.grad_reduce_in_fp32,
                "bucket_size": d.bucket_size,
            }
        if p.pp == 1:
            schedule = None
        elif self.vp > 1:
            schedule = f"interleaved 1F1B (megatron-core, {self.vp} virtual stages)"
        else:
            schedule = "1F1B (megatron-core)"
        recompute = "none"
        if cfg.recompute_granularity == "full" and cfg.recompute_method == "block":
            recompute = f"full (block, first {cfg.recompute_num_layers} layers per stage)"
        elif cfg.recompute_granularity == "full":
            recompute = "full (uniform, 1 layer per group)"
        elif cfg.recompute_granularity == "selective":
            recompute = f"selective ({', '.join(cfg.recompute_modules)})"
        return {
            "engine": "megatron",
            "megatron_core": str(getattr(megatron.core, "__version__", "?")),
            "model": f"megatron.core GPTModel, {self.spec_name} layer spec",
            "layer_spec": self.spec_name,
            "transformer_engine": self.te,
            "core_attention": (
                "charllm SdpaCoreAttention (F.scaled_dot_product_attention)"
                if self.spec_name == "local"
                else "TEDotProductAttention"
            ),
            "mesh": {"pp": p.pp, "dp": p.dp, "tp": p.tp, "ep": p.ep, "vp": self.vp},
            "coords": {"pp": self.pp_rank, "dp": self.dp_rank, "tp": self.tp_rank, "ep": self.ep_rank},
            "sequence_parallel": bool(cfg.sequence_parallel),
            "grad_sync": self.grad_sync,
            "grad_accum": self.accum,
            "pp_schedule": schedule,
            "ddp": ddp,
            "fsdp": "torch FSDP2 fully_shard over megatron's dp group" if p.fsdp else None,
            "tp_comm_overlap": self.tp_comm_overlap,
            "overlap": {
                "requested": c.opt.overlap,
                "grad_reduce": bool(ddp and ddp["overlap_grad_reduce"]),
                "param_gather": bool(ddp and ddp["overlap_param_gather"]),
                "tp_comm": self.tp_comm_overlap,
                "p2p": bool(cfg.overlap_p2p_comm),
            },
            "optimizer": self.optimizer_desc,
            "params": (
                "fp32 (FSDP2 bf16 compute)"
                if p.fsdp and self.bf16
                else ("bf16, fp32 main params" if self.bf16 else "fp32")
            ),
            "autocast": None,
            "compile": False,
            "fusions": {
                "bias_activation": bool(cfg.bias_activation_fusion),
                "bias_dropout": bool(cfg.bias_dropout_fusion),
                "cross_entropy": bool(cfg.cross_entropy_loss_fusion),
                "gradient_accumulation": bool(cfg.gradient_accumulation_fusion),
                "rope": bool(cfg.apply_rope_fusion),
            },
            "recompute": recompute,
            "moe": (
                {
                    "experts": c.model.num_experts,
                    "top_k": c.model.top_k,
                    "dispatcher": cfg.moe_token_dispatcher_type,
                    "aux_loss_coeff": cfg.moe_aux_loss_coeff,
                    "grouped_gemm": bool(cfg.moe_grouped_gemm),
                }
                if c.model.num_experts
                else None
            ),
            "cpu_shim": not self.on_gpu,
            "params_local": self.n_params_local,
        }

    @property
    def profiles(self) -> bool:
        """One rank per pipeline stage writes a kernel breakdown: dp rank 0, tp rank 0."""
        return self.dp_rank == 0 and self.tp_rank == 0

    # ---- tests: the same weights whatever the layout --------------------------------------
    def reinit_layout_invariant(self, seed: int, std: float = 0.02) -> None:
        """Redraw every matrix from a generator keyed by its layout-independent name.

        For comparing layouts that compute the same function (pp 2 against pp 1, ep 2 against
        ep 1): a parameter is named by its global layer number and global expert index, so a
        layer or expert gets the same weights whichever rank builds it. Needs tp = 1 (tensor
        shards would need slicing) and no FSDP; norms and biases keep Megatron's init (ones,
        zeros), which does not depend on the layout. Reloads the optimizer's main parameters.
        """
        from megatron.core import parallel_state as ps

        if self.cell.parallel.tp != 1 or self.cell.parallel.fsdp:
            raise EngineUnavailableError("reinit_layout_invariant needs tp = 1 and no fsdp")
        ep_rank = ps.get_expert_model_parallel_rank()
        with self._device_ctx(), torch.no_grad():
            for chunk in self.chunks:
                for name, q in chunk.named_parameters():
                    if q.ndim < 2:
                        continue
                    canon = name
                    mm = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
                    if mm:
                        layer = chunk.decoder.layers[int(mm.group(1))]
                        canon = f"decoder.layers.{layer.layer_number - 1}.{mm.group(2)}"
                        me = re.match(r"(.*local_experts\.)(\d+)(\..*)", canon)
                        if me:
                            n_local = len(layer.mlp.experts.local_experts)
                            canon = f"{me.group(1)}{ep_rank * n_local + int(me.group(2))}{me.group(3)}"
                    gen = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(canon.encode()))
                    q.copy_(torch.randn(q.shape, generator=gen).mul_(std).to(q.device, q.dtype))
            self.optimizer.reload_model_params()


def build(cell: CellSpec, denv: DistEnv, device: torch.device) -> MegatronEngine:
    return MegatronEngine(cell, denv, device)
