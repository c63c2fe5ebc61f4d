"""A decoder-only transformer in plain PyTorch, shaped by :class:`charllm.modelcat.ModelShape`.

Families: ``gpt3`` (LayerNorm, learned positions, GELU MLP, biases), ``llama3`` (RMSNorm,
RoPE, gated SiLU MLP, GQA, no biases), ``mixtral`` (llama3 with a top-k MoE in place of
the MLP). ``tiny`` shapes use their ``family`` field like any other.

Attention goes through ``F.scaled_dot_product_attention`` (flash kernels on GPU in bf16).
Q, K and V are separate projections so that tensor parallelism shards heads with plain
colwise/rowwise plans. A :class:`Transformer` can hold a slice of the layers (one pipeline
stage): ``first`` owns the embeddings, ``last`` the final norm and output layer. Layers
live in a ``ModuleDict`` keyed by their global index, so parameter names do not depend on
the pipeline split, and each layer is initialised from ``seed`` and its index alone, so a
split model starts from the same weights as the whole one.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from charllm.modelcat import ModelShape

VOCAB_PAD = 128  # embedding/output rows are padded to a multiple of this (tensor-core friendly)


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD) * VOCAB_PAD


def uses_rope(shape: ModelShape) -> bool:
    return shape.family in ("llama3", "mixtral")


def is_gated(shape: ModelShape) -> bool:
    return shape.family in ("llama3", "mixtral")


def _norm(shape: ModelShape) -> nn.Module:
    if is_gated(shape):
        return nn.RMSNorm(shape.hidden, eps=1e-5)
    return nn.LayerNorm(shape.hidden, eps=1e-5)


def rope_table(
    seq_len: int, head_dim: int, device: torch.device | None = None, theta: float = 500000.0
) -> torch.Tensor:
    """cos/sin of the rotary angles, shape (seq_len, head_dim // 2, 2), float32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim; x is (b, s, heads, head_dim)."""
    s = x.shape[1]
    cos = table[:s, :, 0][None, :, None, :]
    sin = table[:s, :, 1][None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        h, hd, bias = shape.hidden, shape.head_dim, not is_gated(shape)
        self.head_dim = hd
        self.rope = uses_rope(shape)
        self.wq = nn.Linear(h, shape.n_heads * hd, bias=bias)
        self.wk = nn.Linear(h, shape.kv_heads * hd, bias=bias)
        self.wv = nn.Linear(h, shape.kv_heads * hd, bias=bias)
        self.wo = nn.Linear(shape.n_heads * hd, h, bias=bias)
        # context parallelism: (group, cp, cp rank) of the ring (charllm.train.context_parallel)
        self.cp: tuple[Any, int, int] | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, recompute_core: bool = False) -> torch.Tensor:
        return self.core(self.wq(x), self.wk(x), self.wv(x), rope, recompute_core)

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None, recompute_core: bool = False
    ) -> torch.Tensor:
        """Attention from the Q/K/V projections' outputs: RoPE, SDPA (recomputed if asked), output projection."""
        b, s, _ = q.shape
        # -1: under tensor parallelism each rank holds n_heads/tp of the heads
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim)
        if self.rope and rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # grouped-query attention: share each K/V head among `rep` query heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.cp is not None:
            from charllm.train.context_parallel import ring_attention

            out = ring_attention(q, k, v, *self.cp)
        elif recompute_core:
            from charllm.train.recompute import sdpa_recompute

            out = sdpa_recompute(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """GPT MLP: fc2(gelu(fc1 x))."""

    def __init__(self, hidden: int, ffn: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GatedMLP(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed mixture of gated MLPs (no capacity limit, no auxiliary loss).

    Every expert runs each step, on zero tokens if none were routed to it, so every
    parameter gets a gradient and DDP needs no unused-parameter search.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(hidden, ffn) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        weight, idx = probs.topk(self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            y = expert(flat[token]) * weight[token, slot].unsqueeze(-1)
            out = out.index_add(0, token, y.to(out.dtype))
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.norm1 = _norm(shape)
        self.attn = Attention(shape)
        self.norm2 = _norm(shape)
        self.ff: nn.Module
        if shape.num_experts:
            self.ff = MoE(shape.hidden, shape.ffn_hidden, shape.num_experts, shape.top_k)
        elif is_gated(shape):
            self.ff = GatedMLP(shape.hidden, shape.ffn_hidden)
        else:
            self.ff = MLP(shape.hidden, shape.ffn_hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, mode: str = "none") -> torch.Tensor:
        """``mode``: none | selective (SDPA recomputed) | kwai (norms + MLP activation recomputed)."""
        if mode == "kwai" and isinstance(self.ff, (GatedMLP, MLP)):
            from charllm.train.recompute import act_linear, norm_linears

            a = self.attn
            q, k, v = norm_linears(x, self.norm1, [a.wq, a.wk, a.wv])
            x = x + a.core(q, k, v, rope)
            if isinstance(self.ff, GatedMLP):
                g, u = norm_linears(x, self.norm2, [self.ff.w1, self.ff.w3])
                return x + act_linear(g, u, self.ff.w2, "swiglu")
            (h,) = norm_linears(x, self.norm2, [self.ff.fc1])
            return x + act_linear(h, None, self.ff.fc2, "gelu")
        x = x + self.attn(self.norm1(x), rope, recompute_core=mode == "selective")
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    """Layers ``layer_ids`` of the model; the embeddings if ``first``, norm and head if ``last``.

    ``forward`` takes token ids (first stage) or hidden states (later stages) and returns
    hidden states, or logits on the last stage. ``autocast_dtype`` runs the body under
    autocast (bf16 on GPU); doing it here, not around the caller, also covers pipeline stages.
    """

    def __init__(
        self,
        shape: ModelShape,
        seq_len: int,
        layer_ids: range | None = None,
        first: bool = True,
        last: bool = True,
        recompute: bool | str = False,
        autocast_dtype: torch.dtype | None = None,
        recompute_layers: int = 0,
    ) -> None:
        super().__init__()
        layer_ids = range(shape.n_layers) if layer_ids is None else layer_ids
        self.shape, self.seq_len = shape, seq_len
        mode = "full" if recompute is True else "none" if recompute is False else recompute
        if mode not in ("none", "full", "selective", "kwai"):
            raise ValueError(f"recompute must be none, full, selective or kwai; got {recompute!r}")
        self.first, self.last, self.recompute = first, last, mode != "none"
        self.recompute_mode, self.recompute_layers = mode, recompute_layers
        self.offloader: Any = None  # charllm.train.offload.Offloader, set by the engine
        self.positions: torch.Tensor | None = None  # context parallelism: this rank's token positions
        self.autocast_dtype = autocast_dtype
        vp = padded_vocab(shape.vocab_size)
        self.tok_emb = nn.Embedding(vp, shape.hidden) if first else None
        self.pos_emb = nn.Embedding(seq_len, shape.hidden) if first and not uses_rope(shape) else None
        self.layers = nn.ModuleDict({str(i): Block(shape) for i in layer_ids})
        self.norm = _norm(shape) if last else None
        self.output = nn.Linear(shape.hidden, vp, bias=False) if last else None
        if uses_rope(shape):
            self.register_buffer("rope", rope_table(seq_len, shape.head_dim), persistent=False)
        else:
            self.rope = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with ctx:
            pos = self.positions
            rope = self.rope if pos is None or self.rope is None else self.rope[pos]
            if self.tok_emb is not None:
                h = self.tok_emb(x)
                if self.pos_emb is not None:
                    h = h + self.pos_emb(torch.arange(x.shape[1], device=x.device) if pos is None else pos)
            else:
                h = x
            off = self.offloader if self.training else None
            with off.group() if off is not None else nullcontext():
                for j, (idx, layer) in enumerate(self.layers.items()):
                    mode = self.recompute_mode if self.training else "none"
                    if self.recompute_layers and j >= self.recompute_layers:
                        mode = "none"
                    if off is not None:
                        off.enter_block(int(idx))
                    # full: torch.utils.checkpoint saves the block's inputs through the offload hooks too
                    h = checkpoint(layer, h, rope, use_reentrant=False) if mode == "full" else layer(h, rope, mode)
            if self.norm is not None:
                h = self.norm(h)
            if self.output is not None:
                h = self.output(h)
        return h

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise in place (after ``to_empty``), from ``seed`` and each layer's index.

        Weights ~ N(0, 0.02); output projections of each block scaled by 1/sqrt(2 L)
        (GPT-2); biases 0; norms 1. Works on plain and DTensor parameters.
        """
        std = 0.02
        out_std = std / math.sqrt(2 * self.shape.n_layers)

        def fill(mod: nn.Module, base: int) -> None:
            torch.manual_seed(base)
            for name, p in mod.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                # a sharded (DTensor) parameter is drawn whole and then split, so FSDP/TP layouts
                # start from the same weights as one rank (DTensor's own RNG would differ)
                full: Any = p
                if _is_dtensor(p):
                    full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)  # type: ignore[attr-defined]
                if "norm" in name:
                    nn.init.ones_(full) if leaf == "weight" else nn.init.zeros_(full)
                elif leaf == "bias":
                    nn.init.zeros_(full)
                elif name.endswith(("wo.weight", "fc2.weight", "w2.weight")):
                    nn.init.normal_(full, 0.0, out_std)
                else:
                    nn.init.normal_(full, 0.0, std)
                if full is not p:
                    from torch.distributed.tensor import distribute_tensor

                    p.copy_(distribute_tensor(full, p.device_mesh, p.placements))  # type: ignore[attr-defined]

        if self.tok_emb is not None:
            fill(self.tok_emb, seed * 1000 + 997)
        if self.pos_emb is not None:
            fill(self.pos_emb, seed * 1000 + 998)
        for idx, layer in self.layers.items():
            fill(layer, seed * 1000 + int(idx))
        if self.norm is not None:
            fill(self.norm, seed * 1000 + 999)
        if self.output is not None:
            fill(self.output, seed * 1000 + 996)
        if self.rope is not None:
            self.rope.copy_(rope_table(self.seq_len, self.shape.head_dim, device=self.rope.device))


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in float32 (padded vocabulary rows never win: no targets there)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def split_layers(n_layers: int, pp: int, partition: str = "") -> list[range]:
    """Contiguous layer ranges per pipeline stage: uniform (earlier stages taking the remainder),
    or a custom partition ``custom:0,8,14,20,26`` (:func:`charllm.capabilities.stage_starts`)."""
    from charllm.capabilities import stage_starts

    starts = [*stage_starts(partition, n_layers, pp), n_layers]
    return [range(a, b) for a, b in itertools.pairwise(starts)]
