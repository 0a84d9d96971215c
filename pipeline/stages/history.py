"""A store's versions: list them, move the pointer back, delete old ones."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.io.store import Store


def list_versions(store: Store) -> list[dict]:
    current = store.current_version()
    rows = []
    for m in store.published():
        ks = [k for e in m["modules"].values() for k in (e["k_a"], e["k_b"])]
        rows.append({
            "version": m["version"], "parent": m["parent"], "created": m["created"], "operation": m.get("operation", "compress"),
            "adapters": m["adapters"], "k": [min(ks), max(ks)] if ks else [0, 0], "error": m.get("error", {}),
            "current": m["version"] == current,
        })
    return rows


def format_versions(rows: list[dict]) -> str:
    lines = [f"{'':2}{'version':9} {'created':25} {'operation':12} {'parent':9} {'adapters':>8} {'quar.':>5} {'k':>7} {'err mean':>9} {'p95':>7} {'max':>7}"]
    for r in rows:
        k = f"{r['k'][0]}" if r["k"][0] == r["k"][1] else f"{r['k'][0]}..{r['k'][1]}"
        e = r["error"]
        lines.append(
            f"{'*' if r['current'] else ' '} {r['version']:9} {r['created']:25} {r['operation']:12} {r['parent'] or '-':9} "
            f"{r['adapters']['ok']:8d} {r['adapters']['quarantined']:5d} {k:>7} "
            f"{e.get('mean', float('nan')):9.4f} {e.get('p95', float('nan')):7.4f} {e.get('max', float('nan')):7.4f}"
        )
    return "\n".join(lines)


def rollback(store: Store, version: str) -> dict:
    """Point LATEST at an earlier version. Nothing else changes; a later write grows from it."""
    with store.lock("rollback"):
        previous = store.require_version()
        store.manifest(version)  # must be a published version
        store.set_pointer(version)
    return {"version": version, "previous": previous}


def prune(store: Store, keep: int) -> dict:
    """Delete all but the `keep` newest versions. Never deleted: the current version, the parent
    of a kept version, and any object a kept version's manifest lists (shared basis files).
    Unpublished leftovers of crashed runs go too (the lock guarantees no run is writing)."""
    if keep < 1:
        raise PipelineError("prune --keep must be at least 1")
    with store.lock("prune"):
        manifests = {m["version"]: m for m in store.published()}
        current = store.require_version()
        kept = set(sorted(manifests)[-keep:]) | {current}
        protected = kept | {manifests[v]["parent"] for v in kept if manifests[v]["parent"] in manifests}
        needed = {path for v in protected for path in manifests[v]["files"]}
        removed, freed = [], 0
        for version in store.versions():
            if version not in protected:
                freed += store.delete_version(version, keep=needed)
                removed.append(version)
    return {"removed": removed, "kept": sorted(protected), "bytes_freed": freed}
