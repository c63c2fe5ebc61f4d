"""Figures of the replayed campaign: every one is drawn, and the numbers each one shows are checked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from charllm.analysis.figures import PANELS, cell_summary, draw_all, pareto_front
from charllm.catalog import Catalog
from charllm.runner import CampaignRunner

from .conftest import DRIFT_CELL, RENAMED_HOST

FSDP = "gpt3-1.3b-tp1pp1dp2-fsdp-mb8-gb64-s2048-01000"
OOM = "gpt3-1.3b-tp1pp1dp1-mb32-gb32-s2048-01000"
STEMS = (
    "throughput",
    "loss",
    "fig4_parallelism",
    "fig8_optimisations",
    "fig13_microbatch",
    "heatmap_temperature",
    "heatmap_links",
    "fig15_kernels",
    "pareto",
    "drift",
)


@pytest.fixture(scope="module")
def drawn(replay_module, tmp_path_factory):
    rp, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    steps = pd.read_parquet(info["steps_table"])
    out = tmp_path_factory.mktemp("figs")
    # the runner's call: no per-GPU table, references or schedule passed; all found from the tables/campaign
    paths = draw_all(cells, steps, out, "replay")
    return rp, info, out, paths


def _csv(out, stem):
    return pd.read_csv(out / f"{stem}.csv")


def test_every_figure_is_drawn_as_png_pdf_and_data(drawn):
    _, _, out, paths = drawn
    names = {p.name for p in paths}
    for stem in STEMS:
        for ext in ("png", "pdf", "csv"):
            assert f"{stem}.{ext}" in names, f"{stem}.{ext}"
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"{stem}.png").stat().st_size > 5000
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    assert out / "report.md" in paths
    assert all(p.parent == out for p in paths)


def test_heatmap_has_one_column_per_gpu_labelled_host_slot(drawn):
    rp, info, out, _ = drawn
    h = _csv(out, "heatmap_temperature")
    assert sorted(h["gpu"].unique()) == [f"{RENAMED_HOST}:0", f"{RENAMED_HOST}:1", "vm:0"]
    assert h["cell_name"].nunique() == len(rp.lc.cells)  # one row per cell, the OOM one included
    gpus = pd.read_parquet(info["gpus_table"])
    fsdp = rp.cell(FSDP).cell_id
    for slot in (0, 1):
        v = h[(h["cell_name"] == FSDP) & (h["gpu"] == f"{RENAMED_HOST}:{slot}") & (h["metric"] == "peak_gpu_temp_c")]
        want = gpus[(gpus["cell_id"] == fsdp) & (gpus["gpu_index"] == slot)]["peak_gpu_temp_c"].iloc[0]
        assert v["value"].iloc[0] == want
    assert h[(h["cell_name"] == FSDP) & (h["gpu"] == "vm:0")]["value"].isna().all()  # not a GPU of that cell
    assert (h[h["cell_name"] == OOM]["outcome"] == "oom").all()
    links = _csv(out, "heatmap_links")
    nv = links[(links["cell_name"] == FSDP) & (links["metric"] == "nvlink_gb")].set_index("gpu")["value"]
    g = gpus[gpus["cell_id"] == fsdp].set_index("gpu_index")
    assert nv[f"{RENAMED_HOST}:1"] == pytest.approx((g.loc[1, "nvlink_tx_bytes"] + g.loc[1, "nvlink_rx_bytes"]) / 1e9)
    assert links[(links["gpu"] == "vm:0") & (links["metric"] == "nvlink_gb")]["value"].isna().all()  # H100 PCIe box


def test_oom_cells_are_marked_not_dropped(drawn):
    _, _, out, _ = drawn
    for stem in ("fig4_parallelism", "fig13_microbatch"):
        d = _csv(out, stem)
        oom = d[d["cell_name"] == OOM]
        assert len(oom) == 6 and (oom["outcome"] == "oom").all() and oom["value"].isna().all(), stem
    tp = _csv(out, "throughput").set_index("cell_name")
    assert tp.loc[OOM, "outcome"] == "oom"
    assert _csv(out, "pareto").set_index("cell_name").loc[OOM, "outcome"] == "oom"


def test_panel_values(drawn):
    rp, info, out, _ = drawn
    cells = pd.read_parquet(info["cells_table"])
    f4 = _csv(out, "fig4_parallelism")
    assert set(f4["cell_name"]) == {c.name for c in rp.lc.cells if c.opt_code == "01000"}
    fsdp_row = cells[cells["cell_name"] == FSDP].iloc[0]
    v = f4[(f4["cell_name"] == FSDP)].set_index("metric")["value"]
    for m in ("avg_gpu_temp_c", "peak_power_w", "efficiency_samples_per_s_mj"):
        assert v[m] == pytest.approx(fsdp_row[m])
    f8 = _csv(out, "fig8_optimisations")
    assert sorted(f8["series"].astype(str).str.zfill(5).unique()) == ["00000", "01000", "10000", "11000"]
    f13 = _csv(out, "fig13_microbatch")
    eff = f13[f13["metric"] == "efficiency_samples_per_s_mj"].set_index("series")["value"]
    assert eff[8] == 1.0 and eff[16] == pytest.approx(1.0) and math.isnan(eff[32])  # normalised to mbs 8
    k = _csv(out, "fig15_kernels")
    sums = k.groupby(["cell_name", "rank"])["fraction"].sum()
    assert np.allclose(sums, 1.0) and len(sums) == 6  # 1.3b x 4 codes + mb16, 125m; rank 0
    mm = k[(k["cell_name"] == DRIFT_CELL) & (k["category"] == "matmul")]["fraction"].iloc[0]
    assert mm == pytest.approx(2.088125 / (2.088125 + 0.319574 + 0.913048), rel=1e-5)


def test_pareto_front_per_workload(drawn):
    _, _, out, _ = drawn
    p = _csv(out, "pareto")
    ok = p[p["outcome"] == "ok"]
    assert ok.groupby("workload")["on_front"].any().all()  # every workload has a front
    assert set(ok["workload"]) == {"gpt3-1.3b gb32 s2048", "gpt3-1.3b gb64 s2048", "gpt3-125m gb16 s1024"}
    x = np.array([1.0, 2.0, 3.0, 2.5, 1.0])
    y = np.array([5.0, 3.0, 1.0, 3.5, 6.0])
    assert list(pareto_front(x, y)) == [True, True, True, False, False]


def test_drift_chart_has_a_point_per_night(drawn):
    _, _, out, _ = drawn
    d = _csv(out, "drift")
    nights = d[d["cell_name"] == DRIFT_CELL]["night"].tolist()
    assert nights == ["2026-03-01", "2026-03-02", "2026-03-03"]


def test_only_supported_figures_are_drawn(replay_module, tmp_path):
    _, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    one = cells[cells["cell_name"].isin([FSDP, OOM])]
    paths = draw_all(
        one,
        pd.DataFrame(),
        tmp_path,
        "replay",
        gpus=pd.DataFrame(),
        kernels=pd.DataFrame(),
        references=[],
        schedule=None,
    )
    stems = {p.stem for p in paths}
    assert stems == {"throughput", "loss", "fig4_parallelism", "pareto", "report"}
    assert cell_summary(one)["outcome"].tolist() == ["ok", "oom"]


def test_runner_aggregate_and_visualize(replay_module):
    """The DAG's aggregate and visualize tasks (runner.aggregate()/visualize()) draw everything."""
    rp, _ = replay_module
    runner = CampaignRunner(rp.lc, catalog=Catalog(rp.catalog.url), home=rp.home)
    info = runner.aggregate()
    assert info["reused_attempts"] == 10 and info["read_attempts"] == 0
    paths = runner.visualize("manual__2026-03-03T02:00:00")
    stems = {p.rsplit("/", 1)[1] for p in paths}
    assert {"heatmap_temperature.png", "fig15_kernels.png", "report.md"} <= stems
    report = next(p for p in paths if p.endswith("report.md"))
    assert "VIOLATED" in Path(report).read_text()


