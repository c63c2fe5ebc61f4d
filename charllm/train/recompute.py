"""Activation-recompute building blocks of the torch engine (``opt.recompute_granularity``).

- ``selective``: :func:`sdpa_recompute`, the attention core (scaled-dot-product attention)
  recomputed in backward from its saved Q, K, V (Megatron's ``core_attn`` selective mode);
- ``kwai``: Megatron-Kwai's balanced mode, the norms and the MLP activation recomputed.
  :func:`norm_linears` saves a norm's *input* (not its output) for the linears that read it and
  recomputes the norm in backward; :func:`act_linear` saves the MLP's pre-activation(s) (not
  the activation) and recomputes ``silu(a) * b`` (or ``gelu(a)``) in backward. Matmul outputs
  are kept, so no matmul is recomputed.
- ``full``: ``torch.utils.checkpoint`` of whole blocks (in :mod:`charllm.train.model`).

Each is an ``autograd.Function`` whose ``save_for_backward`` goes through any saved-tensor
hooks (the activation offload of :mod:`charllm.train.offload` sees what they keep). Autocast:
the forward runs under the caller's autocast; the backward re-enters the same autocast state.

Tensor parallelism (weights that are DTensors of the engine's colwise/rowwise plan): the fused
functions compute with the local shards, as the plan would: column-parallel outputs stay local,
the gradient of the (replicated) norm input is summed over the tp group in backward, and the
row-parallel output of :func:`act_linear` is summed over the tp group in forward (identity in
backward), its bias added after the sum.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _local(t: torch.Tensor | None) -> tuple[torch.Tensor | None, Any]:
    """(the local shard, the tp process group) of a DTensor parameter; (t, None) for a plain one."""
    if t is None:
        return None, None
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to_local(), t.device_mesh.get_group()
    return t, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward (a row-parallel layer's output)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple[str, bool, torch.dtype]) -> AbstractContextManager[Any]:
    dev, on, dtype = state
    return torch.autocast(dev, dtype=dtype) if on else nullcontext()


def _norm(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    if kind == "rms":
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _act(kind: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if kind == "swiglu":
        assert b is not None
        return F.silu(a) * b
    return F.gelu(a, approximate="tanh")


def _wgrad(g: torch.Tensor, inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d(linear)/dW = g^T inp over all leading dims, in the weight's dtype."""
    gw = g.reshape(-1, g.shape[-1]).t().matmul(inp.reshape(-1, inp.shape[-1]).to(g.dtype))
    return gw.to(w.dtype)


