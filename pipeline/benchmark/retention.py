"""Fidelity per adapter in task terms, for the peft-trained step (pipeline.benchmark.trained): each
row of ROWS compresses the collection with its own CLI arguments, exports every adapter and scores
it; an adapter's retention is its exported copy's test accuracy over its original's (both with the
original's head). A held-out row compresses 3/4 of the collection, `project`s the rest, and scores
again after the next `rebase`.

Every row reports the store's bytes, the compression ratio reached, the delta-W error (mean, max),
retention (mean, minimum, worst adapter) and, per adapter, its (relative delta-W error, retention)
pair, from which an error bound can be chosen (`error_bound`).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# One row per configuration: a name and the compress arguments it adds (a row with "held_out" builds
# from 3/4 and projects the rest). A new configuration is one more line, e.g.
# {"name": "ratio 10, groups 4", "compress": ["--ratio", "10", "--clusters", "4"]}.
ROWS: tuple[dict, ...] = (
    {"name": "ratio 5", "compress": ["--ratio", "5", "--method", "auto", "--max-error", "none"]},
    {"name": "ratio 10", "compress": ["--ratio", "10", "--method", "auto", "--max-error", "none"]},
    {"name": "ratio 20", "compress": ["--ratio", "20", "--method", "auto", "--max-error", "none"]},
    {"name": "flat, ratio 10", "compress": ["--ratio", "10", "--method", "flat", "--max-error", "none"]},
    {"name": "ratio 5, default bound", "compress": ["--ratio", "5", "--method", "auto"]},
    {"name": "ratio 10, default bound", "compress": ["--ratio", "10", "--method", "auto"]},
    {"name": "ratio 20, default bound", "compress": ["--ratio", "20", "--method", "auto"]},
    {"name": "ratio 10, groups 4", "compress": ["--ratio", "10", "--clusters", "4", "--max-error", "none"]},
    {"name": "ratio 10, groups auto", "compress": ["--ratio", "10", "--clusters", "auto", "--max-error", "none"]},
    {"name": "flat, ratio 10, groups 4", "compress": ["--ratio", "10", "--method", "flat", "--clusters", "4"]},
    {"name": "held out 1/4, ratio 10", "compress": ["--ratio", "10", "--max-error", "none"], "held_out": True},
    {"name": "held out 1/4, ratio 10, default bound", "compress": ["--ratio", "10"], "held_out": True},
)
# The rows the job's targets read (pipeline.benchmark.figures)
HEADLINE_ROW, FLAT_ROW = "ratio 10", "flat, ratio 10"
BOUND_ROW, HELD_BOUND_ROW = "ratio 10, default bound", "held out 1/4, ratio 10, default bound"
RATIO_10_ROWS = ("ratio 10", "ratio 10, groups 4", "ratio 10, groups auto")
KEEP = 0.97  # the retention an error bound is chosen for (error_bound)

Score = Callable[[Path, str], float]  # the test accuracy of the adapter folder exported for a task id


class Refused(Exception):
    """A row's compress that stated why it would not run (e.g. a budget no fit takes)."""


def measure(rows, workdir: Path, ids: list[str], held_out: list[str], score: Score, original: dict, cpus: int) -> list:
    """Every row's figures, in order; a row whose compress is refused is reported with the reason."""
    source = workdir / "adapters"
    listings = {
        "all": _listing(source / "all.txt", ids),
        "build": _listing(source / "build.txt", [t for t in ids if t not in held_out]),
    }
    results = []
    for index, row in enumerate(rows):
        where = workdir / f"row-{index:02d}"
        figures, started = {"name": row["name"], "compress": row["compress"]}, time.perf_counter()
        try:
            if row.get("held_out"):
                figures.update(_held_out(row, where, listings, held_out, score, original, cpus))
            else:
                _compress(listings["all"], where / "store", row["compress"], cpus)
                figures.update(_state(where, score, original, cpus))
        except Refused as reason:
            figures["refused"] = str(reason)
        results.append({**figures, "seconds": time.perf_counter() - started})
    return results


