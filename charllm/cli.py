"""The command-line twin of the campaign DAGs, for people who script around Airflow.

charllm validate [FILE|DIR...]    check campaign files (all of include/campaigns by default), list refused cells
charllm plan FILE [--cells GLOB]   cells, hashes, whether each can run, which are done, estimated GPU-hours
charllm render FILE DEST           write the sbatch scripts without submitting
charllm run FILE [--cells GLOB]    run cells now through the campaign's backend (no Airflow)
charllm status FILE                attempts and outcomes from the catalog
charllm aggregate FILE             build the campaign's Parquet tables
charllm figures FILE               draw the campaign's figures
charllm table scaling FILE         the PCIe study's scaling table (Parquet + CSV) of the campaign's cells
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from charllm.analysis import tables_cli
from charllm.campaign import check_unique_name, dedupe, discover, load_campaign, path_under
from charllm.energy import cli as energy_cli
from charllm.errors import CharllmError, ConfigError
from charllm.paths import campaigns_dir
from charllm.predict import search_cli


def _progress(i: int, n: int, what: str) -> None:
    print(f"[{i}/{n}] {what}", flush=True)


def _validate_targets(files: list[str]) -> tuple[list[Path], list[str]]:
    """The campaign files named (a folder stands for its campaign files), and errors for what is not there."""
    if not files:
        return discover(campaigns_dir()), []
    paths: list[Path] = []
    errors: list[str] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = discover(p)
            if not found:
                errors.append(f"{p}: (folder): no campaign files (*.yaml) in it")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            errors.append(f"{p}: (file): no such file")
    return paths, errors


def cmd_validate(args: argparse.Namespace) -> int:
    """Check every file named (all of include/campaigns by default) and report each: never stops at the first."""
    paths, missing = _validate_targets(args.files)
    for line in missing:
        print(f"ERROR {line}")
    bad, refused = len(missing), 0
    loaded = []
    for p in paths:
        try:
            lc = load_campaign(p, check=False)
            check_unique_name(p, lc.name)
        except ConfigError as err:
            bad += 1
            print(f"ERROR {err}")
            continue
        except Exception as err:  # a bug, not the file's fault: still report every other file
            bad += 1
            print(f"ERROR {p}: (file): unexpected {type(err).__name__} while checking it: {err}")
            continue
        loaded.append(lc)
        if lc.refused:
            bad += 1
            refused += len(lc.refused)
            print(f"ERROR {p}: {len(lc.refused)} of {len(lc.cells)} cells cannot run on {lc.cluster.name}")
            for c in lc.cells:
                for r in lc.refused.get(c.cell_id, []):
                    print(f"      {c.name}: {r}")
        else:
            print(f"ok    {p}: {len(lc.cells)} cells on {lc.cluster.name}, all runnable")
    if bad:
        print(f"{bad} of {len(paths) + len(missing)} file(s) with errors")
    if loaded:
        owners = dedupe(loaded)
        shared = sum(1 for v in owners.values() if len(v) > 1)
        total = sum(len(lc.cells) for lc in loaded)
        print(f"{total} cells in {len(loaded)} campaigns, {len(owners)} unique ({shared} shared), {refused} refused")
    return 1 if bad else 0


def estimate_hours(lc_cluster_time_limit: str, world: int, repeats: int) -> float:
    from charllm.backends.base import parse_time_limit

    return parse_time_limit(lc_cluster_time_limit) / 3600 * world * repeats


def cmd_plan(args: argparse.Namespace) -> int:
    if getattr(args, "predict", False):  # charllm.predict.plan: the models' memory, time and GPU-hours
        from charllm.predict.plan import cmd_plan_predict

        return cmd_plan_predict(args)
    from charllm.catalog import Catalog
    from charllm.energy.control import job_skip_reason

    lc = load_campaign(args.file, check=False)
    cat = Catalog()
    reps = args.repeats or lc.campaign.repeats
    todo_h = 0.0
    cells = lc.select(args.cells)
    print(f"{'cell':<56} {'hash':<16} {'gpus':>4}  {'runnable':<8}  status")
    for c in cells:
        why = lc.refused.get(c.cell_id)
        done = [r for r in range(reps) if cat.valid_result(c.cell_id, r) is not None]
        status = "done" if len(done) == reps else (f"{len(done)}/{reps} done" if done else "to run")
        skip = job_skip_reason({"gpu_control": c.gpu_control})  # GPU control the cluster denies
        status = "will be skipped" if skip and not done else status
        if len(done) < reps and not why and not skip:
            todo_h += estimate_hours(lc.cluster_for(c).time_limit, c.world_size, reps - len(done))
        runnable = "no" if why else "yes"
        print(f"{c.name:<56} {c.cell_id:<16} {c.world_size:>4}  {runnable:<8}  {status}")
        for r in why or []:
            print(f"    cannot run: {r}")
        if skip:
            print(f"    skipped: {skip}")
    n_bad = sum(1 for c in cells if c.cell_id in lc.refused)
    print(f"{len(cells) - n_bad} of {len(cells)} cells runnable (engine {lc.campaign.engine} on {lc.cluster.name})")
    print(f"GPU-hours still to spend (at each cell's job time limit, an upper bound): {todo_h:.1f}")
    return 1 if n_bad else 0


def cmd_render(args: argparse.Namespace) -> int:
    from charllm.runner import CampaignRunner

    runner = CampaignRunner.from_file(args.file)
    cells = runner.lc.select(args.cells)
    dest = Path(args.dest)
    for i, c in enumerate(cells, 1):
        p = runner.render(c.cell_id, 0, path_under(dest, c.name))  # a cell's folder stays under DEST
        _progress(i, len(cells), str(p))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run cells now through the backend, without Airflow: the DAG's lifecycle (charllm.runner) in one process."""
    from charllm.runner import CampaignRunner

    report = CampaignRunner.from_file(args.file).run(
        args.cells, args.repeats, args.force, progress=lambda line: print(line, flush=True)
    )
    for p in report.figures:
        print(f"figure: {p}")
    print(
        f"run {report.run_id}: {report.outcomes}" + (f"; failed: {', '.join(report.failed)}" if report.failed else "")
    )
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from charllm.catalog import Catalog

    lc = load_campaign(args.file)
    cat = Catalog()
    names = {c.cell_id: c.name for c in lc.cells}
    for a in cat.attempts(campaign=lc.name):
        print(
            f"{names.get(a.cell_id, a.cell_id):<56} r{a.repeat} a{a.attempt} {a.state:<10} {a.outcome or '-':<9} "
            f"{a.job_id or '-'}"
        )
    print(cat.summary(lc.name))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from charllm.runner import CampaignRunner

    info = CampaignRunner.from_file(args.file).aggregate()
    print(info)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from charllm.runner import CampaignRunner

    for p in CampaignRunner.from_file(args.file).visualize(args.run_id):
        print(p)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from charllm.orchestrate.demo import main as demo_main  # imports Airflow: only here

    return demo_main([args.campaign])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="charllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate")
    p.add_argument("files", nargs="*")
    p.set_defaults(fn=cmd_validate)
    for name, fn in (("plan", cmd_plan), ("run", cmd_run)):
        p = sub.add_parser(name)
        p.add_argument("file")
        p.add_argument("--cells", default="*")
        p.add_argument("--repeats", type=int, default=None)
        p.add_argument("--force", action="store_true")
        p.set_defaults(fn=fn)
        if name == "plan":
            from charllm.predict.plan import add_plan_flags

            add_plan_flags(p)
    p = sub.add_parser("render")
    p.add_argument("file")
    p.add_argument("dest")
    p.add_argument("--cells", default="*")
    p.set_defaults(fn=cmd_render)
    for name, fn in (("status", cmd_status), ("aggregate", cmd_aggregate), ("figures", cmd_figures)):
        p = sub.add_parser(name)
        p.add_argument("file")
        if name == "figures":
            p.add_argument("--run-id", default="cli")
        p.set_defaults(fn=fn)
    tables_cli.register(sub)
    search_cli.register(sub)
    energy_cli.register(sub)
    p = sub.add_parser("demo", help="the demo campaign through Airflow (needs scripts/airflow-env.sh; make demo)")
    p.add_argument("campaign", nargs="?", default="demo")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except CharllmError as err:
        print(f"charllm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
