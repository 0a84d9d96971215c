import json
import struct

import fsspec
import pytest
import torch
from safetensors.torch import load, save

from pipeline.errors import AdapterError, PipelineError
from pipeline.io.adapters import read_ranges
from pipeline.io.safetensors_ranges import coalesce, decode, encode, parse_full_header, parse_header


def _file(tensors):
    return save(tensors)


def _raw(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def test_header_gives_absolute_ranges_that_decode_to_the_tensors():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.ones(2, 3, dtype=torch.bfloat16)
    blob = _file({"a": a, "b": b})
    _, infos = parse_header(blob, len(blob))
    assert infos["a"].shape == (3, 4) and infos["b"].dtype == "BF16"
    for name, tensor in {"a": a, "b": b}.items():
        info = infos[name]
        assert torch.equal(decode(blob[info.start : info.end], info), tensor)


def test_short_probe_asks_for_the_rest_of_a_long_header():
    blob = _file({f"t{i}": torch.zeros(1) for i in range(50)})
    length, infos = parse_header(blob[:64], len(blob))
    assert infos is None
    assert len(parse_full_header(blob[8 : 8 + length], len(blob))) == 50


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9) + b"{}", "header length 1000000000 does not fit"),
        (struct.pack("<Q", 4) + b"{no}", "not valid JSON"),
        (_raw({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "lie outside"),
        (_raw({"t": {"dtype": "I4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unsupported dtype 'I4'"),
        (_raw({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12 bytes"),
        (_raw({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
        (
            _raw(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
    ],
)
def test_malformed_files_are_refused_with_a_reason(blob, match):
    with pytest.raises(AdapterError, match=match):
        parse_header(blob, len(blob))


def test_huge_declared_shape_is_refused_before_any_allocation():
    blob = _raw({"t": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(AdapterError, match="needs 4000000000000 bytes"):
        parse_header(blob, len(blob))


def test_coalesce_merges_touching_and_near_ranges_only():
    assert coalesce([(10, 20), (0, 10), (5000, 6000), (20, 30)], max_gap=100) == [(0, 30), (5000, 6000)]


def test_encode_writes_what_the_library_writes_and_loads():
    """encode (export's writer) against safetensors.torch: the same bytes for an adapter's
    tensors, every dtype read back equal, views of larger tensors written as their own values."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 4, 6, generator=gen)
    tensors = {
        "b.lora_B.weight": torch.randn(6, 4, generator=gen).to(torch.bfloat16),
        "a.lora_A.weight": rows[1].to(torch.bfloat16),  # a view of the middle of a batch
        "c": torch.randn(5, generator=gen).to(torch.float16),
        "d": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "e": torch.randn(3, 2, generator=gen).T,  # not contiguous
    }
    same_dtype = {k: v for k, v in tensors.items() if v.dtype == torch.bfloat16}
    assert encode(same_dtype, {"format": "pt"}) == save(
        {k: v.contiguous() for k, v in same_dtype.items()}, {"format": "pt"}
    )
    loaded = load(encode(tensors, {"format": "pt"}))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert load(encode({})) == {}


def test_a_file_cut_short_after_its_scan_is_named_once_not_retried(tmp_path):
    blob = _file({"a": torch.ones(64), "b": torch.ones(64)})
    _, infos = parse_header(blob, len(blob))
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(blob)
    fs = fsspec.filesystem("file")
    (stacks,), requests = read_ranges(fs, [(str(path), [infos["a"], infos["b"]])])
    assert requests == 1 and torch.equal(decode(stacks[1], infos["b"]), torch.ones(64))
    path.write_bytes(blob[:-10])
    with pytest.raises(PipelineError, match=r"adapter_model.safetensors changed after it was scanned: .* run again"):
        read_ranges(fs, [(str(path), [infos["a"], infos["b"]])])