class _NormLinears(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        nw: torch.Tensor,
        nb: torch.Tensor | None,
        kind: str,
        eps: float,
        n_lin: int,
        group: Any,
        *lin: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        ctx.state = _autocast_state(x.device.type)
        ctx.kind, ctx.eps, ctx.n_lin, ctx.group = kind, eps, n_lin, group
        n = _norm(kind, x, nw, nb, eps)
        ws = [w for w in (lin[2 * i] for i in range(n_lin)) if w is not None]
        outs = tuple(F.linear(n, ws[i], lin[2 * i + 1]) for i in range(n_lin))
        ctx.has_nb = nb is not None
        ctx.has_bias = [lin[2 * i + 1] is not None for i in range(n_lin)]
        ctx.save_for_backward(x, nw, *([nb] if nb is not None else []), *ws)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        x, nw = saved[0], saved[1]
        nb = saved[2] if ctx.has_nb else None
        ws = saved[3:] if ctx.has_nb else saved[2:]
        with torch.enable_grad(), _autocast(ctx.state):
            x_ = x.detach().requires_grad_(True)
            nw_ = nw.detach().requires_grad_(True)
            nb_ = nb.detach().requires_grad_(True) if nb is not None else None
            n = _norm(ctx.kind, x_, nw_, nb_, ctx.eps)
        with _autocast(ctx.state):
            n_d = n.detach()
            grad_n: torch.Tensor | None = None
            lin_grads: list[torch.Tensor | None] = []
            for i, (g, w) in enumerate(zip(grads, ws, strict=True)):
                gn = g.matmul(w.to(g.dtype))
                grad_n = gn if grad_n is None else grad_n + gn
                lin_grads.append(_wgrad(g, n_d, w))
                lin_grads.append(g.reshape(-1, g.shape[-1]).sum(0).to(w.dtype) if ctx.has_bias[i] else None)
        inputs = [x_, nw_] + ([nb_] if nb_ is not None else [])
        assert grad_n is not None
        if ctx.group is not None:  # each tp rank holds the part from its output columns
            grad_n = grad_n.contiguous()
            dist.all_reduce(grad_n, group=ctx.group)
        got = torch.autograd.grad(n, inputs, grad_n.to(n.dtype))
        gx, gnw = got[0], got[1]
        gnb = got[2] if nb_ is not None else None
        return (gx, gnw, gnb, None, None, None, None, *lin_grads)


def norm_linears(x: torch.Tensor, norm: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """``[lin(norm(x)) for lin in linears]``, keeping ``x`` (not ``norm(x)``) for backward."""
    kind = "rms" if isinstance(norm, nn.RMSNorm) else "layer"
    eps: Any = getattr(norm, "eps", None)
    eps = eps if eps is not None else torch.finfo(x.dtype).eps
    lin: list[torch.Tensor | None] = []
    group = None
    for m in linears:
        w, group = _local(m.weight)
        lin += [w, _local(m.bias)[0]]
    nb = getattr(norm, "bias", None)
    return _NormLinears.apply(x, norm.weight, nb, kind, float(eps), len(linears), group, *lin)  # type: ignore[no-any-return]


class _ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor, bias: torch.Tensor | None, kind: str
    ) -> torch.Tensor:
        ctx.state = _autocast_state(a.device.type)
        ctx.kind, ctx.has_b, ctx.has_bias = kind, b is not None, bias is not None
        p = _act(kind, a, b)
        out = F.linear(p, w, bias)
        ctx.save_for_backward(a, w, *([b] if b is not None else []))
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        a, w = saved[0], saved[1]
        b = saved[2] if ctx.has_b else None
        with torch.enable_grad(), _autocast(ctx.state):
            a_ = a.detach().requires_grad_(True)
            b_ = b.detach().requires_grad_(True) if b is not None else None
            p = _act(ctx.kind, a_, b_)
        with _autocast(ctx.state):
            gp = g.matmul(w.to(g.dtype))
            gw = _wgrad(g, p.detach(), w)
            gbias = g.reshape(-1, g.shape[-1]).sum(0).to(w.dtype) if ctx.has_bias else None
        ins = [a_] + ([b_] if b_ is not None else [])
        got = torch.autograd.grad(p, ins, gp.to(p.dtype))
        return (got[0], got[1] if b_ is not None else None, gw, gbias, None)


def act_linear(a: torch.Tensor, b: torch.Tensor | None, linear: nn.Linear, kind: str) -> torch.Tensor:
    """``linear(silu(a) * b)`` (kind ``swiglu``) or ``linear(gelu(a))`` (``gelu``), keeping a (and b)."""
    w, group = _local(linear.weight)
    if group is None:
        return _ActLinear.apply(a, b, w, linear.bias, kind)  # type: ignore[no-any-return]
    out = _SumOverGroup.apply(_ActLinear.apply(a, b, w, None, kind), group)
    bias = _local(linear.bias)[0]  # row-parallel: the bias is replicated, added once after the sum
    return out if bias is None else out + bias


class _SDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.state = _autocast_state(q.device.type)
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        with torch.enable_grad(), _autocast(ctx.state):
            ins = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(ins[0], ins[1], ins[2], is_causal=True)
        return tuple(torch.autograd.grad(out, ins, g))


def sdpa_recompute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA whose attention (output, softmax statistics) is recomputed in backward."""
    return _SDPA.apply(q, k, v)  # type: ignore[no-any-return]
