"""Kwai / PCIe figures and tables, drawn from the studies' published numbers.

- Megatron-Kwai's Figure 7 (``../shared/seeds/megatron-kwai-atc24-README.md``): Llama-65B,
  s = 8192, TP2 CP2 PP8, ``max_memory_allocated`` after the 2nd iteration per alpha for ckpt=no
  (OOM below alpha 0.3) and ckpt=ours;
- its minimum demo table: Llama-7B s = 12288 on 4 H800, tokens/s/GPU of baseline (full ckpt),
  ours (alpha 0.10), and no ckpt (OOM);
- the PCIe study's rows (``tests/data/pcie-strategies``) as cells of a campaign.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from charllm.analysis import figures_kwai as fk
from charllm.analysis.scaling import DERIVED_COLUMNS, scaling_table, study_as_cells
from charllm.modelcat import get
from charllm.train.flops import causal_model_flops_per_token, model_flops_per_token

STUDY_MEGATRON = "single-tp-dpp-pp-experiment-results.csv"
STUDY_ZERO = "simple-single-and-zero-experiment-results.csv"
ALPHAS = [i / 10 for i in range(11)]
FIG7_OURS = [65330982400, 62128631296, 58907405824, 55554059776, 52089073152, 48604098048,
             45722611200, 42832735744, 38925740032, 36144916480, 32462145024]  # fmt: skip
FIG7_NO = [None, None, None, 72762730496, 66951784960, 61136119808, 55733856256, 50331592704,
           45824813056, 39527328256, 34491172352]  # fmt: skip


def _fig7_summary() -> pd.DataFrame:
    rows = []
    for mode, mems in (("none", FIG7_NO), ("kwai", FIG7_OURS)):
        for a, m in zip(ALPHAS, mems, strict=True):
            rows.append(
                {
                    "cell_name": f"llama-65b-tp2pp8cp2-{mode}-a{a:.1f}",
                    "model": "llama-65b",
                    "seq_len": 8192,
                    "layout": "TP2PP8CP2",
                    "recompute_mode": mode,
                    "offload_alpha": a,
                    "outcome": "ok" if m is not None else "oom",
                    "max_memory_allocated_step2_bytes": float(m) if m is not None else np.nan,
                }
            )
    return pd.DataFrame(rows)


def test_memory_alpha_reproduces_kwai_figure7(tmp_path: Path) -> None:
    s = _fig7_summary()
    assert fk.has_alpha_sweep(s) and fk.memory_column(s) == "max_memory_allocated_step2_bytes"
    paths = fk.memory_alpha_figure(s, tmp_path, "Kwai Figure 7")
    assert {p.name for p in paths} == {"memory_alpha.png", "memory_alpha.pdf", "memory_alpha.csv"}
    data = pd.read_csv(tmp_path / "memory_alpha.csv")
    assert len(data) == 22 and (data["outcome"] == "oom").sum() == 3  # OOM cells stay, hatched
    oom = data[data["outcome"] == "oom"]
    assert set(oom["offload_alpha"]) == {0.0, 0.1, 0.2} and oom["value"].isna().all()
    kw = data[(data["recompute_mode"] == "kwai") & (data["offload_alpha"] == 0.0)].iloc[0]
    assert kw["value"] == pytest.approx(65330982400 / 2**30, rel=1e-12)
    r2 = data.groupby("recompute_mode")["fit_r2"].first()
    slope = data.groupby("recompute_mode")["fit_slope_per_alpha"].first()
    print(f"Kwai Figure 7: R^2 {r2.to_dict()}, slope GiB per unit alpha {slope.to_dict()}")
    assert (r2 >= 0.98).all()  # the linearity check, met by the published numbers
    assert slope["none"] < slope["kwai"] < 0  # without recompute, more to offload per alpha


def test_kwai_table_from_the_published_demo(tmp_path: Path) -> None:
    m, s = get("llama-7b"), 12288
    rows = []
    for mode, alpha, tok in (("full", 0.0, 6639), ("kwai", 0.10, 8273), ("none", 0.0, None)):
        ok = tok is not None
        rows.append(
            {
                "cell_name": f"llama-7b-pp4-{mode}-a{alpha}",
                "model": "llama-7b",
                "seq_len": s,
                "layout": "TP1PP4",
                "recompute_mode": mode,
                "offload_alpha": alpha,
                "outcome": "ok" if ok else "oom",
                "tokens_per_s_per_gpu": float(tok) if ok else np.nan,
                # what the job's step_metrics writes for an H800-class peak (989 TFLOP/s)
                "mfu_causal": causal_model_flops_per_token(m, s) * tok / 989e12 if ok else np.nan,
                "mfu": model_flops_per_token(m, s) * tok / 989e12 if ok else np.nan,
            }
        )
    paths = fk.kwai_table_figure(pd.DataFrame(rows), tmp_path, "Kwai minimum demo (H800)")
    assert {p.name for p in paths} >= {"kwai_table.png", "kwai_table.csv", "kwai_table.md"}
    t = pd.read_csv(tmp_path / "kwai_table.csv")
    assert t["method"].tolist() == ["none", "kwai, alpha=0.10", "full"]  # mode order, then alpha
    by = t.set_index("recompute_mode")
    assert round(by.loc["kwai", "mfu_causal_pct"], 1) == 41.2 and round(by.loc["full", "mfu_causal_pct"], 1) == 33.1
    assert by.loc["kwai", "speedup_vs_full"] == pytest.approx(8273 / 6639)  # Kwai: 1.25x
    assert by.loc["none", "outcome"] == "oom" and np.isnan(by.loc["none", "tokens_per_s_per_gpu"])
    assert bool(by.loc["kwai", "smallest_fitting_alpha"]) and not bool(by.loc["none", "smallest_fitting_alpha"])
    md = (tmp_path / "kwai_table.md").read_text()
    print(md)
    assert "| OOM |" in md and "1.25x" in md


def _pcie_cells(name: str = STUDY_MEGATRON) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The PCIe study's raw rows as cells of a campaign (one measured 'step' = the whole run)."""
    raw = pd.read_csv(Path(__file__).resolve().parents[1] / "data" / "pcie-strategies" / name)
    return study_as_cells(raw), raw


