"""The 1F1B instruction DAG, the all-maximum-frequency baseline and the time-energy frontier.

A pipeline iteration is a DAG of instructions (Perseus, SOSP'24): stage ``s`` runs its
forwards and backwards in 1F1B order (``s' = S - s - 1`` warm-up forwards, then one forward
and one backward alternately, then the cool-down backwards); forward ``(s, m)`` waits for
forward ``(s-1, m)``; backward ``(s, m)`` waits for backward ``(s+1, m)`` (the last stage's
for its own forward). Each instruction runs at an SM frequency with a profiled (time,
energy). While a GPU waits (point-to-point blocking, pipeline bubbles) it draws the P2P
blocking power, so the iteration's energy at plan ``x`` is

    E(x) = sum_i e_i(x) + P_block * (S * T(x) - sum_i t_i(x)).

Times are quantised to ``unit_s`` (``floor(t / unit_s)``, as lowtime does). The frontier
comes from ``lowtime`` (PyPI, Apache-2.0; the ``energy`` extra): Phillips-Dessouky min-cut
iterations on an exponential fit ``a * exp(b t) + c`` of each instruction's Pareto-optimal
(time, energy) options, each iteration one time unit faster. Its energies are the fitted
model's; ``energy_profiled`` recomputes each plan from the profile's own numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Profile = Mapping[tuple[int, str], Mapping[int, tuple[float, float]]]
Key = tuple[int, str, int]  # (stage, instruction, micro batch)


def onef1b_order(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """Stage ``stage``'s instructions in 1F1B order: ``[("forward", 0), ..., ("backward", m-1)]``."""
    warm = min(stages - stage - 1, micro_batches)
    seq = [("forward", i) for i in range(warm)]
    f, b = warm, 0
    while f < micro_batches:
        seq.append(("forward", f))
        f += 1
        seq.append(("backward", b))
        b += 1
    seq.extend(("backward", i) for i in range(b, micro_batches))
    return seq


def dependency(stages: int, key: Key) -> Key | None:
    """The instruction of another stage (or the last stage's forward) that ``key`` waits for."""
    s, ins, m = key
    if ins == "forward":
        return (s - 1, "forward", m) if s > 0 else None
    return (s + 1, "backward", m) if s < stages - 1 else (s, "forward", m)


@dataclass
class Schedule:
    """Start and end of every instruction when each runs as soon as it may."""

    stages: int
    micro_batches: int
    start: dict[Key, float] = field(default_factory=dict)
    end: dict[Key, float] = field(default_factory=dict)

    @property
    def time(self) -> float:
        return max(self.end.values())

    def busy(self, stage: int) -> float:
        return sum(e - self.start[k] for k, e in self.end.items() if k[0] == stage)


def simulate(stages: int, micro_batches: int, duration: Callable[[int, str, int], float]) -> Schedule:
    """Run the 1F1B DAG with ``duration(stage, instruction, micro_batch)``: earliest start times."""
    seqs = [onef1b_order(stages, micro_batches, s) for s in range(stages)]
    pos, free = [0] * stages, [0.0] * stages
    sched = Schedule(stages, micro_batches)
    left = 2 * stages * micro_batches
    while left:
        moved = False
        for s in range(stages):
            while pos[s] < len(seqs[s]):
                ins, m = seqs[s][pos[s]]
                dep = dependency(stages, (s, ins, m))
                if dep is not None and dep not in sched.end:
                    break
                t0 = max(free[s], sched.end[dep] if dep is not None else 0.0)
                t1 = t0 + duration(s, ins, m)
                sched.start[(s, ins, m)], sched.end[(s, ins, m)] = t0, t1
                free[s] = t1
                pos[s] += 1
                left -= 1
                moved = True
        if not moved:  # cannot happen for a valid 1F1B order; guards a future schedule
            raise RuntimeError("the instruction DAG has a cycle")
    return sched


def stages_of(profile: Profile) -> int:
    return 1 + max(s for s, _ in profile)


def quantise(t: float, unit_s: float) -> float:
    return math.floor(t / unit_s + 1e-9) * unit_s


@dataclass(frozen=True)
class Baseline:
    time: float
    energy: float
    idle_s: float  # summed over stages


def all_max(profile: Profile, micro_batches: int, p2p_w: float, unit_s: float = 0.001) -> Baseline:
    """Every instruction at its highest profiled frequency: iteration time and energy."""
    stages = stages_of(profile)
    top = {k: v[max(v)] for k, v in profile.items()}
    sched = simulate(stages, micro_batches, lambda s, i, m: quantise(top[(s, i)][0], unit_s))
    busy = sum(sched.busy(s) for s in range(stages))
    idle = stages * sched.time - busy
    energy = sum(e * micro_batches for _, e in top.values()) + p2p_w * idle
    return Baseline(sched.time, energy, idle)


