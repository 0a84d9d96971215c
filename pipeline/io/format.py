"""The store format, versions 1 and 2, in one place: object names and paths, what is read from a store
and checked (version ids, task ids, object paths), manifest.json (its fields, building and
checking one), the basis object codec, and the loadings and catalog tables (schemas, rows).
Sections follow docs/store-format.md; the Store class (pipeline.io.store) and the writer lock
(pipeline.io.lock) read and write these objects.

    STORE/LATEST                                  {"version": ..., "format_version": ...}, written last
    STORE/LOCK                                    held by the one writer at work (created if absent)
    STORE/versions/<v>/manifest.json              parameters, modules, files with sizes and sha256
    STORE/versions/<v>/basis/shard-NNNNN.safetensors
    STORE/versions/<v>/loadings.parquet           one row per (task_id, module), sorted by task_id
    STORE/versions/<v>/catalog.parquet            one row per adapter, quarantined ones too
    STORE/versions/<v>/residuals.parquet          format 2 only: adapters' own factors beyond the shared ones
    STORE/versions/<v>/report.json
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import save as save_safetensors

from pipeline import __version__
from pipeline.config import METHODS, ComponentRule, Options
from pipeline.errors import IntegrityError, PipelineError
from pipeline.io.location import redact
from pipeline.linalg import groups as groups_math
from pipeline.linalg import quantize
from pipeline.linalg.decompose import Decomposition
from pipeline.linalg.gauge import JointBasis

# -- layout: object names and paths -------------------------------------------------------------

FORMAT_VERSION = 2  # the newest this code reads and writes
# A version without residuals is written as format 1, which every reader of format 1 reads; one
# holding residuals is format 2, so that readers that would export it without them refuse it.
PLAIN_FORMAT_VERSION = 1
POINTER = "LATEST"
LOCK = "LOCK"
RUN = "run.json"  # present while the run that writes a version has not published it
MANIFEST = "manifest.json"
LOADINGS = "loadings.parquet"
CATALOG = "catalog.parquet"
RESIDUALS = "residuals.parquet"
REPORT = "report.json"
LOADINGS_ROW_GROUP = 8192
VERSION_RE = re.compile(r"^v(\d{6})$")
# A task id, and each part of an object path below a version folder: what scan accepts on the way
# in (no part starts with '.', so '..' never passes). RE2 syntax too, for pyarrow.compute.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._=+-]*"
SAFE_TASK_ID = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_OBJECT_PATH_RE = re.compile(rf"^versions/v\d{{6}}(/{_SEGMENT})+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


def basis_file(shard: str) -> str:
    return f"basis/{shard}.safetensors"


def staging_file(shard: str) -> str:
    return f"staging/loadings-{shard}.parquet"


def residual_staging_file(shard: str) -> str:
    return f"staging/residuals-{shard}.parquet"


def done_file(shard: str) -> str:
    """Written by a shard task after its basis object and staged loadings: the shard is finished."""
    return f"staging/{shard}.json"


def version_path(version: str, name: str) -> str:
    """A version's object as a path relative to the store root, as manifests list files."""
    return f"versions/{version}/{name}"


def basis_key(module: str, side: str, field: str) -> str:
    return f"{module}.{side}.{field}"


# -- groups (clustered bases) ----------------------------------------------------------------------
# A grouped version stores each group's bases as modules of their own, named `g<N>/<module>`: every
# step that works per module works per group unchanged; export and evaluate read an adapter's
# modules under their PEFT names again (group_view).
GROUPS = "groups.safetensors"
_GROUPED_RE = re.compile(r"^g(\d{1,4})/(.+)$")


def grouped(module: str, group: int) -> str:
    """The stored name of `module`'s bases for `group`."""
    return f"g{group}/{module}"


def split_group(stored: str) -> tuple[int | None, str]:
    """(group, PEFT module name) of a stored module name; (None, name) for an ungrouped one."""
    match = _GROUPED_RE.match(stored)
    return (int(match[1]), match[2]) if match else (None, stored)


def in_group(mapping: dict, group: int | None) -> dict:
    """The entries of `group` of a mapping keyed by stored module names (manifest modules, basis
    tensor keys, an adapter's loadings or residuals), keyed by PEFT names: a grouped version read
    as the ungrouped version of that group's adapters. An ungrouped version's (None) as it is."""
    if group is None:
        return mapping
    prefix = grouped("", group)
    return {key[len(prefix) :]: value for key, value in mapping.items() if key.startswith(prefix)}