def test_cells_without_telemetry_draw_without_energy_figures(replay_module, tmp_path):
    """CPU cells (the demo) have no power samples: no Pareto plot, the rest still drawn."""
    _, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    cpu = cells.drop(columns=[c for c in cells.columns if "energy" in c or "efficiency" in c or "temp" in c])
    paths = draw_all(
        cpu,
        pd.DataFrame(),
        tmp_path,
        "replay",
        gpus=pd.DataFrame(),
        kernels=pd.DataFrame(),
        references=[],
        schedule=None,
    )
    stems = {p.stem for p in paths}
    assert "pareto" not in stems and {"fig4_parallelism", "fig8_optimisations", "fig13_microbatch", "drift"} <= stems
    assert set(_csv(tmp_path, "drift")["metric"]) == {"tokens_per_s"}
    f4 = _csv(tmp_path, "fig4_parallelism")
    assert f4[f4["metric"] == "efficiency_samples_per_s_mj"]["value"].isna().all()


def _capture(monkeypatch) -> list:
    from charllm.analysis import figures

    shown: list = []
    real_save = figures._save

    def keep(fig, out_dir, stem, data=None):
        shown.append((stem, fig))
        return real_save(fig, out_dir, stem, data)

    monkeypatch.setattr(figures, "_save", keep)
    return shown


CPU_SUMMARY = {
    "model": ["tiny", "tiny"],
    "tp": [1, 1],
    "opt_code": ["00000", "01000"],
    "outcome": ["ok", "ok"],
    "cell_name": ["a", "b"],
    "tokens_per_s": [2.0e4, 1.5e4],
    "step_time_median_s": [0.05, 0.07],
}


