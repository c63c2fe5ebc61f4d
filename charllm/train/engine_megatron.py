"""The megatron-core engine (``engine: megatron``): Megatron's GPTModel, one optimizer step per :meth:`step`.

The model is ``megatron.core.models.gpt.GPTModel`` with the local layer spec
(``get_gpt_layer_local_spec``: Megatron-Core modules only, no Transformer Engine), shaped by
the cell's :class:`charllm.modelcat.ModelShape`: ``gpt3`` (LayerNorm, GELU, biases, learned
positions), ``llama3`` (RMSNorm, gated SiLU MLP, GQA, RoPE with base 500000, no biases).
Output weights are untied and the vocabulary is padded as in the torch engine.
``megatron.core.parallel_state.initialize_model_parallel(tp, pp)`` runs on the process group
that :mod:`charllm.train.dist` started.

What runs, and what is refused with :class:`EngineUnavailableError`:

- CPU (gloo, fp32, ``use_cpu_initialization``): gpt3-family models, pp = 1, any tp (Megatron's
  column/row-parallel layers and vocab-parallel cross entropy over gloo) and any dp (gradients
  averaged over Megatron's data-parallel group after backward, not overlapped). Megatron's local
  ``DotProductAttention`` allocates its score buffer on CUDA and forks the CUDA RNG for
  dropout, and on GPU it materialises the s x s scores (out of memory at GPT-3 1.3B, mb 8, on
  an H200), so the core attention is :class:`SdpaCoreAttention` everywhere (a subclass that calls
  ``F.scaled_dot_product_attention``, causal, no dropout); ``describe()`` says so.
  Refused on CPU: ``opt.recompute`` (Megatron's activation checkpointing saves and restores
  the CUDA RNG state) and RoPE families, llama3 (Megatron's RotaryEmbedding moves its
  frequencies to CUDA).
- GPU: tp, dp and recompute (granularity "full", method "uniform") are passed to Megatron;
  bf16 runs with fp32 parameters under bf16 autocast (plain AdamW, not Megatron's
  distributed optimizer), each layer entering autocast itself so that recompute replays in
  bf16. On one H200 (GPT-3 1.3B, mb 8, gb 32): MFU 0.395, with full recompute 0.298 (HFU
  0.397); the torch engine eager 0.516, compiled 0.590-0.601 (docs/gpu/README.md).
- Everywhere: pp > 1, cp > 1, ep > 1, MoE models, FSDP and opt.compile are refused.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from charllm.train.cell import CellSpec
from charllm.train.data import token_source
from charllm.train.dist import DistEnv, reduce_step_stats
from charllm.train.errors import EngineUnavailableError
from charllm.train.model import is_gated, padded_vocab, uses_rope

ROPE_BASE = 500000  # as the torch engine (llama3)


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
    """Raise :class:`EngineUnavailableError` for what this engine cannot run on ``device``."""
    p, on_cpu = cell.parallel, device.type != "cuda"
    refuse = []
    if p.pp > 1:
        refuse.append("pipeline parallelism (pp > 1) is not wired to Megatron's pipeline schedules yet")
    if p.cp > 1:
        refuse.append("context parallelism (cp > 1) is not supported")
    if p.ep > 1 or cell.model.num_experts:
        refuse.append("MoE models / expert parallelism are not supported")
    if cell.opt.compile:
        refuse.append("opt.compile is not supported (torch.compile of Megatron's layers is not wired)")
    if p.fsdp:
        refuse.append("parallel.fsdp is not supported (Megatron's FSDP is not wired)")
    if on_cpu and uses_rope(cell.model):
        refuse.append(
            f"model family {cell.model.family!r} (RoPE) on CPU: megatron-core's RotaryEmbedding moves its "
            "frequencies to CUDA; on CPU use a gpt3-family model (learned positions)"
        )
    if on_cpu and cell.opt.recompute:
        refuse.append(
            "opt.recompute on CPU: megatron-core's activation checkpointing saves the CUDA RNG state; run it on GPUs"
        )
    if refuse:
        raise EngineUnavailableError("engine 'megatron' cannot run this cell: " + "; ".join(refuse))


def sdpa_core_attention_class() -> type:
    """A ``DotProductAttention`` whose forward is ``F.scaled_dot_product_attention`` (CPU-safe)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SdpaCoreAttention(DotProductAttention):  # type: ignore[misc]
        def forward(  # type: ignore[override]
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type: Any = None,
            attention_bias: Any = None,
            packed_seq_params: Any = None,
        ) -> torch.Tensor:
            if packed_seq_params is not None or attention_bias is not None:
                raise EngineUnavailableError("SdpaCoreAttention supports neither packed sequences nor attention bias")
            # [s, b, heads, hd] -> [b, heads, s, hd]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            s, b = out.shape[2], out.shape[0]
            return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    return SdpaCoreAttention


def _under_autocast(fn: Any, device_type: str, dtype: torch.dtype) -> Any:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)

    return run