def group_of(stored_modules) -> int | None:
    """The group of an adapter from the stored names of its loadings rows (None: ungrouped)."""
    return split_group(next(iter(stored_modules)))[0]


def groups_tensors(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """groups.safetensors: each group's sum of member sketches (K, S) and members seen (K,)."""
    return {"sums": sums.detach().to("cpu", torch.float64), "counts": counts.detach().to("cpu", torch.int64)}


def sketch_width(modules: dict) -> int:
    """Values of one adapter's sketch in a grouped version (linalg.groups.sketch): SIDE² a module."""
    return len(in_group(modules, 0)) * groups_math.SIDE**2


def read_groups(
    tensors: dict[str, torch.Tensor], count: int, width: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of a groups object, checked against the manifest: `count` groups, sketches
    of `width` values, finite sums, counts not below zero."""
    sums, counts = tensors.get("sums"), tensors.get("counts")
    sound = (
        sums is not None
        and counts is not None
        and sums.shape == (count, width)
        and counts.shape == (count,)
        and bool(torch.isfinite(sums).all())
        and bool((counts >= 0).all())
    )
    if not sound:
        raise IntegrityError(f"{where}: not the sketch sums ({count} x {width}) and counts of {count} groups")
    return sums.double(), counts.long()


def pointer_record(version: str, format_version: int = PLAIN_FORMAT_VERSION) -> bytes:
    """LATEST's content: the version and its manifest's format version."""
    return json.dumps({"version": version, "format_version": format_version}).encode() + b"\n"


def check_bytes(data: bytes, expected: dict, name: str) -> None:
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise IntegrityError(
            f"{redact(name)} does not match its manifest checksum: the object is corrupt or was replaced"
        )


def is_safe_task_id(task_id: object) -> bool:
    """A task id as scan accepts it: relative, parts of letters, digits and ._=+-, none starting with '.'."""
    return isinstance(task_id, str) and SAFE_TASK_ID.match(task_id) is not None


def safe_task_id(task_id: object, where: str) -> str:
    """`task_id` read from `where` (a store object), or IntegrityError: used as a path by export."""
    if not is_safe_task_id(task_id):
        raise IntegrityError(
            f"{where} holds task id {task_id!r}, which is not a safe relative path (letters, digits, ._=+- and /)"
        )
    return task_id


def unsafe_task_ids(column) -> list:
    """The values of a task_id column (pyarrow) that are not safe task ids (nulls too), in order."""
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(column, SAFE_TASK_ID.pattern), False))
    return pc.filter(column, bad).to_pylist()


def check_version_id(version: object, where: str | None = None) -> str:
    """A version id (v + 6 digits); anything else (`../x`, a path into another store) is refused:
    IntegrityError naming `where` when read from a store, PipelineError when the user typed it."""
    if isinstance(version, str) and VERSION_RE.match(version):
        return version
    if where is None:
        raise PipelineError(f"{version!r} is not a version id (v and 6 digits, e.g. v000001)")
    raise IntegrityError(f"{where}: {version!r} is not a version id (v and 6 digits)")


def is_object_path(path: object) -> bool:
    """A manifest's file path: `versions/vNNNNNN/...`, relative, no empty, '.' or '..' parts."""
    return isinstance(path, str) and _OBJECT_PATH_RE.match(path) is not None


# -- manifest.json ---------------------------------------------------------------------------------


def manifest_fields(version: str, parent: str | None, operation: str, format_version: int = 1) -> dict:
    """The fields every manifest starts with."""
    return {
        "format_version": format_version,
        "version": version,
        "parent": parent,
        "operation": operation,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"lora-subspace {__version__}",
    }


def build_manifest(
    version: str,
    parent: str | None,
    operation: str,
    *,
    source: str | None,
    parameters: dict,
    adapters: dict,
    original_bytes: int,
    base_model: str | None,
    dtype: str | None,
    error: dict,
    quantization: dict | None,
    modules: dict,
    files: dict,
    residuals: dict | None = None,
    groups: dict | None = None,
) -> dict:
    """A version's manifest: every field of the table in docs/store-format.md. A version holding
    residuals (`residuals`: {adapters, modules, bytes}) is format 2."""
    format_version = FORMAT_VERSION if residuals else PLAIN_FORMAT_VERSION
    return {
        **manifest_fields(version, parent, operation, format_version),
        "source": source,
        "parameters": parameters,
        "adapters": adapters,
        "original_bytes": original_bytes,
        "base_model": base_model,
        "dtype": dtype,
        "error": error,
        "quantization": quantization,
        "modules": modules,
        "files": files,
        **({"residuals": residuals} if residuals else {}),
        **({"groups": groups} if groups else {}),
    }


# Manifest `parameters`: the fit's part of Options, which project and rebase reuse. Stores written
# before these keys existed lack them (and a saved Subspace records no budget): read as these.
_ABSENT_IN_EARLY_STORES = {
    "quantize": None,
    "method": "flat",
    "ratio": None,
    "budget_bytes": None,
    "max_error": None,
    "clusters": None,
}
_REQUIRED_PARAMETERS = ("components", "variance_threshold", "adaptive", "svd_route")


def write_parameters(options: Options) -> dict:
    """Manifest `parameters` of a version fitted with `options` (its stored part only)."""
    rule = options.rule
    return {
        "components": rule.components,
        "variance_threshold": None if rule.components is not None else rule.variance_threshold,
        "adaptive": rule.adaptive,
        "svd_route": options.route,
        "quantize": options.quantize,
        "method": options.method,
        "ratio": options.ratio,
        "budget_bytes": options.budget_bytes,
        **({"max_error": options.bound} if options.bound is not None else {}),  # absent: no bound
        **({"clusters": options.clusters} if options.clusters is not None else {}),  # absent: one basis
    }


def read_parameters(parameters: dict, run: Options | None = None, where: str = "manifest") -> Options:
    """The Options a version was fitted with (its manifest `parameters`), carrying `run`'s own
    knobs (task memory, strict; max_error where the run gives one, else the stored bound);
    PipelineError naming every problem of the stored values."""
    missing = [key for key in _REQUIRED_PARAMETERS if key not in parameters]
    if missing:
        raise PipelineError(f"{where}: parameters lack {', '.join(missing)}")
    p = {**_ABSENT_IN_EARLY_STORES, **parameters}
    threshold = 0.6 if p["variance_threshold"] is None else p["variance_threshold"]  # not recorded with a k
    options = dataclasses.replace(
        run or Options(),
        rule=ComponentRule(p["components"], threshold, p["adaptive"]),
        route=p["svd_route"],
        quantize=p["quantize"],
        method=p["method"],
        ratio=p["ratio"],
        budget_bytes=p["budget_bytes"],
        max_error=p["max_error"] if run is None or run.max_error is None else run.max_error,
        clusters=p["clusters"],
    )
    problems = options.without_idle_adaptive().problems(lambda key: f"parameters.{key}")
    if problems:
        raise PipelineError(f"{where}: {'; '.join(problems)}")
    return options


def module_entry(
    basis: str,
    a_shape,
    b_shape,
    k_a: int,
    k_b: int,
    explained_a: float,
    explained_b: float,
    svd_route: str,
    count: int,
    **extra,
) -> dict:
    """A manifest's `modules` entry; `extra`: `method`, and for joint modules `width` and
    `core_rank`, with a byte budget `budget`."""
    return {
        "basis": basis,
        "a_shape": list(a_shape),
        "b_shape": list(b_shape),
        "k_a": k_a,
        "k_b": k_b,
        "explained_variance_a": round(explained_a, 6),
        "explained_variance_b": round(explained_b, 6),
        "svd_route": svd_route,
        "count": count,
        **extra,
    }


def _need(problems: list[str], container: dict, key: str, kinds, label: str, optional: bool = False) -> bool:
    """Whether `container[key]` is of `kinds` (never a bool); if not, a problem naming `label`.
    An `optional` key may be absent."""
    if optional and key not in container:
        return False
    value = container.get(key)
    if isinstance(value, bool) or not isinstance(value, kinds):
        problems.append(f"{label} is {'missing' if key not in container else type(value).__name__}")
        return False
    return True


# Top-level manifest fields checked by type alone, in report order: (key, kinds, optional).
_TYPED_FIELDS = (
    ("created", str, False),
    ("operation", str, True),  # early format-1 manifests lack it
    ("original_bytes", int, False),
    ("parameters", dict, False),
)
# adapters.<key>, all counts: in_basis is absent from early format-1 manifests.
_ADAPTER_COUNTS = (("ok", False), ("quarantined", False), ("in_basis", True))


def manifest_problems(manifest: object, version: str) -> list[str]:
    """What makes a parsed manifest unusable: every field a reader relies on, with its type (fields
    that early format-1 manifests lack, `operation`, `adapters.in_basis` and a module's `count`,
    only when present); every file path a store path; every module's basis one of the files.
    Empty when it is sound."""
    if not isinstance(manifest, dict):
        return [f"not a JSON object ({type(manifest).__name__})"]
    problems = _identity_problems(manifest, version)
    for key, kinds, optional in _TYPED_FIELDS:
        _need(problems, manifest, key, kinds, key, optional)
    method = manifest["parameters"].get("method", "flat") if isinstance(manifest.get("parameters"), dict) else "flat"
    if method not in METHODS:  # absent from early stores: flat (_ABSENT_IN_EARLY_STORES)
        problems.append(f"parameters.method {method!r} is not one of {', '.join(METHODS)}")
    if _need(problems, manifest, "adapters", dict, "adapters"):
        for key, optional in _ADAPTER_COUNTS:
            _need(problems, manifest["adapters"], key, int, f"adapters.{key}", optional)
    files = manifest.get("files")
    if _need(problems, manifest, "files", dict, "files"):
        problems += [problem for path, entry in files.items() for problem in _file_problems(path, entry)]
    if _need(problems, manifest, "modules", dict, "modules"):
        for module, entry in manifest["modules"].items():
            problems += _module_problems(module, entry, files)
        problems += _groups_problems(manifest.get("groups"), manifest["modules"], files)
    return problems


def _groups_problems(groups: object, modules: dict, files: object) -> list[str]:
    """`groups` (absent: one basis per module): a count of at least 2, its sketches object among
    the files; every module name of a grouped version `g<N>/...`, each group 0..count-1 holding
    the same modules, and none so named otherwise."""
    numbered = [split_group(m)[0] for m in modules]
    if groups is None:
        return (
            ["modules are grouped (g<N>/...) but the manifest has no groups"]
            if any(n is not None for n in numbered)
            else []
        )
    count = groups.get("count") if isinstance(groups, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        return [f"groups is {groups!r}, not {{count (at least 2), sketches}}"]
    problems = []
    sketches = groups.get("sketches")
    if isinstance(files, dict) and (sketches not in files or not str(sketches).endswith(f"/{GROUPS}")):
        problems.append(f"groups.sketches {sketches!r} is not the version's {GROUPS} among the files")
    present = set(numbered)  # never range(count): a hostile count may be huge
    if None in present or len(present) != count or present != set(range(len(present))):
        problems.append(f"the module names are not g<N>/... for each of the {count} groups")
    elif len({frozenset(in_group(modules, g)) for g in range(count)}) != 1:
        problems.append("the groups do not all hold the same modules")
    return problems


def _identity_problems(manifest: dict, version: str) -> list[str]:
    """format_version (one this code reads), version (the folder's) and parent (a version id or null)."""
    problems = []
    if (
        _need(problems, manifest, "format_version", int, "format_version")
        and manifest["format_version"] > FORMAT_VERSION
    ):
        problems.append(f"format_version {manifest['format_version']}: this lora-subspace reads up to {FORMAT_VERSION}")
    if manifest.get("version") != version:
        problems.append(f"version is {manifest.get('version')!r}, not {version!r}")
    parent = manifest.get("parent")
    if "parent" not in manifest:
        problems.append("parent is missing")
    elif parent is not None and not (isinstance(parent, str) and VERSION_RE.match(parent)):
        problems.append(f"parent {parent!r} is not a version id")
    return problems


def _file_problems(path: object, entry: object) -> list[str]:
    """One `files` entry: a store path mapped to {bytes, sha256}."""
    if not is_object_path(path):
        return [f"file {path!r} is not a store path (versions/vNNNNNN/..., no '..')"]
    sound = (
        isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and entry["bytes"] >= 0
        and isinstance(entry.get("sha256"), str)
        and _SHA256_RE.match(entry["sha256"])
    )
    return [] if sound else [f"file {path!r}: entry is not {{bytes, sha256}}"]


def _module_problems(module: str, entry: object, files: object) -> list[str]:
    """One `modules` entry: its basis among `files`, two positive 2-d shapes, ranks and counts
    (and a joint module's width and core rank), explained variances, the SVD route."""
    label = f"module {module!r}"
    if not isinstance(entry, dict):
        return [f"{label} is {type(entry).__name__}"]
    problems = []
    basis = entry.get("basis")
    if isinstance(files, dict) and not (isinstance(basis, str) and basis in files):
        problems.append(f"{label}: basis {basis!r} is not one of the files")
    for key in ("a_shape", "b_shape"):
        shape = entry.get(key)
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            problems.append(f"{label}: {key} is {shape!r}")
    for key in ("k_a", "k_b", "count") + (("width", "core_rank") if entry.get("method") == "joint" else ()):
        _need(problems, entry, key, int, f"{label}.{key}", optional=key == "count")
    for key in ("explained_variance_a", "explained_variance_b"):
        _need(problems, entry, key, (int, float), f"{label}.{key}")
    _need(problems, entry, "svd_route", str, f"{label}.svd_route")
    return problems


def encode_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


# -- basis/shard-NNNNN.safetensors -------------------------------------------------------------


def encode_basis(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format_version": str(PLAIN_FORMAT_VERSION)}
    )


def basis_tensors(
    module: str, side: str, dec: Decomposition, packed: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One module side's entries of a basis object; `packed`: its components as quantize.encode
    stored them (`M.S.components.int8` ...), in place of float32 components."""
    fields = {
        "singular_values": dec.singular_values,
        "mean": dec.mean,
        "total_variance": torch.tensor([dec.total_variance], dtype=torch.float64),
        "count": torch.tensor([dec.count], dtype=torch.int64),
    }
    if packed is None:
        fields["components"] = dec.components
    else:
        fields.update({f"components.{name}": value for name, value in packed.items()})
    return {basis_key(module, side, name): value.detach().to("cpu") for name, value in fields.items()}


def decode_basis(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A basis object's tensors with packed components decoded to float32 `M.S.components`."""
    decoded, packed = {}, {}
    for key, value in tensors.items():
        head, _, tail = key.rpartition(".components.")
        if head and tail in quantize.FIELDS:
            packed.setdefault(head, {})[tail] = value
        else:
            decoded[key] = value
    for head, fields in packed.items():
        decoded[f"{head}.components"] = quantize.decode(fields, tensors[f"{head}.mean"].shape[0])
    return decoded


def joint_tensors(module: str, basis: JointBasis, count: int) -> dict[str, torch.Tensor]:
    """A joint module's entries of a basis object: U (d_out, c), V (d_in, c), adapters seen."""
    return {
        basis_key(module, "joint", "u"): basis.u.detach().to("cpu", torch.float32),
        basis_key(module, "joint", "v"): basis.v.detach().to("cpu", torch.float32),
        basis_key(module, "joint", "count"): torch.tensor([count], dtype=torch.int64),
    }


def read_joint(tensors: dict[str, torch.Tensor], module: str) -> JointBasis | None:
    """A module's joint bases from a decoded basis object; None for a flat module."""
    u = tensors.get(basis_key(module, "joint", "u"))
    if u is None:
        return None
    return JointBasis(u, tensors[basis_key(module, "joint", "v")], 0.0, 0.0, 0)


def read_decomposition(tensors: dict[str, torch.Tensor], module: str, side: str) -> Decomposition:
    """A module side's Decomposition from a decoded basis object."""
    return Decomposition(
        tensors[basis_key(module, side, "components")],
        tensors[basis_key(module, side, "singular_values")],
        tensors[basis_key(module, side, "mean")],
        float(tensors[basis_key(module, side, "total_variance")]),
        "stored",
        int(tensors[basis_key(module, side, "count")]),
    )


# -- loadings.parquet ------------------------------------------------------------------------------

LOADINGS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("module", pa.string()),
        ("a", pa.list_(pa.float32())),
        ("b", pa.list_(pa.float32())),
        ("error", pa.float32()),
        ("measured", pa.bool_()),
        ("norm", pa.float32()),
    ]
)
LOADINGS_KEYS = ["task_id", "module"]


def loadings_rows(task_ids, module, la, lb, error, norm, measured=True) -> pa.Table:
    """Loadings table rows (LOADINGS_SCHEMA) of one module; `measured`: a bool, or one per row."""
    return pa.table(
        {
            "task_id": pa.array(task_ids, pa.string()),
            "module": pa.array([module] * len(task_ids), pa.string()),
            "a": _lists(la),
            "b": _lists(lb),
            "error": pa.array(error.numpy().astype(np.float32)),
            "measured": pa.array(np.full(len(task_ids), measured)),
            "norm": pa.array(norm.numpy().astype(np.float32)),
        }
    )


def _lists(values: torch.Tensor) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.numpy().astype(np.float32).reshape(-1)))


