"""``charllm table scaling CAMPAIGN``: the PCIe study's scaling table of a campaign.

CAMPAIGN is a campaign file (its tables are under ``$CHARLLM_HOME/tables/<name>``, written by
``charllm aggregate``) or a campaign name; ``--tables DIR`` reads the cells table of another
folder (e.g. an unpacked GPU run). Writes ``scaling.parquet`` and ``scaling.csv`` beside the
cells table (or into ``--out``) and prints one line per cell.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from charllm.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _tables_dir(campaign: str) -> Path:
    from charllm.campaign import load_campaign, path_under
    from charllm.paths import home

    p = Path(campaign)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        name = load_campaign(p, check=False).name
    elif _NAME.match(campaign):
        name = campaign
    else:
        raise ConfigError(campaign, "CAMPAIGN", "neither a campaign file nor a campaign name ([A-Za-z0-9._-])")
    return path_under(home() / "tables", name)


def cmd_scaling(args: argparse.Namespace) -> int:
    import pandas as pd

    from charllm.analysis.scaling import format_table, scaling_table, write_scaling

    tables = Path(args.tables) if args.tables else _tables_dir(args.campaign)
    cells_path = tables / "cells.parquet"
    if not cells_path.is_file():
        raise ConfigError(str(cells_path), "cells table", "not found: run `charllm aggregate FILE` first")
    cells = pd.read_parquet(cells_path)
    try:
        table = scaling_table(cells, by=args.by)
    except ValueError as err:
        raise ConfigError(str(cells_path), "--by", str(err)) from err
    out = Path(args.out) if args.out else tables
    pq_path, csv_path = write_scaling(table, out)
    if not args.quiet:
        print(format_table(table))
    print(pq_path)
    print(csv_path)
    return 0


def register(subparsers: Any) -> None:
    """Add ``table`` (with its ``scaling`` subcommand) to the ``charllm`` parser."""
    p = subparsers.add_parser("table", help="derived tables of a campaign (scaling)")
    sub = p.add_subparsers(dest="table", required=True)
    s = sub.add_parser("scaling", help="the PCIe study's scaling table: every cell against its 1-GPU cell")
    s.add_argument("campaign", help="campaign file or name")
    s.add_argument("--tables", default=None, help="read cells.parquet from this folder instead")
    s.add_argument("--out", default=None, help="write scaling.parquet/.csv here (default: beside cells.parquet)")
    s.add_argument("--by", action="append", default=[], help="a column the baseline must share too (e.g. interconnect)")
    s.add_argument("--quiet", action="store_true", help="print only the paths written")
    s.set_defaults(fn=cmd_scaling)
