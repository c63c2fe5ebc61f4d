"""``profile: layers``: forward/backward time and saved activations of every layer (torch engine).

After the measured window the job runs ``opt.profile_steps`` more steps with CUDA events
(``time.perf_counter`` on CPU) recorded by module hooks, and writes one
:class:`charllm.predict.profile.LayerProfile` (``profiles/{gpu}_tp{tp}_mb{mb}.json``).

How each number is taken, per micro batch (means over the profiled steps' micro batches: means
add up, so the parts make the mean micro batch and the mean profiled step exactly; memory: medians).
The marks telescope: the forward pieces cover the micro batch's start to the model's output
and the backward pieces the model's output to the next micro batch, without gaps, so the
layers add up to the micro batch as measured (host time between two blocks, which bounds an
eager launch-bound step, is charged to the block before it):

- block ``i``: each block is wrapped for the profiled steps in an uncompiled :class:`_Timed`
  module whose forward pre/post hooks mark its forward (a compiled block stays one graph: no
  event inside it). Its forward runs from its start to the next block's start (the last
  block: to its end); its backward from the moment the gradient of its output is ready to the
  moment the previous block's output gradient is (the first block: its input's gradient;
  tensor hooks); with recompute that includes the replayed forward.
  ``saved_activation_bytes``: allocated bytes after minus before its first forward (what it
  keeps for backward, its output included).
- embedding: from the micro batch's start (a pre-hook on the model) to block 0's forward, and
  from block 0's input gradient to the next micro batch (or the optimizer step): its backward,
  the gradient accumulation and the data of the next micro batch.
- head (final norm, output layer, loss): forward to the model's output (a post-hook), then
  the loss and the head's backward until the last block's output gradient is ready;
  ``saved_activation_bytes`` is the head's peak increase (logits, the float32 loss and its
  gradient are the largest transient of the step).
- optimizer step: optimizer pre/post step hooks. ``batch_time_s``: one micro batch whole.
- ``step_overhead_s``: the rest of the optimizer step, from the step's start to its first
  micro batch (zeroing gradients, the first batch's copy to the device) and from the
  optimizer's end to the step's end (the loss read back, the loop). With it the profile adds
  up to the step: ``grad_accum x layers + optimizer + overhead`` (``profiled_step_s``); the
  profiled steps' own time, start to end on the device's clock, is ``provenance.profiled_step_s``.

Parameter, gradient and optimizer bytes are what this rank holds per layer: fp32 master
weights (+ bf16 compute copies with FSDP2 mixed precision), fp32 gradients, AdamW's two
fp32 moments. Pipeline parallelism is refused (its schedule interleaves micro batches).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from charllm.predict.profile import LayerCost, LayerProfile


class _Clock:
    """CUDA events on a GPU, perf_counter on CPU; ``mark()`` returns a handle, ``span`` seconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pool: list[Any] = []

    def reserve(self, n: int) -> None:
        """Create ``n`` events up front: a mark then costs one record, no allocation."""
        if self.cuda:
            self.pool.extend(torch.cuda.Event(enable_timing=True) for _ in range(n))

    def mark(self) -> Any:
        if self.cuda:
            ev = self.pool.pop() if self.pool else torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def span(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b)) / 1e3
        return float(b - a)


class _Timed(nn.Module):
    """Holds one block for the profiled steps; its hooks mark the block's forward."""

    def __init__(self, block: nn.Module, index: int) -> None:
        super().__init__()
        self.block = block
        self.index = index

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.block(x, *args, **kwargs)  # type: ignore[no-any-return]