def loadings_matrix(rows: pa.Table, column: str, width: int | None = None) -> torch.Tensor:
    """(rows, k) float32 loadings of a column; `width` k when there may be no rows."""
    values = rows.column(column).combine_chunks()
    if width is None:
        width = len(values[0]) if len(values) else 0
    return torch.from_numpy(values.flatten().to_numpy().astype(np.float32).reshape(len(values), width))


# -- catalog.parquet -------------------------------------------------------------------------------

CATALOG_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("warnings", pa.list_(pa.string())),
        ("weights_bytes", pa.int64()),
        ("weights_tag", pa.string()),
        ("rank", pa.int32()),
        ("lora_alpha", pa.float64()),
        ("use_rslora", pa.bool_()),
        ("base_model", pa.string()),
        ("dtype", pa.string()),
        ("config_json", pa.string()),
        ("in_basis", pa.bool_()),
        ("weights_sha256", pa.string()),  # null on S3 and in catalogs written before it existed
    ]
)


# -- residuals.parquet (format 2) --------------------------------------------------------------------

# One row per (task_id, module) whose shared reconstruction misses the version's max_error: kind
# add (factors exported beside the shared ones) or exact (exported in their place), rank s, a
# (s*d_in) and b (d_out*s) row-major, values of the adapter's dtype; shared_error: the module's
# error without the residual (the loadings' error column holds the error with it).
RESIDUALS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("module", pa.string()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("a", pa.list_(pa.float32())),
        ("b", pa.list_(pa.float32())),
        ("shared_error", pa.float32()),
    ]
)


