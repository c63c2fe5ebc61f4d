"""The PCIe strategies study's published rows through charllm's scaling table and figures.

Reads the study's two CSVs (``tests/data/pcie-strategies/``, MIT), turns them into cells
(:func:`charllm.analysis.scaling.study_as_cells`), and writes what ``charllm table scaling``
and ``draw_all`` write for a campaign: ``scaling_{megatron,zero}.{parquet,csv}`` (the study's
columns recomputed; they equal its own to 1e-9) and ``scaling_<model>.{png,pdf,csv}`` per model.

Usage: ``.venv/bin/python benchmarks/pcie_study_figures.py --out docs/pcie-study``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charllm.analysis import figures_kwai as fk  # noqa: E402
from charllm.analysis.scaling import DERIVED_COLUMNS, scaling_table, study_as_cells, write_scaling  # noqa: E402

DATA = ROOT / "tests" / "data" / "pcie-strategies"
FILES = {"megatron": "single-tp-dpp-pp-experiment-results.csv", "zero": "simple-single-and-zero-experiment-results.csv"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    for key, name in FILES.items():
        raw = pd.read_csv(DATA / name)
        cells = study_as_cells(raw)
        table = scaling_table(cells)
        names = raw["model_size"] + "-" + raw["strategy"] + "-" + raw["num_devices"].astype(str)
        got = table.set_index("cell_name").loc[names]
        worst = max(
            float((abs(got[c].to_numpy(float) - raw[c].to_numpy(float)) / raw[c].abs().clip(lower=1e-300)).max())
            for c in DERIVED_COLUMNS
        )
        for p in write_scaling(table, out, f"scaling_{key}"):
            print(p)
        for p in fk.scaling_figures(cells, out, f"PCIe study ({key}, RTX A6000, published)"):
            print(p)
        print(f"{key}: {len(table)} rows; worst relative difference to the study's derived columns {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
