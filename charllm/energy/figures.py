"""Figures of ``charllm energy-plan``: the time-energy frontier and a stage timeline (Gantt).

Matplotlib only (the ``analysis`` extra), Agg backend, PNG files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from charllm.energy.planner import FrontierPoint, Profile, Schedule, quantise, simulate


def frontier_figure(points: Sequence[FrontierPoint], path: Path, baseline: tuple[float, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.time for p in points], [p.energy for p in points], "-", label="frontier (fitted cost)")
    ax.plot([p.time for p in points], [p.energy_profiled for p in points], ":", label="frontier (profiled)")
    if baseline is not None:
        ax.plot([baseline[0]], [baseline[1]], "o", color="C3", label="all max frequency")
    ax.set_xlabel("iteration time (s)")
    ax.set_ylabel("iteration energy (J)")
    ax.set_title("Time-energy frontier")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gantt_figure(
    profile: Profile, micro_batches: int, plan: dict[tuple[int, str, int], int], path: Path, unit_s: float = 0.001
) -> tuple[Path, Schedule]:
    """Instructions of one iteration under ``plan`` on a per-stage timeline, coloured by power (W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    stages = 1 + max(s for s, _ in profile)

    def te(s: int, i: str, m: int) -> tuple[float, float]:
        return profile[(s, i)][plan[(s, i, m)]]

    sched = simulate(stages, micro_batches, lambda s, i, m: quantise(te(s, i, m)[0], unit_s))
    powers = {k: te(*k)[1] / te(*k)[0] for k in sched.start}
    norm = colors.Normalize(min(powers.values()), max(powers.values()))
    cmap = matplotlib.colormaps["plasma"]
    fig, ax = plt.subplots(figsize=(10, 0.6 * stages + 1.5))
    for k, t0 in sched.start.items():
        s, ins, _m = k
        ax.barh(s, sched.end[k] - t0, left=t0, color=cmap(norm(powers[k])), edgecolor="black", linewidth=0.3,
                hatch="//" if ins == "backward" else None)  # fmt: skip
    ax.set_yticks(range(stages))
    ax.set_yticklabels([f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s); hatched: backward")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="power (W)")
    ax.set_title(f"1F1B timeline, {micro_batches} micro batches, iteration {sched.time:.3f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, sched
