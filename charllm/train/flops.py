"""Model FLOPs per token, peak rates per GPU type, and MFU/HFU.

Per trained token (forward + backward = 3 x forward), after Megatron/PaLM:

    model_flops_per_token = 6 * N_active + 12 * L * h * s

N_active counts the matrices every token goes through: the attention and MLP weights of
each layer (for MoE only ``top_k`` experts, plus the router) and the output layer
(``vocab x hidden``); the embedding lookups do no multiplication. 12*L*h*s is the attention
score and value products (2 matmuls of 2*s*h FLOPs per token forward, x3), not halved for the
causal mask. Hardware FLOPs with full activation recompute add one more forward:
8 * N_active + 16 * L * h * s; selective (core attention) recompute adds the attention
products' forward only: 6 * N_active + 16 * L * h * s; Kwai's mode (norms + MLP activation
function) recomputes no matmul: its hardware FLOPs are the model FLOPs.

Megatron-Kwai (ATC'24) reports MFU with the attention term halved for the causal mask (a
token attends to s/2 positions on average):

    causal_model_flops_per_token = 6 * N_active + 6 * L * h * s

with N_active as above (output layer counted, input embedding not); ``mfu_causal`` is that
over the peak. Their Llama-7B at s = 12288 on H800 (989 TFLOP/s): 8273 tokens/s/GPU -> 41.2 %.
"""

from __future__ import annotations

from charllm.modelcat import ModelShape

# Dense peak per GPU, FLOP/s, from the vendor datasheets (SXM parts). fp32 cells run plain
# fp32 matmuls (TF32 off), so their peak is the non-tensor-core fp32 rate.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("h100", "bf16"): 989e12,
    ("h200", "bf16"): 989e12,
    ("h100", "fp32"): 67e12,
    ("h200", "fp32"): 67e12,
    ("a100", "bf16"): 312e12,
    # the export variants Megatron-Kwai measured on (same dense bf16 peak as A100 / H100 SXM)
    ("a800", "bf16"): 312e12,
    ("h800", "bf16"): 989e12,
    ("a100", "fp32"): 19.5e12,
}


def active_matmul_params(shape: ModelShape) -> int:
    """Weights a token is multiplied with (embedding lookups excluded, output layer included)."""
    h, f = shape.hidden, shape.ffn_hidden
    kv = shape.kv_heads * shape.head_dim
    attn = 2 * h * h + 2 * h * kv
    gated = shape.family in ("llama3", "mixtral")
    mlp = (3 if gated else 2) * h * f
    if shape.num_experts:
        mlp = mlp * shape.top_k + h * shape.num_experts
    return shape.n_layers * attn + shape.n_layers * mlp + shape.vocab_size * h


def model_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    return 6.0 * active_matmul_params(shape) + 12.0 * shape.n_layers * shape.hidden * seq_len


def causal_model_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Megatron-Kwai's model FLOPs per token: the attention products halved for the causal mask."""
    return 6.0 * active_matmul_params(shape) + 6.0 * shape.n_layers * shape.hidden * seq_len


def hardware_flops_per_token(shape: ModelShape, seq_len: int, recompute: bool | str) -> float:
    """FLOPs the hardware runs per token, recompute included.

    ``recompute``: ``False``/``"none"``: the model FLOPs; ``True``/``"full"``: every layer's
    forward again (8 N + 16 L h s); ``"selective"`` (the core attention only, megatron's
    ``core_attn``): the attention products' forward again (6 N + 16 L h s); ``"kwai"`` (norms
    and the MLP activation function): no matmul again, the model FLOPs.
    """
    mode = ("full" if recompute else "none") if isinstance(recompute, bool) else recompute
    n, attn = active_matmul_params(shape), shape.n_layers * shape.hidden * seq_len
    if mode in ("none", "kwai"):
        return model_flops_per_token(shape, seq_len)
    if mode == "full":
        return 8.0 * n + 16.0 * attn
    if mode == "selective":
        return 6.0 * n + 16.0 * attn
    raise ValueError(f"recompute must be a bool or none/full/selective/kwai, got {recompute!r}")


def peak_flops(gpu_type: str, precision: str) -> float | None:
    return PEAK_FLOPS.get((gpu_type, precision))


def utilisation(flops_per_token: float, tokens_per_s: float, n_gpus: int, peak: float | None) -> float | None:
    """Achieved over peak FLOP/s across ``n_gpus`` (None where no peak is known, e.g. CPU)."""
    if not peak or n_gpus < 1:
        return None
    return flops_per_token * tokens_per_s / (n_gpus * peak)
