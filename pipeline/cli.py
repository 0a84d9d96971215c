"""`lora-subspace`: argument parsing and output. The work is done in pipeline.operations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import traceback

from pipeline import __version__, commands, config
from pipeline.config import (
    ComponentRule,
    Options,
    cli_flag,
    parse_clusters,
    parse_max_error,
    raise_problems,
    step_problems,
)
from pipeline.errors import PipelineError
from pipeline.io.location import Location, printable, redact
from pipeline.runners import LOCAL_ADAPTERS, LOCAL_BYTES, RUNNERS

log = logging.getLogger("lora-subspace")
SHOWN_ERRORS = 20  # per-adapter errors printed after project or rebase, worst first
SHOWN_FAILURES = 10  # verify problems printed per version


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1000000' -> bytes (powers of 1024); at least one byte."""
    try:
        return config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _max_error(text: str) -> float:
    try:
        value = parse_max_error(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or none: {text!r}") from None
    if value != value or value < 0:  # NaN compares false with everything
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, or none, got {text}")
    return value


def _ratio(text: str) -> float:
    value = _number(text, float)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be above 1 (the compression factor), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are JSON log lines too when --log-format json was asked for."""

    json_errors = False

    def error(self, message: str):
        if not _Parser.json_errors:
            super().error(message)
        print(
            json.dumps({"level": "ERROR", "logger": "lora-subspace", "message": f"{self.prog}: error: {message}"}),
            file=sys.stderr,
        )
        sys.exit(2)


class _Named(argparse.Action):
    """Stores the value, and the option's name among those given (`named`), so that two names of
    one setting given together can be refused rather than the last one winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.named = [*getattr(namespace, "named", []), option_string]


class _Deprecated(_Named):
    """A former option name, hidden from --help: it still works, and main() warns of its new name."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.deprecated = [*getattr(namespace, "deprecated", []), f"{option_string} is now {self.new}"]


def _clusters(text: str) -> int | str:
    try:
        value = parse_clusters(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number of groups or "auto": {text!r}') from None
    if value != "auto" and value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-subspace", description="Compress LoRA adapter collections into shared subspaces.")
    parser.add_argument("--version", action="version", version=f"lora-subspace {__version__}")
    common, ray_options, writing = _shared_options()
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub, [common, ray_options, writing])
    _add_grow(sub, [common, ray_options], writing)
    _add_history(sub, [common])
    _add_outputs(sub, common, ray_options)
    return parser


def _shared_options() -> tuple[argparse.ArgumentParser, ...]:
    """The options every command takes, those of commands that run Ray, and those of commands that
    write a version."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    common.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="json: one JSON object per log line"
    )
    ray_options = argparse.ArgumentParser(add_help=False)
    ray_options.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    ray_options.add_argument("--num-cpus", type=_positive, help="CPUs of the embedded local Ray (default: all)")
    ray_options.add_argument(
        "--runner",
        choices=RUNNERS,
        default="auto",
        help=f"auto (default): without --address or RAY_ADDRESS, project, rebase and export stages of at most "
        f"{LOCAL_ADAPTERS} adapters and {LOCAL_BYTES >> 20} MiB run in-process, without starting Ray; "
        "local: everything in-process; ray: everything on Ray",
    )
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument(
        "--task-memory",
        type=parse_size,
        action=_Named,
        default=config.DEFAULT_TASK_MEMORY,
        help="memory bound of one compute task: bytes of stacked factors per shard task (default 1GiB); "
        "not the storage budget (--ratio, --budget-bytes)",
    )
    writing.add_argument(
        "--memory-budget",
        dest="task_memory",
        type=parse_size,
        action=_Deprecated,
        new="--task-memory",
        help=argparse.SUPPRESS,
    )
    writing.add_argument("--strict", action="store_true", help="fail on any quarantined adapter")
    writing.add_argument(
        "--max-error",
        type=_max_error,
        metavar="E",
        help="bound on every stored adapter module's relative delta-W error, as exported: modules the shared "
        f"bases miss get residual factors of their own; none: no bound (compress default {config.DEFAULT_MAX_ERROR:g}; "
        "project and rebase default to the store's)",
    )
    return common, ray_options, writing