def _held_out(row: dict, where: Path, listings: dict, held_out: list, score: Score, original: dict, cpus: int) -> dict:
    """Built from 3/4, the rest projected (the row's figures, every adapter), then re-based."""
    store = where / "store"
    _compress(listings["build"], store, row["compress"], cpus)
    _cli("project", store, listings["all"], "--num-cpus", cpus)
    projected = _state(where, score, original, cpus)
    _cli("rebase", store, listings["all"], "--num-cpus", cpus)
    rebased = _state(where, score, original, cpus)
    return {
        **projected,
        "held_out": len(held_out),
        "projected": {
            "before_rebase": _summary({t: projected["per_adapter"][t]["retention"] for t in held_out}),
            "after_rebase": _summary({t: rebased["per_adapter"][t]["retention"] for t in held_out}),
        },
        "after_rebase": {k: v for k, v in rebased.items() if k != "per_adapter"},
    }


def _state(where: Path, score: Score, original: dict, cpus: int) -> dict:
    """The store's current version: bytes, ratio, errors, and every adapter exported and scored."""
    store, exported = where / "store", where / "exported"
    info = _cli("info", store)
    _cli("export", store, "--all", "--out", exported, "--overwrite", "--num-cpus", cpus)
    errors = {t: e["mean"] for t, e in info["per_adapter_error"].items()}
    retention = {t: score(exported / t, t) / max(original[t], 1e-12) for t in errors}
    return {
        "store_bytes": info["store_bytes"],
        "ratio_reached": info["compression_ratio"],
        "error": {"mean": info["error"]["mean"], "max": info["error"]["max"]},
        "retention": _summary(retention),
        "methods": _method_counts(info["methods"]),
        "groups": len(info.get("groups") or []) or 1,
        "residual_adapters": len(info.get("residual_adapters") or []),
        "per_adapter": {t: {"error": errors[t], "retention": retention[t]} for t in sorted(errors)},
    }


def error_bound(rows: list[dict], keep: float = KEEP) -> dict:
    """From every measured (error, retention) pair: the smallest error at which an adapter kept
    less than `keep` of its accuracy, and the largest error below it (every adapter at or under it
    kept at least `keep`)."""
    pairs = [p for row in rows for p in row.get("per_adapter", {}).values()]
    failing = min((p["error"] for p in pairs if p["retention"] < keep), default=None)
    safe = [p["error"] for p in pairs if failing is None or p["error"] < failing]
    return {
        "keep": keep,
        "pairs": len(pairs),
        "largest_error_all_kept": max(safe, default=None),
        "smallest_error_not_kept": failing,
    }


def _summary(retention: dict[str, float]) -> dict:
    worst = min(retention, key=retention.get)
    return {"mean": sum(retention.values()) / len(retention), "min": retention[worst], "worst": worst}


def _method_counts(methods: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in methods.values():
        counts[module["method"]] = counts.get(module["method"], 0) + 1
    return counts


def _listing(path: Path, ids: list[str]) -> Path:
    """A manifest of adapter folders next to it (task ids are the folder names)."""
    path.write_text("".join(f"{t}\n" for t in ids))
    return path


def _compress(source: Path, store: Path, arguments: list, cpus: int) -> None:
    """Refused when compress states why it will not run; an unexpected failure stops the step."""
    try:
        _cli("compress", source, "--out", store, *arguments, "--num-cpus", cpus)
    except RuntimeError as failure:
        stated = str(failure).partition(": ")[2]
        if not stated or stated.startswith(("unexpected ", "storage: ")):
            raise
        raise Refused(stated) from None


def _cli(*args) -> dict:
    """A lora-subspace command in this process (one embedded Ray for all of them): its JSON."""
    from pipeline import cli

    printed, logged = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(logged):
        status = cli.main([*map(str, args), "--json"])
    sys.stderr.write(logged.getvalue())
    if status:
        stated = [line for line in logged.getvalue().splitlines() if line.startswith("lora-subspace: error: ")]
        raise RuntimeError(
            f"lora-subspace {args[0]} failed (exit {status})" + (f": {stated[-1][22:]}" if stated else "")
        )
    return json.loads(printed.getvalue()) if printed.getvalue().strip() else {}
