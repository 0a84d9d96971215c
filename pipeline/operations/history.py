"""A store's versions: list them, move the pointer back, delete old ones."""

from __future__ import annotations

import logging

from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.format import check_version_id
from pipeline.io.store import LEFTOVER, PUBLISHED, UNFINISHED, UNREADABLE, Store

log = logging.getLogger(__name__)


def list_versions(store: Store) -> list[dict]:
    """A row per published version whose manifest is sound, oldest first."""
    return [row for row in version_listing(store)["versions"] if "problem" not in row]


def version_listing(store: Store) -> dict:
    """{"versions": a row per published version (sound manifest) and per version whose manifest
    is unreadable (`problem`), oldest first; "pointer_problem": why LATEST names no sound version,
    or None}. Unfinished versions (a run at work or crashed) are not listed."""
    survey = store.survey()
    rows = []
    for s in survey.versions:
        if s.state == UNREADABLE:
            rows.append({"version": s.version, "current": s.version == survey.current, "problem": s.problem})
        elif s.state == PUBLISHED:
            m = s.manifest
            flat = [e for e in m["modules"].values() if e.get("method") != "joint"]
            ks = [k for e in flat for k in (e["k_a"], e["k_b"])]
            rows.append(
                {
                    "version": m["version"],
                    "parent": m["parent"],
                    "created": m["created"],
                    "operation": m.get("operation", "compress"),
                    "adapters": m["adapters"],
                    "k": [min(ks), max(ks)] if ks else None,
                    "bases": bases_label(m["modules"]),
                    "error": m.get("error") or {},
                    "current": m["version"] == survey.current,
                }
            )
    return {"versions": rows, "pointer_problem": survey.problem if rows or survey.current else None}


def bases_label(modules: dict[str, dict]) -> str:
    """What a version's modules keep, as `info` names it: `k 8` for flat and aligned modules, `c 21
    q 2` for joint ones (width and core rank), ranges where modules differ."""

    def span(values: list[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}..{max(values)}"

    flat = [e for e in modules.values() if e.get("method") != "joint"]
    joint = [e for e in modules.values() if e.get("method") == "joint"]
    parts = [f"k {span([k for e in flat for k in (e['k_a'], e['k_b'])])}"] if flat else []
    if joint:
        parts.append(f"c {span([e['width'] for e in joint])} q {span([e['core_rank'] for e in joint])}")
    return "; ".join(parts) or "-"


def format_versions(rows: list[dict], pointer_problem: str | None = None) -> str:
    lines = [
        f"{'':2}{'version':9} {'created':25} {'operation':12} {'parent':9} "
        f"{'adapters':>8} {'quar.':>5} {'bases':>12} {'err mean':>9} {'p95':>7} {'max':>7}"
    ]
    for r in rows:
        mark = "*" if r["current"] else " "
        if "problem" in r:
            lines.append(f"{mark} {r['version']:9} unreadable: {r['problem']}")
            continue
        e = r["error"]
        lines.append(
            f"{mark} {r['version']:9} {r['created']:25} {r['operation']:12} {r['parent'] or '-':9} "
            f"{r['adapters']['ok']:8d} {r['adapters']['quarantined']:5d} {r['bases']:>12} "
            f"{e.get('mean', float('nan')):9.4f} {e.get('p95', float('nan')):7.4f} {e.get('max', float('nan')):7.4f}"
        )
    if pointer_problem:
        lines.append(f"! {pointer_problem}")
    return "\n".join(lines)


def rollback(store: Store, version: str) -> dict:
    """Point LATEST at an earlier published version whose manifest is sound, whatever LATEST
    holds now (it may be unreadable: this is how it is repaired). Nothing else changes; a later
    write grows from it. An unfinished version (its run never moved LATEST to it) is refused."""
    check_version_id(version)
    store.require_store()  # before the lock: a command on a missing store creates nothing
    with store.lock("rollback"):
        survey = store.survey()
        target = survey.state(version)
        if target is None:
            raise PipelineError(f"no version {version} in {store}")
        if target.state == UNFINISHED:
            raise PipelineError(
                f"{version} of {store} was never published (its run did not finish: it has a run record); "
                "`lora-subspace versions` lists the published ones"
            )
        if target.state != PUBLISHED:
            raise PipelineError(target.problem or f"version {version} of {store} has no manifest")
        if survey.current is None and survey.problem:
            log.warning("replacing LATEST: %s", survey.problem)
        store.set_pointer(version, target.manifest.get("format_version", 1))
    return {"version": version, "previous": survey.current}


def prune(store: Store, keep: int) -> dict:
    """Delete all but the `keep` newest published versions. Never deleted: the current version,
    the parent of a kept version, and any object a kept version's manifest lists (shared basis
    files). Unfinished leftovers of crashed runs go too (the lock guarantees no run is writing).
    Refused, deleting nothing, when LATEST or any published version's manifest is unreadable:
    what the versions need is then unknown."""
    if keep < 1:
        raise PipelineError("prune --keep must be at least 1")
    store.require_store()
    with store.lock("prune"):
        current = store.require_version()
        survey = store.survey()
        if survey.problem:
            raise PipelineError(f"prune: nothing deleted: {survey.problem}")
        unreadable = [s for s in survey.versions if s.state == UNREADABLE]
        if unreadable:
            raise IntegrityError(f"prune: nothing deleted: {unreadable[0].problem}")
        manifests = {s.version: s.manifest for s in survey.versions if s.state == PUBLISHED}
        kept = set(sorted(manifests)[-keep:]) | {current}
        protected = kept | {manifests[v]["parent"] for v in kept if manifests[v]["parent"] in manifests}
        needed = {path for v in protected for path in manifests[v]["files"]}
        removed, freed = [], 0
        for s in survey.versions:
            if s.version not in protected:
                freed += store.delete_version(s.version, keep=needed)
                if s.state != LEFTOVER:  # already pruned: only objects no kept version needs any more went
                    removed.append(s.version)
    return {"removed": removed, "kept": sorted(protected), "bytes_freed": freed}