def _add_compress(sub, parents: list[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("compress", parents=parents, help="build a new store version from a collection")
    c.add_argument("source", help="folder or manifest (.txt/.parquet) of PEFT adapters: path, file:// or s3://")
    c.add_argument("--out", required=True, help="store URI (path, file:// or s3://)")
    k = c.add_mutually_exclusive_group()
    k.add_argument("--components", type=_positive, help="components per module and side")
    k.add_argument("--variance-threshold", type=_fraction, default=0.6, help="explained variance to keep (default 0.6)")
    k.add_argument(
        "--ratio",
        type=_ratio,
        help="storage budget: store at most 1/RATIO of the adapters' tensor bytes; each module gets "
        "the method and parameters of lowest delta-W error that fit",
    )
    k.add_argument(
        "--budget-bytes", type=parse_size, help="storage budget in bytes (e.g. 200MiB), shared by modules as --ratio is"
    )
    c.add_argument("--adaptive", action="store_true", help="choose k per module from the variance threshold")
    c.add_argument("--svd-route", default="auto", choices=config.SVD_ROUTES)
    c.add_argument(
        "--method",
        choices=config.METHODS,
        default="auto",
        help="auto (default): flat, or with a budget whichever of flat and joint fits it with less error; "
        "flat: vlora's; aligned: every adapter's factors put in one gauge first (needs --components); "
        "joint: shared bases of delta W (width --components, or from the budget)",
    )
    c.add_argument(
        "--quantize",
        choices=config.QUANTIZE_SCHEMES,
        help="store the components packed: int8 (4x smaller) or nf4 (7.5x)",
    )
    c.add_argument(
        "--clusters",
        type=_clusters,
        metavar="K|auto",
        help="groups of adapters by delta-W similarity, each with its own bases per module (project and rebase "
        "put new adapters in the nearest group); auto: the number of groups for the budget and bound",
    )
    c.add_argument(
        "--chunk-size",
        type=_positive,
        help="adapters each task reads at a time: the first chunk is fitted, the rest absorbed "
        "incrementally, in one version (bounds memory whatever the collection's size)",
    )


def _add_grow(sub, parents: list[argparse.ArgumentParser], writing: argparse.ArgumentParser) -> None:
    grow = argparse.ArgumentParser(add_help=False)
    grow.add_argument("store", help="store URI (path, file:// or s3://)")
    grow.add_argument("source", help="the collection, as given to compress: new and changed adapters are found in it")
    grow.add_argument("--dry-run", action="store_true", help="print what would change and write nothing")
    sub.add_parser(
        "project", parents=[*parents, grow, writing], help="add new adapters on the current basis (basis unchanged)"
    )
    r = sub.add_parser("rebase", parents=[*parents, grow, writing], help="absorb new adapters into the basis")
    r.add_argument(
        "--full", action="store_true", help="recompute the basis over the stored adapters (rebuilt) and the new ones"
    )
    r.add_argument("--from-source", action="store_true", help="with --full: read every adapter from its original files")
    r.add_argument("--chunk-size", type=_positive, help="absorb new adapters this many at a time, a version each")


def _add_history(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The commands that read a store's versions or move its pointer."""
    vf = sub.add_parser(
        "verify", parents=parents, help="check a version's objects against their checksums and invariants"
    )
    vf.add_argument("store")
    vf.add_argument("--version", help="a version id (default: current)")
    vf.add_argument("--all", action="store_true", help="every published version")
    v = sub.add_parser("versions", parents=parents, help="list a store's versions")
    v.add_argument("store")
    rb = sub.add_parser("rollback", parents=parents, help="point the store at an earlier version")
    rb.add_argument("store")
    rb.add_argument("version")
    pr = sub.add_parser("prune", parents=parents, help="delete old versions")
    pr.add_argument("store")
    pr.add_argument("--keep", type=_positive, required=True, help="how many of the newest versions to keep")
    i = sub.add_parser("info", parents=parents, help="describe a store version")
    i.add_argument("store")
    i.add_argument("--version", help="a version id (default: current)")


def _add_outputs(sub, common: argparse.ArgumentParser, ray_options: argparse.ArgumentParser) -> None:
    """The commands that write something else than a version: adapters, a vlora folder, a report;
    quantize and vlora-import, which publish one from a Subspace; evaluate."""
    e = sub.add_parser("export", parents=[common, ray_options], help="write adapters back as PEFT folders")
    e.add_argument("store")
    e.add_argument(
        "task_ids",
        nargs="*",
        metavar="TASK_ID",
        help="the adapter(s) to export: one is written to OUT itself, several to OUT/<task_id>/",
    )
    e.add_argument("--all", action="store_true", help="export every adapter (Ray-parallel) into OUT/<task_id>/")
    e.add_argument("--out", required=True, help="folder to write (path, file:// or s3://)")
    e.add_argument("--version", help="a version id (default: current)")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="write into target folders that already hold files "
        "(by default export refuses them: a rebuilt adapter would replace what is there)",
    )
    _add_store_operations(sub, common, ray_options)
    ev = sub.add_parser(
        "evaluate",
        parents=[common, ray_options],
        help="held-out delta-W error of a basis built like the store's, against baselines",
    )
    ev.add_argument(
        "store", help="the store whose method and parameters (k, budget, quantization) the basis is built with"
    )
    ev.add_argument("source", help="the collection (folder or manifest, as compress takes it)")
    ev.add_argument("--holdout", type=_fraction, default=0.1, help="fraction of adapters held out (default 0.1)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    rp = sub.add_parser("report", parents=[common], help="write a self-contained HTML report of a version")
    rp.add_argument("store")
    rp.add_argument("--out", required=True, help="the HTML file to write (path, file:// or s3://)")
    rp.add_argument("--version", help="a version id (default: current)")
    rp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_store_operations(sub, common: argparse.ArgumentParser, ray_options: argparse.ArgumentParser) -> None:
    """quantize, vlora-import and vlora-export: sharded operations on a store, like compress."""
    q = sub.add_parser(
        "quantize", parents=[common, ray_options], help="publish a version with the components packed (int8 or nf4)"
    )
    q.add_argument("store")
    q.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        required=True,
        help="8: int8 with a scale per component; 4: nf4 in blocks of 64",
    )
    vi = sub.add_parser(
        "vlora-import",
        parents=[common, ray_options],
        help="publish a folder written by vlora's SharedSubspace.save as a version",
    )
    vi.add_argument("folder", help="the vlora folder (subspace_meta.json, subspace.safetensors, task_*.safetensors)")
    vi.add_argument("store")
    vi.add_argument("--replace", action="store_true", help="publish over a store that already has versions")
    ve = sub.add_parser(
        "vlora-export", parents=[common, ray_options], help="write a version in vlora's SharedSubspace layout"
    )
    ve.add_argument("store")
    ve.add_argument("folder")
    ve.add_argument("--version", help="a version id (default: current)")
    ve.add_argument("--overwrite", action="store_true", help="write into FOLDER even if it already holds files")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error stated in one line (input, storage, store), 2 a usage error
    (argparse), 130 interrupted, 141 stdout's reader gone (quietly)."""
    given = sys.argv[1:] if argv is None else argv
    _Parser.json_errors = "--log-format=json" in given or any(
        a == "--log-format" and b == "json" for a, b in zip(given, given[1:])
    )
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    for note in getattr(args, "deprecated", []):
        log.warning("%s (the former name still works)", note)
    json_logs = args.log_format == "json"
    args.json = args.json or json_logs  # stdout too carries JSON only
    try:
        result = COMMANDS[args.command](args)
        if args.json:
            print(json.dumps(result, indent=None if json_logs else 1, sort_keys=True, default=str))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is one line; -v adds the traceback
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return _reader_gone()
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = "lora-subspace: interrupted" if interrupted else f"lora-subspace: error: {error_line(exc)}"
        if json_logs:
            log.error(message, exc_info=args.verbose)
        else:
            if args.verbose:
                traceback.print_exc()
            print(message, file=sys.stderr)
        return 130 if interrupted else 1
    try:
        sys.stdout.flush()  # what is still buffered, while a closed pipe can be told apart
    except BrokenPipeError:
        return _reader_gone()
    return 0


SIGPIPE_STATUS = 128 + 13  # a shell's status for a writer killed by SIGPIPE, as `yes | head -1` leaves


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (so a BrokenPipeError came from printing,
    not from a connection to storage or the cluster)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a captured stdout), or no poll
        return False


def _reader_gone() -> int:
    """The reader of stdout stopped reading (`... | head -1`): end quietly, as tools killed by
    SIGPIPE do, with stdout on /dev/null so that the interpreter's last flush does not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_STATUS


def error_line(exc: BaseException) -> str:
    """One line for any failure, with no secrets: our own errors as they are; storage that failed
    after every retry, and missing credentials, by kind; anything else named as unexpected."""
    if isinstance(exc, PipelineError):
        text = str(exc)
    elif isinstance(exc, OSError) or exc.__class__.__module__.startswith("botocore"):
        text = f"storage: {exc.__class__.__name__}: {exc}"
    else:
        # A task's bug arrives wrapped by Ray, whose text is the remote traceback: name the cause.
        cause = getattr(exc, "cause", None)
        where, exc = (" in a task", cause) if isinstance(cause, BaseException) else ("", exc)
        text = f"unexpected {exc.__class__.__name__}{where}: {exc} (run again with -v for the traceback, and report it)"
    lines = redact(text).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure_logging(verbose: bool, log_format: str = "text") -> None:
    """--verbose is debug for our loggers only: botocore's debug logs carry request headers,
    credentials included, so other libraries stay at INFO."""
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_format == "json":
        from pipeline import progress

        progress.BARS = False  # a terminal's progress bar is not a JSON line
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger().setLevel(logging.INFO)
    for name in ("botocore", "aiobotocore"):  # "Found credentials in ..." on every run is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("pipeline", "lora-subspace"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _store(uri: str, endpoint_url: str | None):
    from pipeline.io.store import Store  # imported on use: `--help` and `--version` stay fast

    return Store(Location(uri, endpoint_url))


def _ray(args, *locations: Location):
    return commands.runner(_cluster(args), *locations)


def _cluster(args) -> commands.Cluster:
    return commands.Cluster(args.address, args.num_cpus, quiet=args.log_format == "json", runner=args.runner)


def options_from_args(args) -> Options:
    """The Options of compress, project or rebase from their arguments: every problem (with the
    run's steps: chunks, --full, --from-source) in one error, named by its flag."""
    defaults = Options()

    def given(name: str, default=None):  # a subcommand has only its own options
        return getattr(args, name, default)

    rule = ComponentRule(given("components"), given("variance_threshold", 0.6), given("adaptive", False))
    options = Options(
        rule,
        args.task_memory,
        args.strict,
        given("svd_route", defaults.route),
        given("max_error"),
        given("quantize"),
        given("method", defaults.method),
        given("ratio"),
        given("budget_bytes"),
        given("clusters"),
    )
    steps = step_problems(given("chunk_size"), given("full", False), given("from_source", False), cli_flag)
    named = getattr(args, "named", [])
    if "--task-memory" in named and "--memory-budget" in named:
        steps.append("--memory-budget is the former name of --task-memory: give one")
    raise_problems(options.problems(cli_flag) + steps)
    return options


def cmd_compress(args) -> dict:
    options = options_from_args(args)
    summaries = commands.compress_collection(
        args.source, args.out, options, args.chunk_size, _cluster(args), args.endpoint_url
    )
    if not args.json:
        for summary in summaries:
            _print_summary(summary)
    return commands.compress_result(summaries)


def _print_summary(s: dict) -> None:
    e = s["error"]
    print(
        f"{s['version']} ({s['operation']}) published to {s['store']}: {s['adapters_ok']} adapters, "
        f"{s['adapters_quarantined']} quarantined, {s['modules']} modules in {s['shards']} shards, "
        f"delta-W error mean {e['mean']:.4f} max {e['max']:.4f}, {s['seconds']['total']:.1f}s"
    )
    if s["read_errors"]:
        e = s["read_error"]
        print(
            f"  {len(s['read_errors'])} adapter(s) read this run: delta-W error mean {e['mean']:.4f} max {e['max']:.4f}"
        )
        shown = sorted(s["read_errors"].items(), key=lambda item: -item[1])[:SHOWN_ERRORS]
        for task_id, error in shown:
            print(f"    {printable(task_id)}: {error:.4f}")
        if len(s["read_errors"]) > len(shown):
            print(f"    ... {len(s['read_errors']) - len(shown)} more (--json, or report.json of the version)")
    for task_id, reason in s["quarantined"].items():
        print(f"  quarantined {printable(task_id)}: {reason}")
    for task_id, reason in s["kept_previous"].items():
        print(f"  kept the earlier upload of {printable(task_id)}: the new one was quarantined ({reason})")
    if s.get("residuals"):
        shown = ", ".join(printable(t) for t in list(s["residuals"])[:5])
        more = f" and {len(s['residuals']) - 5} more" if len(s["residuals"]) > 5 else ""
        stored = s["residuals_stored"]
        print(
            f"  {len(s['residuals'])} adapter(s) read this run stored with residuals (the shared bases miss the "
            f"error bound): {shown}{more}; the version's residuals: {stored['adapters']} adapter(s), "
            f"{stored['modules']} module(s), {stored['bytes']:,} bytes"
        )
    if s["flagged"]:
        worst = ", ".join(f"{printable(t)} ({e:.3f})" for t, e in list(s["flagged"].items())[:5])
        print(f"  {len(s['flagged'])} adapter(s) the basis represents badly: {worst}; run `lora-subspace rebase`")


def _grow(args, operation: str, **flags) -> dict:
    options = options_from_args(args)
    result = commands.grow_store(
        operation,
        args.store,
        args.source,
        options,
        dry_run=args.dry_run,
        cluster=_cluster(args),
        endpoint_url=args.endpoint_url,
        **flags,
    )
    if not args.json:
        _print_growth(result, args)
    return result


def _print_growth(result: dict, args) -> None:
    d = result["diff"]
    print(
        f"{'would change' if args.dry_run else 'found'}: {len(d['added'])} new, {len(d['replaced'])} replaced, "
        f"{len(d['pending'])} projected but not in the basis, "
        f"{d['unchanged']} unchanged, {len(d['missing'])} no longer in the source (kept)"
    )
    if args.dry_run:
        for kind in ("added", "replaced", "pending"):
            for task_id in d[kind]:
                print(f"  {kind:8} {printable(task_id)}")
    elif d["replaced"]:
        print(f"  replaced (re-uploaded under the same id): {', '.join(map(printable, d['replaced']))}")
    for summary in result["versions"]:
        _print_summary(summary)
    if not args.dry_run and not result["versions"]:
        print(f"{_store(args.store, args.endpoint_url)} is up to date: nothing written")


def cmd_project(args) -> dict:
    return _grow(args, "project")


def cmd_rebase(args) -> dict:
    return _grow(args, "rebase", full=args.full, from_source=args.from_source, chunk_size=args.chunk_size)


def cmd_versions(args) -> dict:
    from pipeline.operations.history import format_versions, version_listing

    store = _store(args.store, args.endpoint_url)
    listing = version_listing(store)
    if not listing["versions"]:
        bucket = store.missing_bucket()
        raise PipelineError(
            listing["pointer_problem"]
            or (f"bucket {bucket!r} does not exist (store {store})" if bucket else f"no published versions in {store}")
        )
    if not args.json:
        print(format_versions(listing["versions"], listing["pointer_problem"]))
    return listing


def cmd_verify(args) -> dict:
    from pipeline.operations.verify import verify_store

    store = _store(args.store, args.endpoint_url)
    reports = verify_store(store, args.version, args.all)
    bad = [r for r in reports if r["failures"]]
    if not args.json:
        for r in reports:
            objects = f"{r['files']} objects, " if r["files"] is not None else ""
            print(f"{r['version']}: {objects}" + (f"{len(r['failures'])} problem(s)" if r["failures"] else "ok"))
            for failure in r["failures"][:SHOWN_FAILURES]:
                print(f"  {failure}")
    if bad:
        if args.json:
            print(json.dumps({"versions": reports}, indent=1, sort_keys=True))
        first = bad[0]
        raise PipelineError(f"verify: {first['version']} of {store} failed: {first['failures'][0]}")
    return {"versions": reports}


def cmd_report(args) -> dict:
    from pipeline.operations.report import write_report

    store = _store(args.store, args.endpoint_url)
    out = Location(args.out, args.endpoint_url)
    if out.fs.isdir(out.root):
        raise PipelineError(f"--out {out} is a folder; report writes one HTML file (e.g. {out}/report.html)")
    if out.fs.exists(out.root) and not args.overwrite:
        raise PipelineError(f"--out {out} exists; report writes a new file (--overwrite replaces it)")
    version = write_report(store, args.version, out)
    if not args.json:
        print(f"report of {store} {version} written to {out}")
    return {"version": version, "out": str(out)}


def cmd_rollback(args) -> dict:
    from pipeline.operations.history import rollback

    result = rollback(_store(args.store, args.endpoint_url), args.version)
    if not args.json:
        print(
            f"{redact(args.store)} now points at {result['version']} "
            f"(was {result['previous'] or 'no readable version'})"
        )
    return result


def cmd_prune(args) -> dict:
    from pipeline.operations.history import prune

    result = prune(_store(args.store, args.endpoint_url), args.keep)
    if not args.json:
        print(
            f"removed {len(result['removed'])} version(s) ({result['bytes_freed']:,} bytes); "
            f"kept {', '.join(result['kept'])}"
        )
    return result


def cmd_info(args) -> dict:
    from pipeline.operations.info import describe, format_info

    info = describe(_store(args.store, args.endpoint_url), args.version)
    if not args.json:
        print(format_info(info))
    return info


def cmd_export(args) -> dict:
    if bool(args.all) == bool(args.task_ids):
        raise PipelineError("export needs TASK_IDs or --all (not both)")
    result = commands.export_adapters(
        args.store,
        args.out,
        None if args.all else args.task_ids,
        args.version,
        args.overwrite,
        _cluster(args),
        args.endpoint_url,
    )
    if not args.json:
        print(
            f"exported {result['exported']} adapter(s) from {_store(args.store, args.endpoint_url)} "
            f"{result['version']} to {result['out']}"
        )
    return result


def cmd_quantize(args) -> dict:
    from pipeline.operations.quantize import quantize

    store = _store(args.store, args.endpoint_url)
    result = quantize(store, args.bits, _ray(args, store.location))
    if not args.json:
        before, after, q = result["bytes_before"], result["bytes_after"], result["quantization"]
        added = q["added_error"]
        print(
            f"{result['version']} ({q['scheme']}) published to {store}: components "
            f"{before['components']:,} -> {after['components']:,} bytes, "
            f"store {before['total']:,} -> {after['total']:,} bytes; "
            f"added delta-W error mean {added.get('mean', 0):.4f} max {added.get('max', 0):.4f}"
        )
    return result


def cmd_vlora_import(args) -> dict:
    from pipeline.operations.vlora import import_vlora

    store, folder = _store(args.store, args.endpoint_url), Location(args.folder, args.endpoint_url)
    result = import_vlora(folder, store, _ray(args, folder, store.location), args.replace)
    if not args.json:
        print(
            f"{result['version']} (vlora-import) published to {store}: "
            f"{result['tasks']} tasks, {result['modules']} modules"
        )
    return result


def cmd_vlora_export(args) -> dict:
    from pipeline.operations.vlora import export_vlora

    store, folder = _store(args.store, args.endpoint_url), Location(args.folder, args.endpoint_url)
    result = export_vlora(store, args.version, folder, _ray(args, store.location, folder), args.overwrite)
    if not args.json:
        print(f"wrote {result['tasks']} tasks of {store} {result['version']} to {folder} (vlora layout)")
    return result


def cmd_evaluate(args) -> dict:
    from pipeline.operations.evaluate import evaluate, format_evaluation

    store, source = _store(args.store, args.endpoint_url), Location(args.source, args.endpoint_url)
    result = evaluate(store, source, _ray(args, store.location, source), args.holdout, args.seed)
    if not args.json:
        print(format_evaluation(result))
    return result


COMMANDS = {
    "compress": cmd_compress,
    "project": cmd_project,
    "rebase": cmd_rebase,
    "info": cmd_info,
    "export": cmd_export,
    "verify": cmd_verify,
    "versions": cmd_versions,
    "report": cmd_report,
    "rollback": cmd_rollback,
    "prune": cmd_prune,
    "quantize": cmd_quantize,
    "vlora-import": cmd_vlora_import,
    "vlora-export": cmd_vlora_export,
    "evaluate": cmd_evaluate,
}

if __name__ == "__main__":
    sys.exit(main())
