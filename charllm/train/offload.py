"""Activation offload to pinned host memory (``opt.offload_alpha``, Megatron-Kwai's alpha).

A :class:`Offloader` belongs to one pipeline stage's model. Each forward of a micro batch
opens a *group* (:meth:`Offloader.group`): while it is open, ``saved_tensors_hooks`` see every
tensor the blocks save for backward. Of those that are activations (not parameters, buffers
or casts of parameters, not tensor subclasses, at least :data:`MIN_BYTES`), the fraction
``alpha`` *by bytes* is copied to a pinned host buffer on a side CUDA stream; the decision is a
running ratio over the group (offload a tensor when that keeps offloaded/seen nearest alpha),
so the kept bytes are (1 - alpha) of the total to within one tensor. Copies run on the side
stream; a block's exit makes the compute stream wait for the previous block's copies (at most
two blocks' worth in flight, so memory falls with alpha even when the bus is slower than
compute). Under full recompute the hooks see what ``torch.utils.checkpoint`` (non-reentrant)
saves outside its region: the block inputs, so those are what is offloaded.

Backward: the first unpack of a block's tensor fetches that block's offloaded tensors (if not
already there) and prefetches the previous block's, on the side stream; the compute stream
waits on per-block events. Host buffers come from a pool keyed by size, reused across micro
batches and steps (``pinned_bytes``). Each group is its own micro batch, so pipelined
schedules (1F1B, GPipe) that interleave forwards and backwards of several micro batches work
unchanged. On CPU the "host copy" is a plain copy (for tests: the round trip is bit-exact).

Counters: ``bytes_out`` (device to host) and ``bytes_in`` (host to device) since the last
:meth:`Offloader.take_counters`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

MIN_BYTES = 64 << 10  # smaller saved tensors stay (not worth a copy)
_VIEWLIKE = {
    "ToCopyBackward0",
    "TBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ExpandBackward0",
    "AliasBackward0",
    "SliceBackward0",
    "SelectBackward0",
    "UnsqueezeBackward0",
}


def _param_derived(t: torch.Tensor) -> bool:
    """A parameter, or a cast/view of one (autocast's bf16 weight copies): not an activation."""
    if isinstance(t, torch.nn.Parameter) or (t.grad_fn is None and t.requires_grad):
        return True
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = type(fn).__name__
        if name == "AccumulateGrad":
            return True
        if name not in _VIEWLIKE:
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


class _Pool:
    """Host buffers by byte size, reused once the copy that last used them has completed.

    On CUDA each buffer is plain host memory page-locked with ``cudaHostRegister`` (torch's
    pinned allocator rounds every block up to a power of two: 1.5x the bytes for FFN-sized
    activations); :meth:`clear` unregisters and frees them.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.free: dict[int, list[tuple[torch.Tensor, Any]]] = {}
        self.all: list[torch.Tensor] = []
        self.total_bytes = 0

    def clear(self) -> None:
        """Drop every buffer (none may be in use): unregistered before their memory is freed."""
        if self.pinned and self.all:
            torch.cuda.synchronize()
            for buf in self.all:
                if buf.numel():
                    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self.all.clear()
        self.free.clear()
        self.total_bytes = 0

    def __del__(self) -> None:
        try:
            self.clear()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass

    def get(self, nbytes: int) -> torch.Tensor:
        stack = self.free.get(nbytes)
        if stack:
            buf, evt = stack.pop()
            if evt is not None:
                evt.synchronize()
            return buf
        self.total_bytes += nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pinned and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {int(err)})")
        self.all.append(buf)
        return buf

    def put(self, buf: torch.Tensor, evt: Any) -> None:
        self.free.setdefault(buf.numel(), []).append((buf, evt))


class _Handle:
    """One offloaded saved tensor: its host copy and, once fetched back, its device copy."""

    __slots__ = ("block", "cpu", "dtype", "evt_in", "gpu", "group", "nbytes", "refs", "shape", "stride")

    def __init__(self, group: _Group, block: int, t: torch.Tensor, cpu: torch.Tensor) -> None:
        self.group, self.block, self.cpu = group, block, cpu
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.nbytes = t.numel() * t.element_size()
        self.gpu: torch.Tensor | None = None
        self.refs = 1
        self.evt_in: Any = None


class _Group:
    """One micro batch's forward: its handles by block, the running byte ratio."""

    def __init__(self, owner: Offloader) -> None:
        self.owner = owner
        self.seen = 0
        self.off = 0
        self.block = -1
        self.by_block: dict[int, list[_Handle]] = {}
        self.live: dict[tuple[Any, ...], _Handle] = {}  # this block's packed tensors (dedupe while alive)
        self.held: list[torch.Tensor] = []  # GPU sources kept until the block exits
        self.evt_out: dict[int, Any] = {}
        self.fetched: set[int] = set()
        self.pending = False  # copies issued in the open block
        self.order: list[int] = []

    def choose(self, nbytes: int) -> bool:
        self.seen += nbytes
        take = self.off + nbytes <= self.owner.alpha * self.seen + nbytes / 2
        if take:
            self.off += nbytes
        return take


class Offloader:
    """Saved-activation offload of one stage's blocks; see the module docstring."""

    def __init__(self, alpha: float, device: torch.device) -> None:
        self.alpha = float(alpha)
        self.device = device
        self.cuda = device.type == "cuda"
        self.side: Any = torch.cuda.Stream(device) if self.cuda else None
        self.pool = _Pool(pinned=self.cuda)
        self.bytes_out = 0
        self.bytes_in = 0
        self.current: _Group | None = None
        self.static: set[int] = set()  # storages of buffers (RoPE tables): never offloaded

    def register_buffers(self, module: torch.nn.Module) -> None:
        self.static |= {b.untyped_storage().data_ptr() for b in module.buffers()}

    # ---- counters ----------------------------------------------------------------------
    @property
    def pinned_bytes(self) -> int:
        return self.pool.total_bytes

    def take_counters(self) -> tuple[int, int]:
        out = (self.bytes_out, self.bytes_in)
        self.bytes_out = self.bytes_in = 0
        return out

    # ---- forward -------------------------------------------------------------------------
    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """One micro batch's forward through the stage's blocks."""
        if not torch.is_grad_enabled() or self.alpha <= 0:
            yield
            return
        g = _Group(self)
        prev, self.current = self.current, g
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._close_block(g)
            self.current = prev

    def enter_block(self, index: int) -> None:
        g = self.current
        if g is None:
            return
        self._close_block(g)
        g.block = index
        g.order.append(index)

    def _close_block(self, g: _Group) -> None:
        if g.block < 0:
            return
        if self.cuda and g.pending:
            evt = torch.cuda.Event()
            evt.record(self.side)
            g.evt_out[g.block] = evt
            # bound what is in flight: the previous block's copies must be done before we go on
            i = g.order.index(g.block)
            if i > 0 and g.order[i - 1] in g.evt_out:
                torch.cuda.current_stream(self.device).wait_event(g.evt_out[g.order[i - 1]])
        g.live.clear()
        g.held.clear()
        g.pending = False

    def _copy_out(self, g: _Group, t: torch.Tensor) -> _Handle:
        nbytes = t.numel() * t.element_size()
        buf = self.pool.get(nbytes)
        dst = buf.view(t.dtype).view(t.shape) if nbytes else buf
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            self.side.wait_stream(cur)
            with torch.cuda.stream(self.side):
                dst.copy_(t, non_blocking=True)
            t.record_stream(self.side)
        else:
            dst.copy_(t)
        self.bytes_out += nbytes
        g.pending = True
        h = _Handle(g, g.block, t, buf)
        g.by_block.setdefault(g.block, []).append(h)
        return h

    def _candidate(self, t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and t.device.type == self.device.type
            and t.is_contiguous()
            and t.numel() * t.element_size() >= MIN_BYTES
            and not _param_derived(t)
            and t.untyped_storage().data_ptr() not in self.static
        )

    def _pack(self, t: torch.Tensor) -> Any:
        g = self.current
        if g is None or g.block < 0 or not self._candidate(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        h = g.live.get(key)
        if h is not None:
            h.refs += 1
            return h
        if not g.choose(t.numel() * t.element_size()):
            return t
        h = self._copy_out(g, t)
        g.live[key] = h
        g.held.append(t)
        return h

    # ---- backward ------------------------------------------------------------------------
    def _fetch(self, h: _Handle) -> None:
        """Issue the host-to-device copy of ``h`` (side stream on GPU)."""
        ctx: Any = torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()
        src = h.cpu.view(h.dtype).view(h.shape) if h.nbytes else h.cpu
        with ctx:
            target = torch.empty_strided(h.shape, h.stride, dtype=h.dtype, device=self.device)
            target.copy_(src, non_blocking=self.cuda)
            if self.cuda:
                h.evt_in = torch.cuda.Event()
                h.evt_in.record(self.side)
        h.gpu = target
        self.bytes_in += h.nbytes

    def _fetch_block(self, g: _Group, block: int) -> None:
        if block in g.fetched:
            return
        g.fetched.add(block)
        if self.cuda and block in g.evt_out:
            self.side.wait_event(g.evt_out[block])
        for h in reversed(g.by_block.get(block, [])):
            if h.gpu is None:
                self._fetch(h)

    def _ready(self, h: _Handle) -> torch.Tensor:
        g = h.group
        self._fetch_block(g, h.block)
        i = g.order.index(h.block)
        if i > 0:
            self._fetch_block(g, g.order[i - 1])  # prefetch the block backward reaches next
        assert h.gpu is not None
        if self.cuda and h.evt_in is not None:
            torch.cuda.current_stream(self.device).wait_event(h.evt_in)
            h.gpu.record_stream(torch.cuda.current_stream(self.device))
        return h.gpu

    def _release(self, h: _Handle) -> None:
        evt = h.evt_in if self.cuda else None
        self.pool.put(h.cpu, evt)

    def _unpack(self, obj: Any) -> torch.Tensor:
        if not isinstance(obj, _Handle):
            return obj  # type: ignore[no-any-return]
        t = self._ready(obj)
        obj.refs -= 1
        if obj.refs == 0:
            self._release(obj)
            obj.gpu = None
        return t
