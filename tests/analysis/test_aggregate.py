"""Tables of a replayed campaign: rows, per-GPU numbers against a hand computation, energy,
the telemetry window, and incremental aggregation that reads only new attempts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from charllm.analysis import aggregate as agg
from charllm.analysis import telemetry as tele
from charllm.analysis.aggregate import aggregate
from charllm.definitions import canonical_metrics
from charllm.telemetry.schema import CLOCK_EVENT_REASONS
from charllm.telemetry.summary import gpu_window_summary

from .conftest import DRIFT_CELL, NIGHTS, RECORDED, RENAMED_HOST, SOURCES

FSDP = "gpt3-1.3b-tp1pp1dp2-fsdp-mb8-gb64-s2048-01000"
OOM = "gpt3-1.3b-tp1pp1dp1-mb32-gb32-s2048-01000"


def _tables(info):
    return {k: pd.read_parquet(info[f"{k}_table"]) for k in ("cells", "steps", "gpus", "kernels", "telemetry")}


def test_tables_have_one_row_per_cell_repeat_and_gpu(replay_module):
    _, info = replay_module
    t = _tables(info)
    cells, gpus = t["cells"], t["gpus"]
    assert len(cells) == len(SOURCES) + 2 == info["rows"]  # two more repeats of the drift cell
    assert info["outcomes"] == {"ok": 9, "oom": 1}
    oom = cells[cells["cell_name"] == OOM].iloc[0]
    assert oom["outcome"] == "oom" and math.isnan(oom["efficiency_samples_per_s_mj"])
    assert str(cells["measured_at"].dtype).startswith("datetime64")
    drift = cells[cells["cell_name"] == DRIFT_CELL].sort_values("repeat")
    assert [d.isoformat() for d in drift["measured_at"]] == [pd.Timestamp(n).isoformat() for n in NIGHTS]
    assert set(cells["layout"]) == {"TP1PP1", "TP1+FSDP"}
    # per GPU: one row per ok cell repeat and rank (the FSDP cell has 2), none for the OOM cell
    assert len(gpus) == 9 + 1 == info["gpu_rows"]
    fsdp_id = cells.loc[cells["cell_name"] == FSDP, "cell_id"].iloc[0]
    g = gpus[gpus["cell_id"] == fsdp_id].sort_values("rank")
    assert list(g["rank"]) == [0, 1] and list(g["host"]) == [RENAMED_HOST] * 2 and list(g["gpu_index"]) == [0, 1]
    assert g["gpu_uuid"].str.startswith("GPU-").all() and g["pci_bus_id"].nunique() == 2
    for col in (
        "avg_gpu_temp_c",
        "peak_gpu_temp_c",
        "avg_mem_temp_c",
        "peak_mem_temp_c",
        "avg_power_w",
        "peak_power_w",
        "avg_sm_clock_mhz",
        "nvlink_tx_bytes",
        "nvlink_rx_bytes",
        "pcie_tx_bytes",
        "pcie_rx_bytes",
        *(f"throttle_{r}_s" for r in CLOCK_EVENT_REASONS),
    ):
        assert col in gpus.columns
    assert (gpus["pcie_rx_bytes"] >= 0).all() and (gpus["pcie_tx_bytes"] >= 0).all()  # wraps undone
    assert not t["kernels"].empty and set(t["kernels"]["rank"]) == {0}
    assert len(t["steps"]) == 55 * 7 + 35 + 15  # 1.3b replays x 7, 125m, fsdp


def _hand(src: str, rank: int) -> tuple[dict[str, float], float, float]:
    """The per-GPU numbers of one recorded rank, computed here from the raw file with pandas."""
    df = pd.read_parquet(RECORDED / src / "telemetry" / f"rank{rank}.parquet").sort_values("unix_s")
    steps = pd.read_csv(RECORDED / src / "steps.csv")
    m = steps[steps["phase"] == "measure"]
    t0, t1 = m["start_unix_s"].min(), m["end_unix_s"].max()
    t = df["unix_s"].to_numpy()
    w = df[(df["unix_s"] >= t0) & (df["unix_s"] <= t1)]
    inside = df[(df["unix_s"] > t0) & (df["unix_s"] < t1)]

    def trapz(col: str) -> float:
        v = df[col].to_numpy()
        xs = np.r_[t0, inside["unix_s"], t1]
        ys = np.r_[np.interp(t0, t, v), inside[col], np.interp(t1, t, v)]
        return float(np.trapezoid(ys, xs))

    def delta(v: np.ndarray) -> float:
        return float(np.interp(t1, t, v) - np.interp(t0, t, v))

    reasons = df["clock_event_reasons"].to_numpy().astype(np.int64)
    nxt = np.r_[t[1:], t[-1]]
    overlap = np.clip(np.minimum(nxt, t1) - np.maximum(t, t0), 0, None)
    hand = {
        "avg_gpu_temp_c": w["gpu_temp_c"].mean(),
        "peak_gpu_temp_c": w["gpu_temp_c"].max(),
        "avg_mem_temp_c": w["mem_temp_c"].mean(),
        "peak_mem_temp_c": w["mem_temp_c"].max(),
        "peak_power_w": w["power_w"].max(),
        "avg_sm_clock_mhz": w["sm_clock_mhz"].mean(),
        "energy_gpu_j": trapz("power_w"),
        "avg_power_w": trapz("power_w") / (t1 - t0),
        "energy_mem_j": trapz("mem_power_w"),
        "energy_counter_j": delta(df["energy_total_j"].to_numpy()),
        "nvlink_tx_bytes": delta(df["nvlink_tx_total_kib"].to_numpy()) * 1024,
        "nvlink_rx_bytes": delta(df["nvlink_rx_total_kib"].to_numpy()) * 1024,
        "pcie_tx_bytes": delta(np.unwrap(df["pcie_tx_total_bytes"].to_numpy(), period=2.0**32)),
        "pcie_rx_bytes": delta(np.unwrap(df["pcie_rx_total_bytes"].to_numpy(), period=2.0**32)),
        "throttle_sw_power_cap_s": float(overlap[(reasons & 0x4) != 0].sum()),
        "throttle_hw_thermal_s": float(overlap[(reasons & 0x40) != 0].sum()),
        "samples": float(len(w)),
    }
    return hand, t0, t1


@pytest.mark.parametrize(
    ("name", "src", "rank"),
    [(FSDP, "h200x2-fsdp-zero2", 0), (FSDP, "h200x2-fsdp-zero2", 1), (DRIFT_CELL, "h100-gpt3-1.3b", 0)],
)
def test_per_gpu_numbers_match_a_hand_computation(replay_module, name, src, rank):
    rp, info = replay_module
    t = _tables(info)
    cid = rp.cell(name).cell_id
    row = t["gpus"][(t["gpus"]["cell_id"] == cid) & (t["gpus"]["rank"] == rank) & (t["gpus"]["repeat"] == 0)].iloc[0]
    hand, t0, t1 = _hand(src, rank)
    for k, v in hand.items():
        assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-6, nan_ok=True), k
    # and the same definitions as the training job's own summary (charllm.telemetry.summary)
    raw = pd.read_parquet(RECORDED / src / "telemetry" / f"rank{rank}.parquet")
    job = gpu_window_summary(raw, t0, t1)
    for k in (
        "energy_gpu_j",
        "energy_counter_j",
        "avg_power_w",
        "peak_gpu_temp_c",
        "avg_mem_temp_c",
        "pcie_rx_bytes",
        "nvlink_tx_bytes",
        "throttle_sw_power_cap_s",
        "samples",
    ):
        assert row[k] == pytest.approx(job[k], rel=1e-9, abs=1e-6, nan_ok=True), k
    if src == "h200x2-fsdp-zero2":
        assert row["nvlink_tx_bytes"] > 1e9  # FSDP moved tens of GB over NVLink in the window


def test_cell_energy_and_efficiency_match_the_job(replay_module):
    _, info = replay_module
    cells = _tables(info)["cells"]
    for name in (FSDP, DRIFT_CELL, "gpt3-125m-tp1pp1dp1-mb8-gb16-s1024-01000"):
        r = cells[(cells["cell_name"] == name) & (cells["repeat"] == 0)].iloc[0]
        job = json.loads((RECORDED / SOURCES[name] / "result.json").read_text())["metrics"]
        # steps.csv keeps microseconds, the job the float clock: agreement to ~1e-5
        assert r["energy_sampled_j"] == pytest.approx(job["energy_gpu_j"], rel=1e-4)
        assert r["energy_counter_delta_j"] == pytest.approx(job["energy_counter_j"], rel=1e-4)
        assert r["energy_counter_over_sampled"] == pytest.approx(job["energy_counter_over_sampled"], rel=1e-4)
        assert r["energy_per_step_sampled_j"] == pytest.approx(job["energy_per_step_j"], rel=1e-4)
        # the recorded result.json says samples_per_s_per_mj: read under the one name
        assert r["efficiency_samples_per_s_mj"] == pytest.approx(
            canonical_metrics(job)["efficiency_samples_per_s_mj"], rel=1e-4
        )
        # the formula, by hand: samples / (s * MJ)
        eff = r["global_batch"] / (r["step_time_median_s"] * r["energy_per_step_sampled_j"] / 1e6)
        assert r["efficiency_samples_per_s_mj"] == pytest.approx(eff)
        assert r["gpus_measured"] == job["telemetry_gpus"]


def test_telemetry_table_holds_all_ranks_in_the_window_only(replay_module):
    _, info = replay_module
    t = _tables(info)
    tel, cells, gpus = t["telemetry"], t["cells"], t["gpus"]
    assert list(tel.columns[:3]) == ["cell_id", "repeat", "attempt"]
    win = cells.set_index(["cell_id", "repeat"])[["window_start_unix_s", "window_end_unix_s"]]
    j = tel.join(win, on=["cell_id", "repeat"])
    assert ((j["unix_s"] >= j["window_start_unix_s"]) & (j["unix_s"] <= j["window_end_unix_s"])).all()
    n = tel.groupby(["cell_id", "repeat", "rank"]).size()
    expect = gpus.set_index(["cell_id", "repeat", "rank"])["samples"].astype(int)
    assert n.sort_index().to_dict() == expect.sort_index().to_dict()
    assert len(list(Path(info["telemetry_table"]).glob("*.parquet"))) == 9  # one part per ok attempt


def test_incremental_aggregation_reads_only_new_attempts(replay, tmp_path, monkeypatch):
    reads: list[str] = []
    real = tele.read_rank_files
    monkeypatch.setattr(tele, "read_rank_files", lambda ps, cols=None: reads.extend(map(str, ps)) or real(ps, cols))
    attempts: list[str] = []
    real_attempt = agg.read_attempt
    monkeypatch.setattr(agg, "read_attempt", lambda a, *x, **k: attempts.append(a.cell_id) or real_attempt(a, *x, **k))
    out = tmp_path / "tables"
    first = aggregate(replay.catalog, "replay", out)
    assert (first["read_attempts"], first["reused_attempts"]) == (10, 0)
    assert len(reads) == 10  # every rank file once: 9 ok attempts, the FSDP one has 2 ranks
    before = {k: pd.read_parquet(first[f"{k}_table"]) for k in ("cells", "gpus", "telemetry")}

    reads.clear()
    attempts.clear()
    again = aggregate(replay.catalog, "replay", out)
    assert (again["read_attempts"], again["reused_attempts"], reads, attempts) == (0, 10, [], [])
    for k, df in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(again[f"{k}_table"]), df)

    # a new repeat and a newer attempt of an existing repeat: only those two are read
    replay.commit(FSDP, 1, monkeypatch)
    replay.commit("gpt3-125m-tp1pp1dp1-mb8-gb16-s1024-01000", 0, monkeypatch)
    third = aggregate(replay.catalog, "replay", out)
    assert (third["read_attempts"], third["reused_attempts"]) == (2, 9)
    assert len(reads) == 3 and all("h200x2" not in r for r in reads)  # from the committed copies
    cells = pd.read_parquet(third["cells_table"])
    assert len(cells) == 11
    cid125 = replay.cell("gpt3-125m-tp1pp1dp1-mb8-gb16-s1024-01000").cell_id
    assert list(cells.loc[cells["cell_id"] == cid125, "attempt"]) == [2]  # the superseded attempt is gone
    parts = sorted(p.name for p in Path(third["telemetry_table"]).glob("*.parquet"))
    assert f"{cid125}_r0_a2.parquet" in parts and f"{cid125}_r0_a1.parquet" not in parts
    gpus = pd.read_parquet(third["gpus_table"])
    assert len(gpus) == 12 and (gpus[gpus["cell_id"] == cid125]["attempt"] == 2).all()
    # a lost index means a full rebuild, never duplicated rows
    (out / agg.INDEX).unlink()
    fourth = aggregate(replay.catalog, "replay", out)
    assert fourth["read_attempts"] == 11 and len(pd.read_parquet(fourth["gpus_table"])) == 12


def test_memory_power_is_added_only_when_asked(replay_module, tmp_path):
    rp, info = replay_module
    plain = pd.read_parquet(info["cells_table"]).set_index(["cell_id", "repeat"])
    both = aggregate(rp.catalog, "replay", tmp_path / "t2", add_mem_power=True, telemetry=False)
    assert both["telemetry_table"] is None and not (tmp_path / "t2" / agg.TELEMETRY_DIR).exists()
    b = pd.read_parquet(both["cells_table"]).set_index(["cell_id", "repeat"])
    ok = plain["outcome"] == "ok"
    np.testing.assert_allclose(
        b.loc[ok, "energy_sampled_j"], plain.loc[ok, "energy_sampled_j"] + plain.loc[ok, "energy_mem_sampled_j"]
    )


def test_counter_wrap_and_gaps():
    t = np.arange(0.0, 10.0, 0.5)
    c = (t * 1e9) % 2**32  # wraps at ~4.29 s
    assert tele.window_delta(t, c, 1.0, 9.0, tele.PCIE_MODULUS) == pytest.approx(8e9)
    p = np.full(t.size, 100.0)
    p[5] = np.nan  # a failed read is skipped, not taken as zero
    assert tele.window_integral(t, p, 0.25, 9.25) == pytest.approx(900.0)
    assert math.isnan(tele.window_integral(t, p, -1.0, 2.0))  # not covered: NaN


def _synthetic_rank(rng, rank: int, n: int, t_start: float) -> pd.DataFrame:
    t = t_start + np.arange(n) / 20.0 + rng.uniform(0, 0.004, n)
    df = pd.DataFrame(
        {
            "host": "n0",
            "rank": rank,
            "local_rank": rank,
            "gpu_index": rank,
            "gpu_uuid": f"GPU-{rank}",
            "pci_bus_id": f"0:{rank}",
            "unix_s": t,
            "nvml_errors_total": 0.0,
            "power_w": 600 + 50 * rng.standard_normal(n),
            "mem_power_w": 120 + rng.standard_normal(n),
            "energy_total_j": 1e4 + np.cumsum(rng.uniform(25, 35, n)),
            "gpu_temp_c": np.round(60 + rng.normal(0, 2, n)),
            "mem_temp_c": 55.0,
            "sm_clock_mhz": rng.choice([1980.0, 1755.0], n),
            "mem_clock_mhz": 2619.0,
            "gpu_util_pct": 100.0,
            "mem_util_pct": 40.0,
            "clock_event_reasons": rng.choice([0.0, 4.0, 68.0], n),
            "power_limit_w": 700.0,
            "pcie_tx_total_bytes": np.cumsum(rng.uniform(1e7, 5e7, n)) % 2**32,
            "pcie_rx_total_bytes": np.cumsum(rng.uniform(1e7, 5e7, n)) % 2**32,
            "nvlink_tx_total_kib": np.nan,
            "nvlink_rx_total_kib": np.cumsum(rng.uniform(1e3, 2e3, n)),
            "mem_used_bytes": 3e9,
        }
    )
    return df


def test_vectorised_summaries_equal_the_jobs_definitions_on_awkward_data():
    """NaN reads, all-NaN NVLink, PCIe wraps, shuffled rows, a window edge on a sample, a short rank."""
    import pyarrow as pa

    rng = np.random.default_rng(7)
    ranks = [_synthetic_rank(rng, r, 400, 1000.0) for r in range(3)]
    ranks[1].loc[[5, 100, 101, 250], ["power_w", "energy_total_j", "pcie_rx_total_bytes", "gpu_temp_c"]] = np.nan
    ranks[1].loc[37, "clock_event_reasons"] = np.nan
    ranks[2] = ranks[2].iloc[:150]  # ends before the window does: NaN energies, numbers from what is there
    t0 = float(ranks[0]["unix_s"].iloc[40])  # exactly on a sample of rank 0
    t1 = 1000.0 + 17.3
    df = pd.concat(ranks).sample(frac=1.0, random_state=3)  # shuffled: sorted again by rank and time
    table = tele.sorted_by_rank_time(pa.Table.from_pandas(df, preserve_index=False))
    got = tele.rank_summaries(table, t0, t1)
    assert [g["rank"] for g in got] == [0, 1, 2]
    for r, g in zip(ranks, got, strict=True):
        want = gpu_window_summary(r, t0, t1)
        for k, v in want.items():
            if k in g:
                assert g[k] == pytest.approx(v, rel=1e-9, abs=1e-9, nan_ok=True), (g["rank"], k)
    assert math.isnan(got[2]["energy_gpu_j"]) and not math.isnan(got[2]["avg_gpu_temp_c"])
    assert math.isnan(got[0]["nvlink_tx_bytes"]) and got[0]["nvlink_rx_bytes"] > 0
    assert got[0]["pcie_tx_bytes"] > 0 and got[1]["pcie_rx_bytes"] > 0  # wraps undone