def all_max_energy_at(profile: Profile, micro_batches: int, p2p_w: float, time_s: float) -> float:
    """The all-maximum-frequency iteration's energy over ``time_s`` (Perseus Table 6's baseline).

    Every instruction at its highest profiled frequency with its profiled (unquantised) time and
    energy, and every GPU of the pipeline drawing the P2P blocking power for the rest of the
    iteration: ``sum_i e_i + P_block * (S * T - sum_i t_i)``. Table 6 compares at the same
    iteration time, ``T`` = the frontier's minimum iteration time (Perseus does not slow training).
    """
    stages = stages_of(profile)
    top = [v[max(v)] for v in profile.values()]
    busy = sum(t for t, _ in top) * micro_batches
    if stages * time_s < busy:
        raise ValueError(f"iteration time {time_s} s is shorter than the all-max busy time per stage")
    return sum(e for _, e in top) * micro_batches + p2p_w * (stages * time_s - busy)


def intrinsic_saving(profile: Profile, micro_batches: int, p2p_w: float, time_s: float, energy: float) -> float:
    """Perseus's intrinsic energy saving (%): the frontier's energy at its minimum iteration time
    ``time_s`` against :func:`all_max_energy_at` over the same time (reproduces the paper's Table 6)."""
    return saving(all_max_energy_at(profile, micro_batches, p2p_w, time_s), energy)


def saving(baseline_energy: float, energy: float) -> float:
    """Energy saved against the baseline, in percent."""
    return (baseline_energy - energy) / baseline_energy * 100.0


@dataclass(frozen=True)
class FrontierPoint:
    time: float  # s
    energy: float  # J, the fitted cost model's (as the Perseus artifact's frontier files)
    energy_profiled: float  # J, the same plan from the profile's measured numbers
    plan: dict[Key, int]  # frequency (MHz) of every instruction


def frontier(
    profile: Profile,
    micro_batches: int,
    p2p_w: float,
    unit_s: float = 0.001,
    keep_plans: bool = True,
) -> Iterator[FrontierPoint]:
    """The time-energy frontier, slowest plan first, down to the minimum iteration time.

    Needs ``lowtime`` (``pip install 'charllm[energy]'``).
    """
    try:
        import networkx as nx
        from lowtime.cost_model import ExponentialModel
        from lowtime.operation import CandidateExecutionOptions, DummyOperation, ExecutionOption, OperationSpec
        from lowtime.perseus.instruction import Backward, Forward
        from lowtime.solver import PhillipsDessouky
    except ImportError as err:
        raise RuntimeError(
            f"the frontier planner needs lowtime ({err}): pip install -c requirements.lock -e '.[energy]'"
        ) from None
    stages = stages_of(profile)
    specs: dict[tuple[int, str], Any] = {}
    for key, opts in profile.items():
        cand = CandidateExecutionOptions(
            options=[ExecutionOption(real_time=t, unit_time=unit_s, cost=e, knob=f) for f, (t, e) in opts.items()]
        )
        specs[key] = OperationSpec(options=cand, cost_model=ExponentialModel(cand))
    dag = nx.DiGraph()
    dag.add_node(0, op=DummyOperation())
    ids: dict[Key, int] = {}
    for s in range(stages):
        for ins, m in onef1b_order(stages, micro_batches, s):
            cls = Forward if ins == "forward" else Backward
            ids[(s, ins, m)] = len(ids) + 1
            dag.add_node(ids[(s, ins, m)], op=cls(spec=specs[(s, ins)], stage_id=s, micro_batch_id=m))
    sink = len(ids) + 1
    dag.add_node(sink, op=DummyOperation())
    for s in range(stages):
        seq = [(s, i, m) for i, m in onef1b_order(stages, micro_batches, s)]
        dag.add_edge(0, ids[seq[0]])
        dag.add_edge(ids[seq[-1]], sink)
        for a, b in itertools.pairwise(seq):
            dag.add_edge(ids[a], ids[b])
    for ikey, node in ids.items():
        dep = dependency(stages, ikey)
        if dep is not None:
            dag.add_edge(ids[dep], node)
    dag.graph["source_node"], dag.graph["sink_node"] = 0, sink
    ops = {k: dag.nodes[n]["op"] for k, n in ids.items()}
    for result in PhillipsDessouky(dag).run():
        busy_units = sum(op.duration for op in ops.values())
        idle = (stages * result.quant_time - busy_units) * unit_s
        plan = {k: int(op.assigned_knob) for k, op in ops.items()}
        measured = sum(profile[(k[0], k[1])][f][1] for k, f in plan.items())
        yield FrontierPoint(
            time=result.quant_time * unit_s,
            energy=result.cost + p2p_w * idle,
            energy_profiled=measured + p2p_w * idle,
            plan=plan if keep_plans else {},
        )
