"""vlora's on-disk layout (SharedSubspace.save of vlora-dev 0.2), read by ranges and written as a
stream, so no process holds a whole subspace of it.

    DIR/subspace_meta.json        {"layer_names", "task_ids", "rank", "num_components"}
    DIR/subspace.safetensors      <layer>.components_a / _b (k, D), .sv_a / _b (k,), .mean_a / _b (D,)
    DIR/task_<task_id>.safetensors <layer>.loadings_a / _b (k,)

Everything read is untrusted: the description and every header are checked before a byte of
tensor data is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.errors import AdapterError, IntegrityError, PipelineError
from pipeline.io.adapters import read_tensor_table
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import TensorInfo

META = "subspace_meta.json"
BASIS = "subspace.safetensors"
FIELDS = ("components", "sv", "mean")  # per layer and side in BASIS


def task_file(task_id: str) -> str:
    return f"task_{task_id}.safetensors"


@dataclass
class Layout:
    """A vlora folder's description and where each layer's basis lies in BASIS."""

    folder: Location
    layers: list[str]
    task_ids: list[str]
    rank: int
    num_components: int | None
    basis: dict[str, dict[str, TensorInfo]]  # layer -> "components_a" ... "mean_b" -> its range in BASIS

    def k(self, layer: str, side: str) -> int:
        return self.basis[layer][f"components_{side}"].shape[0]

    def width(self, layer: str, side: str) -> int:
        return self.basis[layer][f"mean_{side}"].shape[0]


def read_layout(where: Location) -> Layout:
    """The folder's description and its basis header, checked: every layer's components, singular
    values and means, of shapes that agree with each other and with the rank."""
    try:
        meta = json.loads(where.read_bytes(META))
        layers, task_ids, rank = list(meta["layer_names"]), list(meta["task_ids"]), int(meta["rank"])
        num_components = int(meta.get("num_components") or 0) or None
        infos = read_header(where, BASIS)
    except FileNotFoundError as exc:
        raise PipelineError(f"{where} is not a vlora subspace folder: {exc.filename or exc} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{where}/{META} is not a vlora subspace description: {exc!r}") from None
    except AdapterError as exc:
        raise PipelineError(f"{where}/{BASIS}: {exc}") from None
    if not layers or rank <= 0:
        raise PipelineError(f"{where}/{META}: no layers, or rank {rank}")
    repeated = sorted(t for t, n in Counter(t for t in task_ids if isinstance(t, str)).items() if n > 1)
    if repeated:  # one loadings file per task: a second listing would be dropped, or stored twice
        more = f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else ""
        raise PipelineError(f"{where}/{META}: task {repeated[0]!r} is listed more than once in task_ids{more}")
    basis = {}
    for layer in layers:
        try:
            basis[layer] = {f"{f}_{s}": infos[f"{layer}.{f}_{s}"] for s in "ab" for f in FIELDS}
        except KeyError as exc:
            raise PipelineError(f"{where}/{BASIS} has no {exc.args[0]}") from None
        for side in "ab":
            _check_side(where, layer, side, basis[layer], rank)
    return Layout(where, layers, task_ids, rank, num_components, basis)


def _check_side(where: Location, layer: str, side: str, infos: dict[str, TensorInfo], rank: int) -> None:
    components, sv, mean = (infos[f"{f}_{side}"] for f in FIELDS)
    width = math.prod(mean.shape)
    if len(components.shape) != 2 or components.shape[1] != width or sv.shape != components.shape[:1] or width % rank:
        raise PipelineError(
            f"{where}/{BASIS}: {layer} lora_{side.upper()} has components {list(components.shape)}, "
            f"singular values {list(sv.shape)}, mean {list(mean.shape)} for rank {rank}"
        )


def read_header(where: Location, name: str) -> dict[str, TensorInfo]:
    """A safetensors file's tensor table, from its header alone."""
    path = where.path(name)
    return read_tensor_table(path, where.fs.size(path), where.fs)


def task_loadings(where: Location, task_id: str, layout: Layout) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Where a task's loadings of every layer lie in its file, each of shape (k,)."""
    name = task_file(task_id)
    try:
        infos = read_header(where, name)
    except FileNotFoundError:
        raise PipelineError(f"{where}: task {task_id!r} has no {name}") from None
    except AdapterError as exc:
        raise PipelineError(f"{where}/{name}: {exc}") from None
    found = {}
    for layer in layout.layers:
        pair = []
        for side in "ab":
            key = f"{layer}.loadings_{side}"
            if key not in infos:
                raise PipelineError(f"{where}/{name} has no {key}")
            k = layout.k(layer, side)
            if infos[key].shape != (k,):
                raise PipelineError(f"{where}: task {task_id!r}: {layer} loadings_{side} must have shape ({k},)")
            pair.append(infos[key])
        found[layer] = (pair[0], pair[1])
    return found


def write_streamed(where: Location, name: str, shapes: dict[str, tuple[int, ...]], tensors: Iterable) -> None:
    """A float32 safetensors file written as a stream: the header from `shapes` (name -> shape,
    in file order), then each tensor `tensors` yields, in that order, each checked against its
    shape. Memory: one tensor at a time."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    path = where.path(name)
    if where.is_local:
        where.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with where.fs.open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for key, tensor in zip(shapes, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise IntegrityError(f"{where}/{name}: {key} has shape {list(tensor.shape)}, not {list(shapes[key])}")
            handle.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