def _alloc(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


#: blocks timed one by one in each timed micro batch, in rotation (the stack is timed whole in
#: every micro batch). Each timed block costs a few host-side hooks and event records, about
#: 0.4 ms per block and micro batch on the H200 machines: timing all 24 blocks of an eager,
#: launch-bound micro batch made it ~20 % slower than unhooked (docs/gpu/predict-h200-run3.json)
SAMPLED_BLOCKS = 2


class LayerProfiler:
    """Hooks on one engine's model for a few steps; :meth:`result` builds the profile.

    Usable as a context manager more than once (the hooks are on only inside ``with``), so
    profiled steps can be interleaved with plain ones; :meth:`result` reads all of them.
    """

    def __init__(self, engine: Any, sampled_blocks: int = SAMPLED_BLOCKS) -> None:
        if getattr(engine, "schedule", None) is not None:
            raise ValueError("profile: layers needs pp = 1 (a pipeline schedule interleaves micro batches)")
        self.engine = engine
        self.device: torch.device = engine.device
        self.model: nn.Module = engine.stage_model
        self.clock = _Clock(self.device)
        self.handles: list[Any] = []
        self.mb_handles: list[Any] = []
        self.originals: dict[str, nn.Module] = {}
        self.wrappers: dict[int, _Timed] = {}
        layers: Any = self.model.layers
        self.ids = sorted(int(k) for k in layers)
        self.sampled_blocks = max(1, sampled_blocks)
        self._rotation = 0
        self.mb_marks: list[dict[str, Any]] = []  # one dict of marks per micro batch
        self.opt_marks: list[tuple[Any, Any]] = []
        # per profiled step: (start mark, index of its first micro batch, its optimizer marks, end mark)
        self.step_marks: list[tuple[Any, int, tuple[Any, Any], Any]] = []
        self._step_open: tuple[Any, int] | None = None
        self._opt_start: Any = None
        # memory probes (torch.cuda.memory_stats builds a dict per call) slow a launch-bound step:
        # the first profiled step probes memory (every block), the later ones are timed without probes
        self.probe_memory = True
        self.clock.reserve(64 * (4 * self.sampled_blocks + 12) + 8 * len(self.ids))

    # ---- which blocks a micro batch times ---------------------------------------------------
    def _timed_blocks(self, probe: bool) -> frozenset[int]:
        """Every block when probing memory; else ``sampled_blocks`` spread over the stack, rotating."""
        if probe:
            return frozenset(self.ids)
        n = len(self.ids)
        stride = max(1, -(-n // self.sampled_blocks))
        c = self._rotation % stride
        self._rotation += 1
        return frozenset(self.ids[p] for p in range(c, n, stride))

    def _hook_micro_batch(self, timed: frozenset[int]) -> None:
        """Hooks for this micro batch: the timed blocks, the block after each, the stack's ends."""
        for h in self.mb_handles:
            h.remove()
        self.mb_handles.clear()
        first, last = self.ids[0], self.ids[-1]
        pos = {b: k for k, b in enumerate(self.ids)}
        pre = set(timed) | {first} | {self.ids[pos[b] + 1] for b in timed if b != last}
        post = set(timed) | {last}
        for b in pre:
            self.mb_handles.append(self.wrappers[b].register_forward_pre_hook(self._block_pre))
        for b in post:
            self.mb_handles.append(self.wrappers[b].register_forward_hook(self._block_post))

    # ---- hooks ---------------------------------------------------------------------------
    def _cur(self) -> dict[str, Any]:
        return self.mb_marks[-1]

    def _model_pre(self, _mod: nn.Module, _args: Any) -> None:
        probe = self.probe_memory
        timed = self._timed_blocks(probe)
        self.mb_marks.append({"mb_start": self.clock.mark(), "calls": defaultdict(int), "probe": probe, "timed": timed})
        if probe:
            self._cur()["mem_start"] = _alloc(self.device)
        self._hook_micro_batch(timed)

    def _model_post(self, _mod: nn.Module, _args: Any, _out: Any) -> None:
        cur = self._cur()
        cur["root_end"] = self.clock.mark()
        if cur["probe"]:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            cur["mem_head_base"] = _alloc(self.device)

    def _block_pre(self, mod: nn.Module, args: Any) -> None:
        cur = self._cur()
        i = int(mod.index)  # type: ignore[arg-type]
        cur["calls"][i] += 1
        if cur["calls"][i] > 1:  # recompute replaying the forward inside backward
            return
        cur[f"f{i}"] = self.clock.mark()
        if cur["probe"]:
            cur[f"m{i}"] = _alloc(self.device)
        x = args[0]
        if (i in cur["timed"] or i == self.ids[0]) and isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(lambda g, i=i: self._grad_mark(f"gi{i}", g))

    def _block_post(self, mod: nn.Module, _args: Any, out: Any) -> None:
        cur = self._cur()
        i = int(mod.index)  # type: ignore[arg-type]
        if cur["calls"][i] > 1:
            return
        cur[f"fe{i}"] = self.clock.mark()
        if cur["probe"]:
            cur[f"me{i}"] = _alloc(self.device)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g, i=i: self._grad_mark(f"go{i}", g))

    def _grad_mark(self, key: str, grad: torch.Tensor) -> None:
        if self.mb_marks and key not in self._cur():
            self._cur()[key] = self.clock.mark()
            probe = self._cur()["probe"] and self.device.type == "cuda"
            if probe and key.startswith("go") and "head_peak" not in self._cur():
                self._cur()["head_peak"] = int(torch.cuda.max_memory_allocated(self.device))

    def _opt_pre(self, *_: Any) -> None:
        self._opt_start = self.clock.mark()

    def _opt_post(self, *_: Any) -> None:
        self.opt_marks.append((self._opt_start, self.clock.mark()))
        if self.mb_marks:
            self.mb_marks[-1].setdefault("next", self._opt_start)

    def begin_step(self) -> None:
        """Mark an optimizer step's start (call right before ``engine.step``)."""
        self._step_open = (self.clock.mark(), len(self.mb_marks))

    def end_step(self) -> None:
        """Mark its end (call right after ``engine.step``, before the device sync)."""
        if self._step_open is None or not self.opt_marks:
            return
        start, first_mb = self._step_open
        self._step_open = None
        if first_mb < len(self.mb_marks):
            self.step_marks.append((start, first_mb, self.opt_marks[-1], self.clock.mark()))
            self.mb_marks[-1].setdefault("next", self.opt_marks[-1][0])

    def __enter__(self) -> LayerProfiler:
        layers: Any = self.model.layers
        for key in list(layers.keys()):
            block = layers[key]
            self.originals[key] = block
            if int(key) not in self.wrappers:
                self.wrappers[int(key)] = _Timed(block, int(key))
            layers[key] = self.wrappers[int(key)]
        self.handles.append(self.model.register_forward_pre_hook(self._model_pre))
        self.handles.append(self.model.register_forward_hook(self._model_post))
        opt = self.engine.optimizer
        self.handles.append(opt.register_step_pre_hook(self._opt_pre))
        self.handles.append(opt.register_step_post_hook(self._opt_post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles + self.mb_handles:
            h.remove()
        self.handles.clear()
        self.mb_handles.clear()
        layers: Any = self.model.layers
        for key, block in self.originals.items():
            layers[key] = block

    # ---- the result ----------------------------------------------------------------------
    def result(self, step_time_s: float = 0.0, max_memory_allocated_bytes: int = 0) -> LayerProfile:
        """Means over the recorded micro batches (call after the steps and a device sync)."""
        cell = self.engine.cell
        ids = self.ids
        span = self.clock.span
        # the next micro batch's start closes the previous one's embedding backward (same step)
        step_starts = {first_mb for _, first_mb, _, _ in self.step_marks}
        for n, (a, b) in enumerate(zip(self.mb_marks, self.mb_marks[1:], strict=False)):
            if n + 1 not in step_starts:
                a.setdefault("next", b["mb_start"])
        first, last = ids[0], ids[-1]
        pos = {b: k for k, b in enumerate(ids)}
        stack = ["next", "root_end", f"f{first}", f"fe{last}", f"go{last}", f"gi{first}"]

        def fwd_end(i: int) -> str:
            """A timed block's forward ends where the next block starts (the last: at its end)."""
            return f"f{ids[pos[i] + 1]}" if i != last else f"fe{i}"

        def complete(m: dict[str, Any]) -> bool:
            return all(k in m for k in stack) and all(
                k in m for i in m["timed"] for k in (f"f{i}", fwd_end(i), f"go{i}", f"gi{i}")
            )

        done = [m for m in self.mb_marks if complete(m)]
        probed = [m for m in done if m["probe"]]
        mbs = [m for m in done if not m["probe"]] or probed  # one profiled step: its probed times
        if not mbs or not probed:
            raise RuntimeError("no complete micro batch was profiled")
        cols: dict[str, list[float]] = defaultdict(list)
        acts: dict[str, list[int]] = defaultdict(list)
        for m in mbs:
            cols["emb_f"].append(span(m["mb_start"], m[f"f{first}"]))
            cols["emb_b"].append(span(m[f"gi{first}"], m["next"]))
            cols["head_f"].append(span(m[f"fe{last}"], m["root_end"]))
            cols["head_b"].append(span(m["root_end"], m[f"go{last}"]))
            cols["stack_f"].append(span(m[f"f{first}"], m[f"fe{last}"]))
            cols["stack_b"].append(span(m[f"go{last}"], m[f"gi{first}"]))
            cols["batch"].append(span(m["mb_start"], m["next"]))
            for i in m["timed"]:
                # host time between two blocks is the first one's
                cols[f"f{i}"].append(span(m[f"f{i}"], m[fwd_end(i)]))
                cols[f"b{i}"].append(span(m[f"go{i}"], m[f"gi{i}"]))
        for m in probed:
            acts["emb"].append(m[f"m{first}"] - m["mem_start"])
            if "head_peak" in m:
                acts["head"].append(m["head_peak"] - m["mem_head_base"])
            for i in ids:
                acts[f"a{i}"].append(m[f"me{i}"] - m[f"m{i}"])

        def mean(key: str) -> float:  # means: the parts must add up to the whole
            return float(statistics.fmean(cols[key]))

        def amed(key: str) -> int:
            v = acts.get(key) or [0]
            return max(0, int(statistics.median(v)))

        def shares(kind: str, total: float) -> dict[int, float]:
            """The stack's time split by the timed blocks' means (a block never timed: their mean)."""
            own = {i: mean(f"{kind}{i}") for i in ids if cols.get(f"{kind}{i}")}
            typical = statistics.fmean(own.values()) if own else 1.0
            raw = {i: own.get(i, typical) for i in ids}
            tot = math.fsum(raw.values())
            return {i: total * v / tot if tot > 0 else total / len(ids) for i, v in raw.items()}

        fwd = shares("f", mean("stack_f"))
        bwd = shares("b", mean("stack_b"))
        model = self.model
        emb_params = self._params_of(model, ("tok_emb", "pos_emb"))
        head_params = self._params_of(model, ("norm", "output"))
        layers = [self._cost("embedding", "embedding", mean("emb_f"), mean("emb_b"), amed("emb"), emb_params)]
        for i in ids:
            blk = self.originals[str(i)]
            layers.append(self._cost(f"block.{i}", "block", fwd[i], bwd[i], amed(f"a{i}"), list(blk.parameters())))
        layers.append(self._cost("head", "head", mean("head_f"), mean("head_b"), amed("head"), head_params))
        timed_steps = [s for s in self.step_marks if not self.mb_marks[s[1]]["probe"]] or self.step_marks
        overheads = [span(a, self.mb_marks[k]["mb_start"]) + span(o[1], b) for a, k, o, b in timed_steps]
        step_walls = [span(a, b) for a, _, _, b in timed_steps]
        opt = [o for _, _, o, _ in timed_steps] or self.opt_marks  # the timed steps' (no memory probes)
        opt_s = float(statistics.fmean(span(a, b) for a, b in opt)) if opt else 0.0
        return LayerProfile(
            gpu_type=cell.gpu_type,
            tp=cell.parallel.tp,
            micro_batch=cell.micro_batch,
            seq_len=cell.seq_len,
            precision=cell.precision,
            recompute=(cell.opt.recompute_granularity if cell.opt.recompute else "none"),
            compile=bool(cell.opt.compile),
            engine=cell.engine,
            model=cell.model,
            layers=tuple(layers),
            optimizer_step_s=opt_s,
            batch_time_s=mean("batch"),
            step_overhead_s=max(0.0, float(statistics.fmean(overheads))) if overheads else 0.0,
            step_time_s=step_time_s,
            grad_accum=cell.grad_accum,
            max_memory_allocated_bytes=max_memory_allocated_bytes,
            source="measured",
            provenance={
                "cell_id": cell.cell_id,
                "micro_batches_profiled": len(mbs),
                "blocks_timed_per_micro_batch": min(self.sampled_blocks, len(ids)),
                "steps_profiled": len(timed_steps),
                "profiled_step_s": float(statistics.fmean(step_walls)) if step_walls else 0.0,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "method": "charllm.train.layer_profile (CUDA events via module and tensor hooks; the stack "
                "whole in every micro batch, blocks in rotation, telescoping)",
                "params_dtype": "bf16 compute copies + fp32 master"
                if getattr(self.engine, "bf16_params", False) or cell.parallel.fsdp
                else "fp32",
            },
        )

    def _params_of(self, model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
        """The parameters of ``model``'s submodules ``names`` that this stage holds."""
        out: list[nn.Parameter] = []
        for name in names:
            mod = getattr(model, name, None)
            if mod is not None:
                out.extend(mod.parameters())
        return out

    def _cost(
        self, name: str, kind: str, fwd_s: float, bwd_s: float, act: int, params: list[nn.Parameter]
    ) -> LayerCost:
        n = 0
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            n += int(local.numel())
        mixed = bool(getattr(self.engine, "bf16_params", False) or self.engine.cell.parallel.fsdp)
        master = 4  # fp32 master weights in both precisions
        return LayerCost(
            name=name,
            kind=kind,
            fwd_s=max(0.0, fwd_s),
            bwd_s=max(0.0, bwd_s),
            saved_activation_bytes=act,
            params=n,
            param_bytes=n * (master + (2 if mixed else 0)),
            grad_bytes=n * 4,
            optimizer_bytes=n * 8,
        )


def profile_layers(
    engine: Any, first_step: int, steps: int, step_time_s: float = 0.0, max_mem: int = 0
) -> LayerProfile:
    """Run ``steps`` + 1 optimizer steps of ``engine`` under the hooks; return the profile."""
    with LayerProfiler(engine) as prof:
        for i in range(max(1, steps) + 1):  # the first step probes memory, the others are timed
            prof.probe_memory = i == 0
            prof.begin_step()
            engine.step(first_step + i)
            prof.end_step()
            engine.sync()
    return prof.result(step_time_s, max_mem)


def profile_in_job(engine: Any, first_step: int, steps: int, out_dir: Any, step_time_s: float) -> Any:
    """``profile: layers`` in the job: every rank runs the profiled steps; dp/tp rank 0 writes
    ``out_dir/profiles/{gpu}_tp{tp}_mb{mb}.json``. Returns the path written (None elsewhere)."""
    from pathlib import Path

    dev = engine.device
    mem = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0
    prof = profile_layers(engine, first_step, steps, step_time_s=step_time_s, max_mem=mem)
    if getattr(engine, "profiles", True):
        return prof.write(Path(out_dir) / "profiles")
    return None