def test_scaling_figures_and_table_from_the_study_as_cells(tmp_path: Path) -> None:
    for name, strategies in (
        (STUDY_ZERO, {"single_gpu", "zero1", "zero2", "zero3", "zero3_offload"}),
        (STUDY_MEGATRON, {"single_gpu", "ddp", "tp", "pp"}),
    ):
        cells, raw = _pcie_cells(name)
        table = scaling_table(cells)  # from_cells + derive: the same numbers as the study's CSV
        names = raw["model_size"] + "-" + raw["strategy"] + "-" + raw["num_devices"].astype(str)
        got = table.set_index("cell_name").loc[names]
        for col in DERIVED_COLUMNS:
            np.testing.assert_allclose(got[col].to_numpy(float), raw[col].to_numpy(float), rtol=1e-9, atol=1e-9)
        assert set(table["strategy"]) == strategies
    assert fk.scaling_models(cells) == [f"pcie-{m}" for m in ("100m", "10m", "1b", "300m", "500m")]
    paths = fk.scaling_figures(cells[cells["model"].isin(["pcie-1b", "pcie-10m"])], tmp_path, "pcie")
    assert sorted({p.stem for p in paths}) == ["scaling_pcie-10m", "scaling_pcie-1b"]
    one_b = pd.read_csv(tmp_path / "scaling_pcie-1b.csv")
    eff = one_b[(one_b["metric"] == "throughput_efficiency_percent") & (one_b["series"] == "ddp")]
    assert set(one_b["group"]) == {"1 GPU", "2 GPUs", "4 GPUs"}
    assert sorted(eff["value"].round(1)) == [6.9, 72.9]  # REFERENCE.md: DDP2 72.9 %, DDP4 6.9 %


def test_draw_all_draws_them_where_they_apply(tmp_path: Path) -> None:
    """Through the figure registry: an alpha sweep gets the memory figure and Kwai's table, no scaling."""
    from charllm.analysis.figures import FIGURES, FigureData, cell_summary, draw_all

    assert [s for s in FIGURES if s in ("memory_alpha", "throughput_alpha", "kwai_table", "scaling")] == [
        "memory_alpha",
        "throughput_alpha",
        "kwai_table",
        "scaling",
    ]
    cells = _fig7_summary()
    # the rest of a cells row as Kwai ran Figure 7: 256 GPUs, TP2 CP2 PP8 (DP 8), micro batch 1, global 256
    more = {"repeat": 0, "world_size": 256, "tp": 2, "pp": 8, "cp": 2, "dp": 8, "micro_batch": 1, "global_batch": 256}
    cells = cells.assign(cell_id=cells["cell_name"], opt_code=cells["recompute_mode"], **more)
    kw = dict(gpus=pd.DataFrame(), kernels=pd.DataFrame(), references=[], schedule=None, report=False)
    stems = {p.stem for p in draw_all(cells, pd.DataFrame(), tmp_path, "kwai-fig7", **kw)}
    print(sorted(stems))
    assert {"memory_alpha", "kwai_table"} <= stems
    assert "throughput_alpha" not in stems and not any(s.startswith("scaling_") for s in stems)
    pcie, _ = _pcie_cells()
    # the PCIe rows: scaling applies, the Kwai figures do not (predicates only: drawing is tested above)
    pcie = pcie.assign(cell_id=pcie["cell_name"], micro_batch=1, global_batch=1, opt_code="00000")
    d = FigureData("pcie", tmp_path, pcie, pd.DataFrame(), cell_summary(pcie), pd.DataFrame(), pd.DataFrame(), None, {})
    applies = {s for s in ("memory_alpha", "throughput_alpha", "kwai_table", "scaling") if FIGURES[s].applies_to(d)}
    assert applies == {"scaling"}


def test_scaling_figure_leaves_out_what_was_not_measured(tmp_path):
    """A CPU run has no device memory: no empty panel, and its ranks are not called GPUs; a model
    with nothing measured gets no figure at all (it used to divide by zero)."""
    import pandas as pd

    from charllm.analysis.figures_kwai import scaling_figures

    rows = [
        {"cell_id": f"c{n}", "cell_name": f"tiny-dp{n}", "repeat": 0, "model": "tiny", "gpu_type": "cpu",
         "world_size": n, "dp": n, "tp": 1, "pp": 1, "outcome": "ok", "tokens_per_s": 1000.0 * n ** 0.5,
         "step_time_median_s": 0.1 * n ** 0.5, "global_batch": 8, "seq_len": 64, "measured_steps": 8}
        for n in (1, 2)
    ]  # fmt: skip
    paths = scaling_figures(pd.DataFrame(rows), tmp_path, "demo")
    csv = pd.read_csv(next(p for p in paths if p.suffix == ".csv"))
    print(csv[["group", "metric"]].drop_duplicates().to_string())
    assert set(csv["group"]) == {"1 rank", "2 ranks"}
    assert "peak_memory_scaling_factor" not in set(csv["metric"])  # no memory measured on a CPU
    blank = pd.DataFrame([{**r, "tokens_per_s": float("nan"), "step_time_median_s": float("nan")} for r in rows])
    assert scaling_figures(blank, tmp_path / "blank", "demo") == []
