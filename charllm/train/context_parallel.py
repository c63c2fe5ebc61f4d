"""Context parallelism for the torch engine: ring attention with a load-balanced causal split.

Layout. A sequence of length ``s`` is cut into ``2 cp`` chunks of ``c = s / (2 cp)`` tokens;
context-parallel rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (Megatron's and Llama 3's
"zig-zag" split: every rank then does the same amount of causal attention work).
:func:`local_positions` gives a rank's token positions (for RoPE and learned positions) and
:func:`split_batch` its part of the tokens and targets. Everything outside attention is
token-wise, so only attention talks across ranks.

Attention (:func:`ring_attention`). Each rank starts with its own K/V chunks and passes them
around the ring ``cp - 1`` times (``isend``/``irecv`` to the next/previous rank of the cp
group). At every step each local query chunk attends to each visiting K/V chunk whose global
index is lower (all of it), equal (causal) or skips it (higher); the partial results are merged
with their log-sum-exp (``out = sum_j exp(lse_j - LSE) out_j``). The ring shift is an autograd
function whose backward sends the gradient the other way round, so autograd differentiates
the whole ring, the merge included.

Per block pair the attention is computed with :func:`_block_attention` (matmul, softmax,
matmul, in float32): PyTorch's fused SDPA kernels do not return the log-sum-exp the merge
needs as a differentiable output, so the blocks use the plain formulation. Its memory is
O(c^2) per head and block pair: this engine's CP is for correctness and moderate sequence
lengths; long-context runs belong to engines with fused ring kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two global chunk indices (of 2 cp) context-parallel rank ``rank`` holds."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, cp: int, rank: int, device: Any = None) -> torch.Tensor:
    """Token positions of rank ``rank``'s part of a ``seq_len`` sequence (int64)."""
    c = seq_len // (2 * cp)
    a, b = chunk_ids(cp, rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)]).to(device)


def split_batch(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's tokens of ``t`` (batch, seq, ...): chunks ``rank`` and ``2 cp - 1 - rank``."""
    if cp == 1:
        return t
    return t.index_select(1, local_positions(t.shape[1], cp, rank, t.device))


class _RingShift(torch.autograd.Function):
    """Send ``x`` to the next rank of the ring, receive the previous rank's; backward: the reverse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, nxt: int, prv: int) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.nxt, ctx.prv = group, nxt, prv
        return _exchange(x, group, send_to=nxt, recv_from=prv)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _exchange(g.contiguous(), ctx.group, send_to=ctx.prv, recv_from=ctx.nxt), None, None, None


def _exchange(x: torch.Tensor, group: Any, send_to: int, recv_from: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q (b, h, c, d) against one K/V block, float32; ``causal``: same-chunk mask."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n = s.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - lse), v.float()), lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, cp: int, rank: int) -> torch.Tensor:
    """Causal attention of this rank's queries against the whole sequence's keys and values.

    ``q``, ``k``, ``v``: (batch, heads, 2c, head_dim), this rank's two chunks in order (chunk
    ``rank`` then chunk ``2 cp - 1 - rank``); K/V heads already repeated for GQA. Returns the
    attention output in ``q``'s dtype and shape.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    c = q.shape[2] // 2
    q_chunks = list(zip(chunk_ids(cp, rank), (q[:, :, :c], q[:, :, c:]), strict=True))
    ranks = dist.get_process_group_ranks(group)
    me = ranks.index(dist.get_rank())
    nxt, prv = ranks[(me + 1) % cp], ranks[(me - 1) % cp]
    kv = torch.stack([k, v])
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    for step in range(cp):
        src = (rank - step) % cp
        kv_ids = chunk_ids(cp, src)
        kc = ((kv[0][:, :, :c], kv[1][:, :, :c]), (kv[0][:, :, c:], kv[1][:, :, c:]))
        for i, (qid, qc) in enumerate(q_chunks):
            for kid, (kk, vv) in zip(kv_ids, kc, strict=True):
                if kid < qid:
                    parts[i].append(_block_attention(qc, kk, vv, False, scale))
                elif kid == qid:
                    parts[i].append(_block_attention(qc, kk, vv, True, scale))
        if step < cp - 1:
            kv = _RingShift.apply(kv, group, nxt, prv)
    outs = []
    for chunk_parts in parts:
        lses = torch.cat([lse for _, lse in chunk_parts], dim=-1)
        total = torch.logsumexp(lses, dim=-1, keepdim=True)
        merged = torch.zeros_like(chunk_parts[0][0])
        for o, lse in chunk_parts:
            merged = merged + torch.exp(lse - total) * o
        outs.append(merged)
    return torch.cat(outs, dim=2).to(q.dtype)
