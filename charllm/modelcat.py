"""Model catalog: transformer shapes by name, and layer-truncated proxies.

Pure data, importable anywhere (no torch). A campaign refers to a model by name;
``proxy_layers`` keeps the width of a large model and cuts its depth so that its
per-layer behaviour can be measured on one or two GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer."""

    name: str
    family: str  # gpt3 | llama3 | mixtral | tiny
    n_layers: int
    hidden: int
    n_heads: int
    ffn_hidden: int
    vocab_size: int
    n_kv_heads: int = 0  # 0 means equal to n_heads (multi-head attention)
    num_experts: int = 0  # 0 means dense
    top_k: int = 0
    max_seq_len: int = 2048

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def n_params(self) -> int:
        """Parameter count (embeddings included, untied output layer excluded)."""
        h, f = self.hidden, self.ffn_hidden
        kv = self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h
        gated = self.family in ("llama3", "mixtral")
        mlp = (3 if gated else 2) * h * f
        if self.num_experts:
            mlp = mlp * self.num_experts + h * self.num_experts
        return self.n_layers * (attn + mlp + 2 * h) + self.vocab_size * h

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_CATALOG: dict[str, ModelShape] = {
    m.name: m
    for m in [
        # tiny sizes for CPU tests and the demo campaign
        ModelShape("tiny", "gpt3", 2, 64, 4, 256, 512, max_seq_len=256),
        ModelShape("tiny-llama", "llama3", 2, 64, 4, 192, 512, n_kv_heads=2, max_seq_len=256),
        ModelShape("tiny-moe", "mixtral", 2, 64, 4, 128, 512, n_kv_heads=2, num_experts=4, top_k=2, max_seq_len=256),
        # GPT-3 family (Brown et al. 2020, table 2.1)
        ModelShape("gpt3-125m", "gpt3", 12, 768, 12, 3072, 50257),
        ModelShape("gpt3-350m", "gpt3", 24, 1024, 16, 4096, 50257),
        ModelShape("gpt3-760m", "gpt3", 24, 1536, 16, 6144, 50257),
        ModelShape("gpt3-1.3b", "gpt3", 24, 2048, 16, 8192, 50257),
        ModelShape("gpt3-2.7b", "gpt3", 32, 2560, 32, 10240, 50257),
        ModelShape("gpt3-6.7b", "gpt3", 32, 4096, 32, 16384, 50257),
        ModelShape("gpt3-13b", "gpt3", 40, 5120, 40, 20480, 50257),
        ModelShape("gpt3-175b", "gpt3", 96, 12288, 96, 49152, 50257),
        # Llama 3
        ModelShape("llama3-8b", "llama3", 32, 4096, 32, 14336, 128256, n_kv_heads=8, max_seq_len=8192),
        ModelShape("llama3-70b", "llama3", 80, 8192, 64, 28672, 128256, n_kv_heads=8, max_seq_len=8192),
        # Llama 1 / Llama 2 as Megatron-Kwai (ATC'24) trains them: examples/atc24/llama-7b,
        # llama-65b, llama-175b, llama2-70b of kwai/Megatron-Kwai (branch atc24ae) give layers,
        # hidden, FFN and heads (hidden / 128); 8 query groups for Llama-2 70B. Same architecture
        # as the llama3 family (RMSNorm, SwiGLU, RoPE, no biases). Vocabulary 32000 (the Llama
        # tokenizer; Kwai's runs pass --vocab-size 32004, padded by Megatron, which moves MFU by
        # < 0.005 points). max_seq_len 32768: the longest context Kwai trains these at
        # (12_run_65b_64gpus_offload.sh; RoPE, so no position table bounds it).
        ModelShape("llama-7b", "llama3", 32, 4096, 32, 11008, 32000, max_seq_len=32768),
        ModelShape("llama-65b", "llama3", 80, 8192, 64, 22016, 32000, max_seq_len=32768),
        # Kwai's "Llama-175B": GPT-3 175B's depth, width and heads with a Llama MLP of 32768
        ModelShape("llama-175b", "llama3", 96, 12288, 96, 32768, 32000, max_seq_len=32768),
        ModelShape("llama2-70b", "llama3", 80, 8192, 64, 28672, 32000, n_kv_heads=8, max_seq_len=32768),
        # The PCIe strategies study (juannyG/coms6998-llms-final-project, src/configs.py, MIT):
        # d_model / n_heads / n_layers / d_ff / vocab 8000, max_seq_len = its seq_len. Its models
        # are GPT-2-like (pre-LayerNorm, GELU MLP, learned positions): the gpt3 family.
        ModelShape("pcie-10m", "gpt3", 4, 320, 8, 1536, 8000, max_seq_len=128),
        ModelShape("pcie-100m", "gpt3", 12, 768, 12, 3072, 8000, max_seq_len=512),
        ModelShape("pcie-300m", "gpt3", 24, 1024, 16, 4096, 8000, max_seq_len=1024),
        ModelShape("pcie-500m", "gpt3", 24, 1280, 20, 5120, 8000, max_seq_len=1024),
        ModelShape("pcie-1b", "gpt3", 36, 1536, 24, 6144, 8000, max_seq_len=1024),
        # Mixtral
        ModelShape(
            "mixtral-8x7b",
            "mixtral",
            32,
            4096,
            32,
            14336,
            32000,
            n_kv_heads=8,
            num_experts=8,
            top_k=2,
            max_seq_len=4096,
        ),
        ModelShape(
            "mixtral-8x22b",
            "mixtral",
            56,
            6144,
            48,
            16384,
            32768,
            n_kv_heads=8,
            num_experts=8,
            top_k=2,
            max_seq_len=4096,
        ),
    ]
}


def names() -> list[str]:
    return sorted(_CATALOG)


def get(name: str, proxy_layers: int | None = None) -> ModelShape:
    """Return the shape called ``name``; with ``proxy_layers``, a depth-truncated proxy."""
    try:
        shape = _CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}") from None
    if proxy_layers is None or proxy_layers == shape.n_layers:
        return shape
    if not 0 < proxy_layers < shape.n_layers:
        raise ValueError(f"proxy_layers must be in 1..{shape.n_layers - 1} for {name}, got {proxy_layers}")
    return replace(shape, name=f"{name}-L{proxy_layers}", n_layers=proxy_layers)
