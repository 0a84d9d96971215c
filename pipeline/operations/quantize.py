"""Quantize: publish the current version with its components packed (int8 or nf4).

A change like the others (pipeline.flow): each shard task reads one of the parent's basis
objects, packs its components, and moves the parent's rows of its modules onto the packed bases
(they keep their loadings; each error grows by how far the rebuilt delta W moved, measured from
loadings alone), streaming the parent's loadings table. No process holds more than one basis
object and a batch of rows.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import Options
from pipeline.errors import PipelineError
from pipeline.flow.change import Change
from pipeline.flow.publish import write_version
from pipeline.io.format import read_parameters
from pipeline.io.store import Store
from pipeline.linalg.quantize import bits_scheme
from pipeline.operations.export import refuse_residuals
from pipeline.operations.info import version_bytes
from pipeline.runners import Runner, for_work

_DEFAULT_OPTIONS = Options()


def quantize(store: Store, bits: int, runner: Runner, options: Options = _DEFAULT_OPTIONS) -> dict:
    """The next version of the current one, its components packed: {"version", "quantization",
    "bytes_before", "bytes_after"} (bytes measured on the store, info.version_bytes). If another
    writer published meanwhile, the version quantized is the one it published."""
    try:
        scheme = bits_scheme(bits)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    store.require_version()  # a missing store fails before the lock would create a folder
    with store.lock("quantize") as lock:
        parent = store.require_version()
        refuse_joint(
            store, parent, "quantize packs flat bases only", "compress the collection again with --quantize int8 or nf4"
        )
        manifest = store.manifest(parent)
        why = "packing the components would move adapters' errors past the bound without a measure of their own"
        refuse_residuals(store, parent, manifest, why, "compress again with --quantize and --max-error")
        bound = manifest["parameters"].get("max_error")
        if bound is not None:
            raise PipelineError(
                f"{store} {parent} keeps every error within --max-error {bound:g}: {why}; "
                "compress again with --quantize and --max-error"
            )
        if manifest.get("quantization"):
            raise PipelineError(
                f"{store} {parent}: already quantized ({manifest['quantization']['scheme']}); "
                "quantize the float subspace instead"
            )
        options = dataclasses.replace(read_parameters(manifest["parameters"], options), quantize=scheme)
        change = Change("quantize", "quantize", [], parent, manifest)
        runner = for_work(runner, manifest["adapters"]["ok"], version_size(manifest))  # reads the version once
        version = write_version(change, None, store, runner, options, lock).version
    return {
        "version": version,
        "quantization": store.manifest(version)["quantization"],
        "bytes_before": version_bytes(store, parent),
        "bytes_after": version_bytes(store, version),
    }


def version_size(manifest: dict) -> int:
    """The bytes of every object a version uses (what a pass over it reads at most)."""
    return sum(entry["bytes"] for entry in manifest["files"].values())


def refuse_joint(store: Store, version: str | None, why: str, instead: str) -> None:
    """Commands that write flat bases only (quantize, vlora-export) refuse a version holding joint
    modules, by name."""
    version = store.require_version(version)
    joint = sorted(m for m, e in store.manifest(version)["modules"].items() if e.get("method") == "joint")
    if joint:
        raise PipelineError(f"{store} {version} has {len(joint)} joint module(s) (e.g. {joint[0]!r}): {why}; {instead}")
