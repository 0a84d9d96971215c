"""verify and export notice corrupt objects; verify checks the invariants of what it reads."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest
from conftest import make_collection, run_cli
from safetensors.torch import load, save


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture
def store(runner, tmp_path):
    make_collection(tmp_path / "src", 8)
    assert (
        run_cli("compress", "--max-error", "none", tmp_path / "src", "--out", tmp_path / "store", "--components", 4)
        == 0
    )
    return tmp_path / "store"


def _manifest(store):
    return json.loads((store / "versions" / "v000001" / "manifest.json").read_text())


def test_a_sound_store_verifies(store, capsys):
    capsys.readouterr()
    assert run_cli("verify", store, "--all") == 0
    assert capsys.readouterr().out.startswith("v000001: 6 objects, ok")


def test_one_corrupt_byte_in_a_basis_object(store, tmp_path, capsys):
    path = store / sorted(p for p in _manifest(store)["files"] if p.endswith(".safetensors"))[0]
    _flip(path, path.stat().st_size // 2)  # inside the tensor data, not the header
    capsys.readouterr()
    assert run_cli("verify", store) == 1
    out, err = capsys.readouterr()
    assert "shard-00000.safetensors: " in out and "does not match its manifest checksum" in out
    assert "verify: v000001" in err
    assert run_cli("export", store, "adapter-00001", "--out", tmp_path / "out") == 1
    assert "does not match its manifest checksum" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_corrupt_row_of_the_loadings(store, tmp_path, capsys):
    path = store / "versions" / "v000001" / "loadings.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)  # the `a` loadings
    _flip(path, chunk.data_page_offset + chunk.total_compressed_size - 8)  # in a page's payload
    capsys.readouterr()
    assert run_cli("verify", store) == 1
    assert "loadings.parquet: " in capsys.readouterr().out
    assert run_cli("export", store, "adapter-00003", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "loadings.parquet is corrupt" in err and "checksum" in err and "Traceback" not in err


def test_verify_checks_orthonormality_and_finiteness(store, capsys):
    """A store whose checksums match but whose contents break the invariants (as a bug would write)."""
    manifest = _manifest(store)
    path = sorted(p for p in manifest["files"] if p.endswith(".safetensors"))[0]
    tensors = load((store / path).read_bytes())
    modules = sorted({k.split(".A.")[0] for k in tensors if ".A." in k})
    tensors[f"{modules[0]}.A.components"] *= 2
    tensors[f"{modules[-1]}.B.mean"][0] = float("nan")
    data = save({k: v.contiguous() for k, v in tensors.items()})
    (store / path).write_bytes(data)
    manifest["files"][path] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (store / "versions" / "v000001" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("verify", store, "--json") == 1
    failures = json.loads(capsys.readouterr().out)["versions"][0]["failures"]
    assert failures == [
        f"{modules[0]} lora_A: components are not orthonormal (max |V V^T - I| = 3.00e+00)",
        f"{modules[-1]} lora_B: non-finite values in the basis",
    ]
