"""Safetensors headers and tensor byte ranges, read without loading whole files.

A safetensors file is `<u64 little-endian header length N><N bytes of JSON><data>`. The header is
untrusted input: every length, offset and shape is checked against the file size before anything
is allocated, so a hostile or truncated file is refused with a reason instead of read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from pipeline.errors import AdapterError
from pipeline.io.location import printable

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}

# One read of this many bytes usually holds the whole header; a larger header costs a second read.
HEADER_PROBE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 200_000  # entries of one header (100,000 LoRA modules): what one scan record may hold
MAX_NAME = 1024  # characters of a tensor name


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file: absolute byte range [start, end)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_header(head: bytes, file_size: int) -> tuple[int, dict | None]:
    """Header length from the first bytes, and the parsed header if `head` already holds it all."""
    if file_size < 8 or len(head) < 8:
        raise AdapterError(f"safetensors file is truncated: {file_size} bytes, no header length")
    (length,) = struct.unpack("<Q", head[:8])
    if length == 0 or length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise AdapterError(f"safetensors header length {length} does not fit a file of {file_size} bytes")
    if len(head) < 8 + length:
        return length, None
    return length, _tensor_infos(head[8 : 8 + length], file_size, data_start=8 + length)


def parse_full_header(header: bytes, file_size: int) -> dict[str, TensorInfo]:
    return _tensor_infos(header, file_size, data_start=8 + len(header))


def _tensor_infos(header: bytes, file_size: int, data_start: int) -> dict[str, TensorInfo]:
    try:
        entries = json.loads(header)
    except RecursionError:
        raise AdapterError("safetensors header is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of too many digits
        raise AdapterError(f"safetensors header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(entries, dict):
        raise AdapterError("safetensors header is not a JSON object")
    entries.pop("__metadata__", None)
    if len(entries) > MAX_TENSORS:
        raise AdapterError(f"safetensors header lists {len(entries)} tensors, more than the {MAX_TENSORS} accepted")
    data_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in entries.items():
        infos[name] = _tensor_info(name, entry, data_start, data_size)
    spans = sorted((i.start, i.end, n) for n, i in infos.items())
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise AdapterError(f"tensors {name!r} and {other!r} overlap in the safetensors file")
    return infos


def _tensor_info(name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if len(name) > MAX_NAME:
        raise AdapterError(f"tensor name of {len(name)} characters (at most {MAX_NAME}): {printable(repr(name), 64)}")
    if not isinstance(entry, dict):
        raise AdapterError(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise AdapterError(
            f"tensor {name!r}: unsupported dtype {printable(repr(dtype), 64)} (expected one of {sorted(DTYPES)})"
        )
    if not (isinstance(shape, list) and len(shape) <= 8 and all(isinstance(d, int) and 0 <= d < 2**62 for d in shape)):
        raise AdapterError(f"tensor {name!r}: bad shape {printable(repr(shape), 64)}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise AdapterError(
            f"tensor {name!r}: data offsets {printable(repr(offsets), 64)} "
            f"lie outside the file's {data_size} data bytes"
        )
    expected = math.prod(shape) * ITEM_SIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise AdapterError(
            f"tensor {name!r}: shape {printable(repr(shape), 64)} of {dtype} "
            f"needs {printable(str(expected), 32)} bytes, "
            f"offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def decode(buffer: bytes | bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    """A tensor from its raw little-endian bytes (a copy the caller owns)."""
    flat = torch.frombuffer(bytearray(buffer), dtype=DTYPES[info.dtype])
    return flat.reshape(info.shape)


def coalesce(ranges: list[tuple[int, int]], max_gap: int = 4096) -> list[tuple[int, int]]:
    """Merge byte ranges of one file that touch or nearly touch, so one request reads them all."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= max_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of `tensors` (F64/F32/F16/BF16, any layout), tensors in name order: the
    format safetensors.torch.save writes and every safetensors reader loads, in one copy of the
    data (the library's save costs five times that on the many small tensors of an adapter)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    data = [tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy() for name in names]
    return b"".join([struct.pack("<Q", len(text)), text, *data])