def test_cpu_cells_get_the_panels_a_cpu_run_measures(tmp_path, monkeypatch):
    """Cells without GPU telemetry (the CPU demo): panels of step time and throughput, no empty GPU panels."""
    from charllm.analysis import figures

    shown = _capture(monkeypatch)
    paths = figures.grouped_panels(pd.DataFrame(CPU_SUMMARY), ["model", "tp"], "opt_code", tmp_path, "cpu", "cpu")
    assert any(p.suffix == ".png" for p in paths)
    fig = shown[0][1]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert not any("not measured" in t for t in texts)
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert ylabels == ["median step time (s)", "throughput (tokens/s)"]
    data = pd.read_csv(tmp_path / "cpu.csv")
    assert set(data["metric"]) == {"step_time_median_s", "tokens_per_s"}
    assert data.set_index(["metric", "cell_name"])["value"][("tokens_per_s", "b")] == 1.5e4


def test_gpu_panels_when_measured(drawn):
    _, _, out, _ = drawn
    f4 = _csv(out, "fig4_parallelism")
    assert set(f4["metric"]) == {c for c, _ in PANELS}


def _visible_text_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure was closed after saving
    canvas.draw()
    r = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(r) if fig._suptitle else None
    titles = [ax.title.get_window_extent(r) for ax in fig.axes if ax.get_title()]
    legends = [lg.get_window_extent(r) for lg in fig.legends] + [
        ax.get_legend().get_window_extent(r) for ax in fig.axes if ax.get_legend()
    ]
    return [t for t in [title, *titles] if t is not None], legends


def test_publication_quality(replay_module, tmp_path, monkeypatch):
    """Units on every axis, legends never over a title, one colour per cell in every figure."""
    _, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    steps = pd.read_parquet(info["steps_table"])
    shown = _capture(monkeypatch)
    draw_all(cells, steps, tmp_path, "replay", references=[], schedule="0 2 * * *")
    assert {stem for stem, _ in shown} >= {"throughput", "loss", "fig4_parallelism", "fig8_optimisations", "drift"}
    for stem, fig in shown:
        for ax in fig.axes:
            if not ax.axison or ax.get_label() == "<colorbar>" or not ax.get_xticks().size:
                continue
            if ax.get_ylabel() or ax.get_xlabel():
                assert ax.get_ylabel(), (stem, "y")
        titles, legends = _visible_text_boxes(fig)
        for t in titles:
            for lg in legends:
                assert not t.overlaps(lg), f"{stem}: a legend covers a title"
    colour = {}
    for stem in ("throughput", "loss", "drift"):
        fig = dict(shown)[stem]
        ax = fig.axes[0]
        if stem == "throughput":
            names = [t.get_text() for t in ax.get_xticklabels()]
            bars = [p for p in ax.patches if p.get_height() > 0 and p.get_width() == 0.8]
            pairs = zip(names, [b.get_facecolor() for b in bars], strict=False)
        else:
            pairs = (
                (ln.get_label().split(" ")[0], ln.get_color())
                for ln in ax.get_lines()
                if not ln.get_label().startswith("_")
            )
        for name, c in pairs:
            import matplotlib.colors as mc

            colour.setdefault(name, set()).add(mc.to_hex(c))
    assert colour and all(len(v) == 1 for v in colour.values()), colour


def test_loss_plot_keeps_identical_curves_visible(tmp_path, monkeypatch):
    """Two cells with the same loss curve (recompute on/off): distinct styles, a note names them."""
    from charllm.analysis import figures

    shown = _capture(monkeypatch)
    steps = pd.DataFrame(
        {
            "cell_id": ["x"] * 8 + ["y"] * 8 + ["z"] * 8,
            "repeat": [0] * 24,
            "step": list(range(8)) * 3,
            "loss": [5 - 0.3 * i for i in range(8)] * 2 + [5.1 - 0.2 * i for i in range(8)],
        }
    )
    cells = pd.DataFrame({"cell_id": ["x", "y", "z"], "cell_name": ["mb2", "mb2-recompute", "mb4"]})
    figures.loss_figure(steps, cells, tmp_path, "loss")
    fig = shown[0][1]
    lines = [ln for ln in fig.axes[0].get_lines()]
    assert len(lines) == 3
    styles = {ln.get_label().split(" ")[0]: ln.get_linestyle() for ln in lines}
    assert styles["mb2"] != styles["mb2-recompute"]
    assert {ln.get_marker() for ln in lines} == {"o", "s", "^"}
    notes = [t.get_text() for t in fig.texts]
    assert any("identical curves" in t and "mb2 r0 = mb2-recompute r0" in t for t in notes), notes


def test_note_labels_every_figure_and_the_report(replay_module, tmp_path, monkeypatch):
    _, info = replay_module
    cells = pd.read_parquet(info["cells_table"])
    shown = _capture(monkeypatch)
    paths = draw_all(cells, pd.DataFrame(), tmp_path, "replay", references=[], schedule=None, note="Recorded GPU data")
    assert shown and all(any(t.get_text() == "Recorded GPU data" for t in fig.texts) for _, fig in shown)
    report = next(p for p in paths if p.name == "report.md").read_text()
    assert report.splitlines()[2] == "_Recorded GPU data_"