def residual_table(rows: list[dict]) -> pa.Table:
    """Residuals rows (RESIDUALS_SCHEMA) sorted by task_id, module; each row's a and b tensors
    (s, d_in) and (d_out, s) are stored flattened."""
    rows = sorted(rows, key=lambda row: (row["task_id"], row["module"]))
    return pa.table(
        {
            "task_id": pa.array([row["task_id"] for row in rows], pa.string()),
            "module": pa.array([row["module"] for row in rows], pa.string()),
            "kind": pa.array([row["kind"] for row in rows], pa.string()),
            "rank": pa.array([row["a"].shape[0] for row in rows], pa.int32()),
            "a": pa.array([row["a"].reshape(-1).numpy() for row in rows], pa.list_(pa.float32())),
            "b": pa.array([row["b"].reshape(-1).numpy() for row in rows], pa.list_(pa.float32())),
            "shared_error": pa.array([row["shared_error"] for row in rows], pa.float32()),
        },
        schema=RESIDUALS_SCHEMA,
    )


def residual_factors(row: dict, a_shape, b_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A residuals row's factors (rank, d_in), (d_out, rank) float32; IntegrityError when its
    sizes do not fit the module's shapes."""
    rank = row["rank"]
    a, b = row["a"], row["b"]
    if not (isinstance(rank, int) and rank > 0 and len(a) == rank * a_shape[1] and len(b) == b_shape[0] * rank):
        raise IntegrityError(
            f"residual of {row['task_id']!r} {row['module']!r}: rank {rank!r} with {len(a)} and {len(b)} values "
            f"does not fit lora_A (., {a_shape[1]}) and lora_B ({b_shape[0]}, .)"
        )
    return (
        torch.tensor(a, dtype=torch.float32).view(rank, a_shape[1]),
        torch.tensor(b, dtype=torch.float32).view(b_shape[0], rank),
    )