class MegatronEngine:
    """Builds Megatron's GPTModel, a torch AdamW and the data of one rank; runs optimizer steps."""

    def __init__(self, cell: CellSpec, denv: DistEnv, device: torch.device) -> None:
        _import_megatron()
        check_layout(cell, device)
        if not dist.is_initialized():
            raise EngineUnavailableError("engine 'megatron' needs torch.distributed initialised first")
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.transformer.transformer_config import TransformerConfig

        p, shape = cell.parallel, cell.model
        self.cell, self.denv, self.device = cell, denv, device
        self.on_gpu = device.type == "cuda"
        self.accum = cell.grad_accum
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp, create_gloo_process_groups=False
        )
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        if self.on_gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(cell.seed)
        torch.manual_seed(cell.seed)

        gated = is_gated(shape)
        self.autocast = torch.bfloat16 if cell.precision == "bf16" else None
        kw: dict[str, Any] = {}
        if cell.opt.recompute:
            kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if gated:
            kw.update(gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm")
        else:
            kw.update(activation_func=F.gelu, normalization="LayerNorm")
        self.config = TransformerConfig(
            num_layers=shape.n_layers,
            hidden_size=shape.hidden,
            num_attention_heads=shape.n_heads,
            num_query_groups=shape.kv_heads,
            ffn_hidden_size=shape.ffn_hidden,
            kv_channels=shape.head_dim,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            add_bias_linear=not gated,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            layernorm_epsilon=1e-5,
            bf16=self.on_gpu and cell.precision == "bf16",
            params_dtype=torch.float32,  # master weights; bf16 compute through autocast
            pipeline_dtype=torch.float32,
            use_cpu_initialization=not self.on_gpu,
            masked_softmax_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            **kw,
        )
        spec = get_gpt_layer_local_spec(normalization="RMSNorm" if gated else None)
        # The local spec's DotProductAttention materialises the s x s scores (at GPT-3 1.3B, mb 8,
        # seq 2048 it ran out of 140 GB on an H200); SDPA runs flash/cuDNN kernels on GPU.
        spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
        self.core_attention = "charllm SdpaCoreAttention (F.scaled_dot_product_attention)"
        self.vocab = padded_vocab(shape.vocab_size)
        model = GPTModel(
            config=self.config,
            transformer_layer_spec=spec,
            vocab_size=self.vocab,
            max_sequence_length=cell.seq_len,
            pre_process=True,
            post_process=True,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope" if uses_rope(shape) else "learned_absolute",
            rotary_base=ROPE_BASE,
        )
        model.to(device)
        model.train()
        if self.autocast is not None:
            # Megatron's activation recompute replays a layer in backward outside the caller's
            # autocast region (bf16 saved tensors meet fp32 replays): each layer enters it itself
            for layer in model.decoder.layers:
                layer.forward = _under_autocast(layer.forward, device.type, self.autocast)
        self.model = model
        params = [q for q in model.parameters() if q.requires_grad]
        self.params = params
        groups = [
            {"params": [q for q in params if q.ndim >= 2], "weight_decay": cell.opt.weight_decay},
            {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cell.opt.lr, betas=(0.9, 0.95), eps=1e-8, fused=self.on_gpu
        )
        self.optimizer_impl = "fused" if self.on_gpu else "foreach"
        self.grad_sync = "allreduce-after-backward" if p.dp > 1 else "none"

        self.data = token_source(cell, self.dp_rank, device)
        self.position_ids = torch.arange(cell.seq_len, device=device).unsqueeze(0).expand(cell.micro_batch, -1)
        self.reports_loss = self.tp_rank == 0
        self.n_params_local = sum(q.numel() for q in params)

    # ---- one optimizer step -------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one micro batch; returns its mean token loss (detached)."""
        ctx: Any = contextlib.nullcontext()
        if self.autocast is not None:
            ctx = torch.autocast(self.device.type, dtype=self.autocast)
        with ctx:
            per_token = self.model(x, self.position_ids, None, labels=y)  # [b, s], fp32
        loss = per_token.float().mean()
        (loss * scale).backward()
        return loss.detach()

    def step(self, step: int) -> torch.Tensor:
        """Run one optimizer step; returns this rank's mean micro-batch loss."""
        from charllm.train.engine_torch import allreduce_grads

        total = torch.zeros((), device=self.device)
        for m in range(self.accum):
            x, y = self.data.micro_batch(step * self.accum + m)
            total += self.forward_backward(x, y, 1.0 / self.accum)
        if self.grad_sync == "allreduce-after-backward":
            allreduce_grads(self.params, self.dp_group, self.cell.parallel.dp)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.accum

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

        p = self.cell.parallel
        return {
            "engine": "megatron",
            "megatron_core": str(getattr(megatron.core, "__version__", "?")),
            "model": "megatron.core GPTModel, local layer spec (no Transformer Engine)",
            "core_attention": self.core_attention,
            "mesh": {"pp": p.pp, "dp": p.dp, "tp": p.tp},
            "coords": {"pp": self.pp_rank, "dp": self.dp_rank, "tp": self.tp_rank},
            "grad_sync": self.grad_sync,
            "grad_accum": self.accum,
            "pp_schedule": None,
            "optimizer": f"torch AdamW ({self.optimizer_impl}), fp32 parameters",
            "autocast": self.cell.precision if self.autocast is not None else None,
            "compile": False,
            "recompute": "full (uniform, 1 layer per group)" if self.cell.opt.recompute else "none",
            "params_local": self.n_params_local,
        }

    @property
    def profiles(self) -> bool:
        """One rank per pipeline stage writes a kernel breakdown: dp rank 0, tp rank 0."""
        return self.dp_rank == 0 and self.tp_rank == 0


def build(cell: CellSpec, denv: DistEnv, device: torch.device) -> MegatronEngine:
    return MegatronEngine(cell, denv, device)
