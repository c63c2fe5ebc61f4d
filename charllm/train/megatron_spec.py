"""The layer spec of the megatron engine: Transformer Engine's where it imports, else megatron-core's local one.

:func:`select_layer_spec` makes the choice and says which it made (recorded in the result's
``provenance.engine.layer_spec``):

- ``transformer_engine``: ``get_gpt_layer_with_transformer_engine_spec`` on a GPU where
  ``transformer_engine`` imports (TE linear layers, TE norms, TE's fused attention; TE's norms
  carry the sequence-parallel attribute themselves);
- ``local``: ``get_gpt_layer_local_spec`` (megatron-core modules only), with two changes:

  * the core attention is :func:`sdpa_core_attention_class` (``F.scaled_dot_product_attention``,
    causal, no dropout). Megatron's local ``DotProductAttention`` materialises the s x s scores
    (GPT-3 1.3B, mb 8, seq 2048 ran out of an H200's 140 GB) and allocates its buffer on CUDA;
    SDPA runs flash/cuDNN kernels on GPU and runs on CPU;
  * the norms are :func:`sp_torch_norm_class`: ``torch.nn.LayerNorm``/``RMSNorm`` whose
    parameters carry ``sequence_parallel`` (megatron-core's own torch-norm wrapper refuses
    sequence parallelism; apex's fused norm, which allows it, is not installed). With
    sequence parallelism each tensor-parallel rank normalises its own slice of the sequence,
    and ``finalize_model_grads`` sums these norms' gradients over the tensor-parallel group,
    as it does for apex's and TE's norms.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from charllm.train.errors import EngineUnavailableError


def transformer_engine_importable() -> bool:
    """Whether ``import transformer_engine`` would find the package (no import: TE's import is slow)."""
    return importlib.util.find_spec("transformer_engine") is not None


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


def sp_torch_norm_class() -> type:
    """A norm builder with megatron-core's norm signature: a torch norm marked for sequence parallelism."""

    class SequenceParallelTorchNorm:
        def __new__(  # type: ignore[misc]
            cls, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any
        ) -> torch.nn.Module:
            if config.normalization == "RMSNorm":
                norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
            elif config.normalization == "LayerNorm":
                norm = torch.nn.LayerNorm(hidden_size, eps=eps)
            else:
                raise EngineUnavailableError(f"normalization {config.normalization!r} is not supported")
            for p in norm.parameters():
                p.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]
            return norm

    return SequenceParallelTorchNorm


def select_layer_spec(
    num_experts: int | None, normalization: str, on_gpu: bool, te_importable: bool
) -> tuple[Any, str]:
    """The layer spec and its name, ``"transformer_engine"`` or ``"local"`` (see the module docstring)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if on_gpu and te_importable:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts or None, moe_grouped_gemm=False
        )
        return spec, "transformer_engine"
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts or None, moe_grouped_gemm=False, normalization=normalization
    )
    norm = sp_torch_norm_class()
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    return spec, "local"


def block_spec(layer_spec: Any, spec_name: str, config: Any, vp_stage: int | None) -> Any:
    """The transformer-block spec of one model chunk: the layers this stage builds and the final norm."""
    if spec_name != "local":
        return layer_spec  # megatron builds the block (TE's final norm)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=sp_torch_norm_class())
