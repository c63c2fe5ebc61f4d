"""``charllm search``: rank training plans over one or more cluster profiles (see :mod:`charllm.predict.search`).

    charllm search --cluster h100-8x8 --cluster h200-4x8 --model llama3-70b --seq-len 8192 \\
        [--profiles DIR [--fill-roofline]] [--top 10] [--no-prune] [--emit-campaign FILE]

``--cluster NAME[:GPUS]``: a profile of ``include/clusters`` (or a path to one), optionally only
``GPUS`` of its GPUs. ``--profiles DIR``: measured per-layer profiles
(:mod:`charllm.predict.profile`); without it every cost comes from the roofline profiles of
:mod:`charllm.predict.search_scenarios` (assumptions, said so in the output).
``--emit-campaign FILE`` writes the best homogeneous plans (one GPU type, equal stages) as a
campaign that ``charllm validate`` accepts; heterogeneous plans are printed, never run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from charllm import modelcat
from charllm.campaign import ClusterProfile, load_campaign, load_cluster
from charllm.errors import ConfigError
from charllm.modelcat import ModelShape
from charllm.paths import include_dir
from charllm.predict.profile import LayerProfile, ProfileSet
from charllm.predict.search import DEFAULT_NETWORK_BYTES_S, GIB, Plan, Pool, Problem, SearchResult, search
from charllm.predict.search_scenarios import roofline_profile
from charllm.shell import is_safe_name

MAX_TOP = 1000
MAX_EMIT = 64


def parse_cluster_arg(arg: str, search_dir: Path) -> tuple[ClusterProfile, int]:
    """``NAME[:GPUS]`` or ``PATH.yaml[:GPUS]`` -> (cluster profile, GPUs to use)."""
    spec, _, count = arg.partition(":")
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        p = Path(spec)
        if not p.is_file():
            raise ConfigError("--cluster", spec, "no such cluster profile file")
        cluster = load_cluster(p.stem, p.parent, f"--cluster {arg}")
    else:
        cluster = load_cluster(spec, search_dir, f"--cluster {arg}")
    gpus = cluster.total_gpus
    if count:
        if not count.isdigit():
            raise ConfigError(f"--cluster {arg}", "gpus", f"{count!r} is not a whole number of GPUs")
        gpus = int(count)
        if gpus < 1:
            raise ConfigError(f"--cluster {arg}", "gpus", "0 GPUs: a pool needs at least one GPU")
        if gpus > cluster.total_gpus:
            raise ConfigError(
                f"--cluster {arg}", "gpus", f"{gpus} is more than the cluster's {cluster.total_gpus} GPUs"
            )
        if gpus > cluster.gpus_per_node and gpus % cluster.gpus_per_node:
            raise ConfigError(
                f"--cluster {arg}",
                "gpus",
                f"{gpus} is not whole nodes of {cluster.gpus_per_node} GPUs (nor a part of one node)",
            )
    if cluster.gpu_type == "cpu":
        raise ConfigError(f"--cluster {arg}", "gpu_type", "a CPU cluster has no GPUs to plan for")
    return cluster, gpus


def tp_divides(model: ModelShape, tp: int) -> bool:
    """Tensor parallelism splits heads, key/value heads and the MLP evenly (the engines' layout rule)."""
    return model.n_heads % tp == 0 and model.kv_heads % tp == 0 and model.ffn_hidden % tp == 0


def _check_profile(prof: LayerProfile, model: ModelShape, seq_len: int, source: str) -> None:
    """A profile priced for ``model`` must come from a model of the same width and sequence length."""
    for f in ("hidden", "n_heads", "ffn_hidden", "vocab_size", "n_kv_heads", "num_experts"):
        if getattr(prof.model, f) != getattr(model, f):
            raise ConfigError(
                source,
                f"model.{f}",
                f"{getattr(prof.model, f)} but {model.name} has {getattr(model, f)}: the profile is of another model",
            )
    if prof.seq_len != seq_len:
        raise ConfigError(source, "seq_len", f"{prof.seq_len} but the search is for sequences of {seq_len}")


def load_profiles(
    directory: str | None, model: ModelShape, seq_len: int, gpu_types: Sequence[str], global_batch: int, fill: bool
) -> tuple[ProfileSet, str]:
    """Measured profiles (checked against the model), roofline where none is given; and a line saying which."""
    out = ProfileSet()
    measured = 0
    if directory is not None:
        from charllm.predict.profile import profile_filename

        loaded = ProfileSet.load(directory)
        if not len(loaded):
            raise ConfigError(directory, "-", "no profile files (*_tp*_mb*.json) in the folder")
        for prof in loaded:
            _check_profile(prof, model, seq_len, str(Path(directory) / profile_filename(*prof.key)))
            out.add(prof)
            measured += 1
        typed = {prof.gpu_type for prof in out}
        missing = [g for g in gpu_types if g not in typed]
        if missing and not fill:
            raise ConfigError(
                directory,
                "gpu_type",
                f"no profile for {', '.join(missing)} (profiled: {', '.join(sorted(typed))});"
                " profile it or pass --fill-roofline",
            )
    roof = 0
    if directory is None or fill:
        for g in gpu_types:
            tp = 1
            while tp <= 8 and tp_divides(model, tp):
                mb = 1
                while mb <= global_batch:
                    if out.get(g, tp, mb) is None:
                        out.add(roofline_profile(model, g, tp, mb, seq_len))
                        roof += 1
                    mb *= 2
                tp *= 2
    if directory is None:
        what = f"profiles: {roof} roofline (analytic assumptions, charllm.predict.search_scenarios), none measured"
    else:
        what = f"profiles: {measured} from {directory}" + (f", {roof} roofline to fill the gaps" if roof else "")
    return out, what


def _fmt_plan(rank: int, p: Plan) -> list[str]:
    kind = "homogeneous" if len({s.pool for s in p.stages}) == 1 else "heterogeneous"
    lines = [
        f"#{rank:<3} {p.cost_s:10.4f} s/iteration  {p.gpus} GPUs  {len(p.stages)} stages  M={p.micro_batches}"
        f"  bubble {p.bubble_s:.4f} s  p2p {p.p2p_s:.4f} s/micro batch  sync {p.sync_s:.4f} s  ({kind})"
    ]
    lines.append("     device groups: " + " | ".join(f"{s.pool}[{s.gpus}]" for s in p.stages))
    lines.append("     strategies:    " + " | ".join(f"dp{s.dp} tp{s.tp} mb{s.micro_batch}" for s in p.stages))
    lines.append(
        "     layers:        "
        + " | ".join(f"{s.first_block}-{s.first_block + s.blocks - 1}" for s in p.stages)
        + "   memory GiB: "
        + " ".join(f"{s.memory_bytes / GIB:.1f}" for s in p.stages)
    )
    return lines


def homogeneous_plans(res: SearchResult, limit: int) -> list[Plan]:
    """The best plans a campaign cell can express: one pool, one group size, one tp, equal block counts."""
    out: list[Plan] = []
    seen: set[tuple[Any, ...]] = set()
    shapes = res._shapes
    for _, key in res.ranked:
        shape = shapes[key[0]]
        if len(set(shape.stages)) != 1:
            continue
        p = res.plan(key)
        if len({(s.blocks, s.tp) for s in p.stages}) != 1:
            continue
        s0 = p.stages[0]
        k = (s0.pool, s0.tp, s0.dp, len(p.stages), s0.micro_batch)
        if k in seen:
            continue
        seen.add(k)
        out.append(p)
        if len(out) >= limit:
            break
    return out


def _campaign_doc(
    name: str,
    cluster: ClusterProfile,
    model_name: str,
    proxy: int | None,
    plans: Sequence[Plan],
    args: argparse.Namespace,
) -> dict[str, Any]:
    def point(p: Plan) -> dict[str, Any]:
        s0 = p.stages[0]
        return {"gpus": p.gpus, "tp": s0.tp, "pp": len(p.stages), "dp": s0.dp, "micro_batch": s0.micro_batch}

    best = point(plans[0])

    def model() -> Any:  # a fresh value each time: no YAML anchors in the file
        return model_name if proxy is None else {"name": model_name, "proxy_layers": proxy}

    return {
        "name": name,
        "description": (
            f"Homogeneous plans from charllm search on {cluster.name} ({len(plans)} of them, best first; "
            f"predicted {plans[0].cost_s:.3f} s per iteration for the best)."
        ),
        "cluster": cluster.model_dump(mode="json", exclude_none=True),
        "backend": "slurm",
        "connection_id": args.connection_id or f"charllm_{cluster.gpu_type}",
        "model": model(),
        "engine": "megatron",
        "precision": "bf16",
        "dataset": {"kind": "synthetic"},
        "steps": 10,
        "tags": ["search"],
        "sweep": {
            "model": [model()],
            "gpus": [best["gpus"]],
            "tp": [best["tp"]],
            "pp": [best["pp"]],
            "dp": [best["dp"]],
            "micro_batch": [best["micro_batch"]],
            "global_batch": [args.global_batch],
            "seq_len": [args.seq_len],
        },
        "include": [point(p) for p in plans[1:]],
    }


def emit_campaigns(
    dest: Path, plans: Sequence[Plan], clusters: dict[str, ClusterProfile], model: ModelShape, proxy: int | None,
    args: argparse.Namespace,
) -> list[str]:  # fmt: skip
    """Write one campaign per cluster of ``plans`` (homogeneous, best first): ``dest`` for the
    cluster of the best, ``<stem>-<cluster>.yaml`` beside it for the others. Plans the engine
    refuses are left out (and said so); a campaign left with none is not written."""
    by_pool: dict[str, list[Plan]] = {}
    for p in plans:
        lst = by_pool.setdefault(p.stages[0].pool, [])
        if len(lst) < args.emit_max:
            lst.append(p)
    if not by_pool:
        return ["no homogeneous plan fits: no campaign written"]
    lines = []
    for i, (pool, pl) in enumerate(by_pool.items()):
        path = dest if i == 0 else dest.with_name(f"{dest.stem}-{pool}{dest.suffix or '.yaml'}")
        name = f"{args.campaign_name or 'search'}_{pool}".replace("-", "_")
        if not is_safe_name(name):
            raise ConfigError("--campaign-name", "name", f"{name!r} is not a safe campaign name")
        base_model = model.name.rsplit("-L", 1)[0] if proxy is not None else model.name
        doc = _campaign_doc(name, clusters[pool], base_model, proxy, pl, args)
        _write(path, doc, pl)
        lc = load_campaign(path, check=False)
        dropped = []
        if lc.refused:  # a layout the engine refuses (e.g. fewer micro batches than stages): leave it out
            bad = {
                (c.parallel.tp, c.parallel.pp, c.parallel.dp, c.micro_batch)
                for c in lc.cells
                if c.cell_id in lc.refused
            }
            keep = [
                p for p in pl if (p.stages[0].tp, len(p.stages), p.stages[0].dp, p.stages[0].micro_batch) not in bad
            ]
            dropped = [p for p in pl if p not in keep]
            if not keep:
                path.unlink()
                lines.append(f"{pool}: every homogeneous plan is refused by the engine; no campaign written")
                continue
            _write(path, _campaign_doc(name, clusters[pool], base_model, proxy, keep, args), keep)
            lc = load_campaign(path, check=False)
            pl = keep
        lines.append(
            f"wrote {path}: campaign {name}, {len(lc.cells)} cells on {pool}"
            + (f" ({len(dropped)} plans left out: the engine refuses them)" if dropped else "")
        )
    return lines


def _write(path: Path, doc: dict[str, Any], plans: Sequence[Plan]) -> None:
    head = [
        "# Written by `charllm search --emit-campaign`: the best homogeneous plans, best first.",
        "# Predicted seconds per iteration (the search's cost model, not a measurement):",
    ]
    for p in plans:
        s0 = p.stages[0]
        head.append(f"#   tp{s0.tp} pp{len(p.stages)} dp{s0.dp} mb{s0.micro_batch}: {p.cost_s:.4f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    tmp.replace(path)


def cmd_search(args: argparse.Namespace) -> int:
    if not args.cluster:
        raise ConfigError("--cluster", "cluster", "name at least one cluster profile")
    cdir = include_dir() / "clusters"
    pools = []
    clusters: dict[str, ClusterProfile] = {}
    for arg in args.cluster:
        cluster, gpus = parse_cluster_arg(arg, cdir)
        if cluster.name in clusters:
            raise ConfigError(f"--cluster {arg}", "name", f"cluster {cluster.name!r} named twice")
        clusters[cluster.name] = cluster
        # link bandwidths: the option, else the cluster profile's (when it has them), else the defaults
        gbit = args.network_gbit or cluster.inter_node_gbit_per_s or DEFAULT_NETWORK_BYTES_S * 8 / 1e9
        gbyte = cluster.intra_node_gbyte_per_s
        pools.append(
            Pool.of(
                cluster.name,
                cluster.gpu_type,
                gpus,
                cluster.gpus_per_node,
                reserve_bytes=None if args.reserve_gib is None else int(args.reserve_gib * GIB),
                network_bytes_s=float(gbit) * 1e9 / 8,
                nvlink_bytes_s=None if gbyte is None else float(gbyte) * 1e9,
            )
        )
    try:
        model = modelcat.get(args.model, args.layers)
    except (KeyError, ValueError) as err:
        raise ConfigError(
            "--model", "layers" if isinstance(err, ValueError) else "model", str(err).strip("'\"")
        ) from None
    if not 1 <= args.seq_len <= model.max_seq_len:
        raise ConfigError(
            "--seq-len", "seq_len", f"must be in 1..{model.max_seq_len} for {model.name}, got {args.seq_len}"
        )
    profiles, what = load_profiles(
        args.profiles, model, args.seq_len, sorted({p.gpu_type for p in pools}), args.global_batch, args.fill_roofline
    )
    prob = Problem(
        pools=tuple(pools),
        profiles=profiles,
        n_blocks=model.n_layers,
        global_batch=args.global_batch,
        seq_len=args.seq_len,
        hidden=model.hidden,
        max_stages=args.max_stages,
        max_tp=args.max_tp,
        max_group_sizes=args.max_group_sizes,
        per_stage=args.per_stage,
    )
    res = search(prob, prune=not args.no_prune)
    print(f"search: {model.name} ({model.n_layers} blocks), global batch {args.global_batch}, seq {args.seq_len} on "
          + " + ".join(f"{p.name} ({p.gpus} x {p.gpu_type})" for p in pools))  # fmt: skip
    print(what)
    print(
        f"space: {res.shapes} device-group orders/shapes, {res.candidates} candidate plans; "
        f"{res.steps} evaluation steps ({'memory-first pruning' if res.pruned else 'no pruning'}), "
        f"{len(res.ranked)} plans fit"
    )
    if not res.ranked:
        print("no plan fits in memory")
        return 1
    for i, p in enumerate(res.plans(args.top), 1):
        for line in _fmt_plan(i, p):
            print(line)
    if args.emit_campaign:
        proxy = args.layers if args.layers is not None and args.layers != modelcat.get(args.model).n_layers else None
        plans = homogeneous_plans(res, MAX_EMIT * len(clusters))
        for line in emit_campaigns(Path(args.emit_campaign), plans, clusters, model, proxy, args):
            print(line)
    print("heterogeneous plans are predictions only: charllm runs one GPU type per job")
    return 0


def _pos_int(hi: int) -> Any:
    def conv(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 1..{hi}")
        return int(text)

    return conv


def _pos_float(hi: float) -> Any:
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and 0 < v <= hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not in (0, {hi:g}]")
        return v

    return conv


def register(subparsers: Any) -> None:
    """Add ``charllm search`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "search",
        help="rank training plans over mixed GPU clusters (memory-pruned Metis-style search)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cluster", action="append", default=[], metavar="NAME[:GPUS]", help="a cluster profile (repeat)")
    p.add_argument("--model", required=True, help="a model of the catalog (charllm.modelcat)")
    p.add_argument("--layers", type=_pos_int(4096), default=None, help="blocks (a depth-cut proxy of the model)")
    p.add_argument("--global-batch", type=_pos_int(1 << 16), default=128)
    p.add_argument("--seq-len", type=_pos_int(1 << 20), default=2048)
    p.add_argument("--profiles", default=None, help="folder of per-layer profiles (default: roofline)")
    p.add_argument("--fill-roofline", action="store_true", help="roofline profiles where the folder has none")
    p.add_argument("--max-stages", type=_pos_int(64), default=16)
    p.add_argument("--max-tp", type=_pos_int(64), default=8)
    p.add_argument("--max-group-sizes", type=_pos_int(8), default=2, help="different group sizes per cluster")
    p.add_argument(
        "--per-stage", action="store_true", help="every stage its own dp/tp (else one per cluster and group size)"
    )
    p.add_argument(
        "--network-gbit",
        type=_pos_float(1e5),
        default=None,
        help="per-node network, Gb/s (default: the cluster's, or 100)",
    )
    p.add_argument(
        "--reserve-gib",
        type=_pos_float(1024),
        default=None,
        help="memory the framework keeps per GPU (default: 1.5 GB)",
    )
    p.add_argument("--top", type=_pos_int(MAX_TOP), default=10)
    p.add_argument("--no-prune", action="store_true", help="evaluate every candidate (for comparison)")
    p.add_argument("--emit-campaign", default=None, metavar="FILE", help="write the homogeneous plans as a campaign")
    p.add_argument("--emit-max", type=_pos_int(MAX_EMIT), default=8, help="plans per emitted campaign")
    p.add_argument("--campaign-name", default=None)
    p.add_argument("--connection-id", default=None)
    p.set_defaults(fn=cmd_search)
