"""`lora-subspace`: argument parsing and output. The work is done in pipeline.stages."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback

from pipeline.errors import PipelineError
from pipeline.io.location import Location, redact
from pipeline.io.store import Store

log = logging.getLogger("lora-subspace")
EXPORT_BATCH = 16
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1000000' -> bytes (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    unit = (match[2] or "B").upper()[0]
    return int(float(match[1]) * 1024 ** "BKMGT".index(unit))


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-subspace", description="Compress LoRA adapter collections into shared subspaces.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    common.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    ray_options = argparse.ArgumentParser(add_help=False)
    ray_options.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    ray_options.add_argument("--num-cpus", type=_positive, help="CPUs of the embedded local Ray (default: all)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", parents=[common, ray_options], help="build a new store version from a collection")
    c.add_argument("source", help="folder or manifest (.txt/.parquet) of PEFT adapters: path, file:// or s3://")
    c.add_argument("--out", required=True, help="store URI (path, file:// or s3://)")
    k = c.add_mutually_exclusive_group()
    k.add_argument("--components", type=_positive, help="components per module and side")
    k.add_argument("--variance-threshold", type=_fraction, default=0.6, help="explained variance to keep (default 0.6)")
    c.add_argument("--adaptive", action="store_true", help="choose k per module from the variance threshold")
    c.add_argument("--memory-budget", type=parse_size, default=parse_size("1GiB"), help="stacked bytes per shard task (default 1GiB)")
    c.add_argument("--svd-route", default="auto", choices=["auto", "gram", "covariance", "svd", "randomized"])
    c.add_argument("--strict", action="store_true", help="fail on any quarantined adapter")

    i = sub.add_parser("info", parents=[common], help="describe a store version")
    i.add_argument("store")
    i.add_argument("--version", help="a version id (default: current)")

    e = sub.add_parser("export", parents=[common, ray_options], help="write adapters back as PEFT folders")
    e.add_argument("store")
    e.add_argument("task_id", nargs="?", help="the adapter to export")
    e.add_argument("--all", action="store_true", help="export every adapter (Ray-parallel) into OUT/<task_id>/")
    e.add_argument("--out", required=True, help="folder to write (path, file:// or s3://)")
    e.add_argument("--version", help="a version id (default: current)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        result = COMMANDS[args.command](args)
    except PipelineError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"lora-subspace: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lora-subspace: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


def _configure_logging(verbose: bool) -> None:
    """--verbose is debug for our loggers only: botocore's debug logs carry request headers,
    credentials included, so other libraries stay at INFO."""
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    for name in ("pipeline", "lora-subspace"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _ray(args):
    from pipeline.runners.ray_runner import RayRunner

    runner = RayRunner(args.address, args.num_cpus)
    if runner.dashboard_url:
        log.info("Ray dashboard: %s", runner.dashboard_url)
    return runner


def cmd_compress(args) -> dict:
    from pipeline.stages.compress import CompressOptions, compress
    from pipeline.stages.compute import ComponentRule

    rule = ComponentRule(args.components, args.variance_threshold, args.adaptive)
    options = CompressOptions(rule, args.memory_budget, args.strict, args.svd_route)
    source, store = Location(args.source, args.endpoint_url), Store(Location(args.out, args.endpoint_url))
    summary = compress(source, store, _ray(args), options).to_dict()
    if not args.json:
        print(
            f"{summary['version']} published to {summary['store']}: {summary['adapters_ok']} adapters, "
            f"{summary['adapters_quarantined']} quarantined, {summary['modules']} modules in {summary['shards']} shards, "
            f"delta-W error mean {summary['error_mean']:.4f} max {summary['error_max']:.4f}, {summary['seconds']['total']:.1f}s"
        )
        for task_id, reason in summary["quarantined"].items():
            print(f"  quarantined {task_id}: {reason}")
    return summary


def cmd_info(args) -> dict:
    from pipeline.stages.info import describe, format_info

    info = describe(Store(Location(args.store, args.endpoint_url)), args.version)
    if not args.json:
        print(format_info(info))
    return info


def cmd_export(args) -> dict:
    from pipeline.io.store import CATALOG
    from pipeline.stages.export import ExportTask, export_batch

    if bool(args.all) == bool(args.task_id):
        raise PipelineError("export needs a TASK_ID or --all (not both)")
    store = Store(Location(args.store, args.endpoint_url))
    version = store.require_version(args.version)
    out = Location(args.out, args.endpoint_url)
    if args.task_id:
        written = export_batch(ExportTask(store.location, version, [args.task_id], [out]))
    else:
        catalog = store.read_table(version, CATALOG, columns=["task_id", "status"]).to_pylist()
        ids = [row["task_id"] for row in catalog if row["status"] == "ok"]
        batches = [ids[i : i + EXPORT_BATCH] for i in range(0, len(ids), EXPORT_BATCH)]
        tasks = [ExportTask(store.location, version, b, [out.child(t) for t in b]) for b in batches]
        written = [w for _, ws in _ray(args).map_unordered(export_batch, tasks) for w in ws]
    if not args.json:
        print(f"exported {len(written)} adapter(s) from {store} {version} to {out}")
    return {"version": version, "exported": len(written), "out": str(out)}


COMMANDS = {"compress": cmd_compress, "info": cmd_info, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
