"""Groups of adapters (pipeline.linalg.groups): sketches, partition, nearest group; and how a
manifest's groups are checked (pipeline.io.format)."""

import pytest
import torch

from pipeline.io.format import grouped, in_group, manifest_problems, split_group
from pipeline.linalg import groups


def _adapter(generator, d_in=24, d_out=16, rank=4):
    return torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)


def test_a_sketch_depends_on_delta_w_alone_and_is_a_unit_vector():
    generator = torch.Generator().manual_seed(0)
    factors = [_adapter(generator), _adapter(generator, 8, 32)]
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    regauged = [((rotation @ a.double()).float(), (b.double() @ rotation.T).float()) for a, b in factors]
    scaled = [(3 * a, b) for a, b in factors]
    sketch = groups.sketch(factors)
    assert sketch.shape == (2 * groups.SIDE**2,)
    assert abs(float(sketch.norm()) - 1) < 1e-6
    # B A is unchanged by A -> R A, B -> B R^T, and a module's scale drops out: only rounding differs.
    assert torch.allclose(groups.sketch(regauged), sketch, atol=1e-5)
    assert torch.allclose(groups.sketch(scaled), sketch, atol=1e-6)


def _families(count=3, members=10, dims=64, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = groups.unit_rows(torch.randn(count, dims, generator=generator, dtype=torch.float64))
    rows = centres.repeat_interleave(members, 0) + spread / dims**0.5 * torch.randn(
        count * members, dims, generator=generator, dtype=torch.float64
    )
    return groups.unit_rows(rows), torch.arange(count).repeat_interleave(members)


def test_separate_families_are_partitioned_into_themselves_the_same_way_every_time():
    rows, families = _families()
    labels = groups.partition(rows, 3)
    assert torch.equal(labels, families)  # numbered by first member: family order
    assert torch.equal(groups.partition(rows, 3), labels)
    assert torch.bincount(groups.partition(rows, 5), minlength=5).min() >= 1  # never an empty group
    with pytest.raises(ValueError):
        groups.partition(rows, 31)


def test_a_new_row_joins_the_group_of_its_family():
    rows, families = _families(seed=1)
    sums = torch.zeros(3, rows.shape[1], dtype=torch.float64).index_add_(0, families, rows)
    new, new_families = _families(seed=1, members=12)  # the same centres, other members
    assert torch.equal(groups.nearest(new[1::4], sums), new_families[1::4])


def test_auto_prefers_the_families_when_each_group_can_hold_its_own():
    rows, families = _families(count=3, members=20, spread=0.05)
    count, labels = groups.choose_groups(rows, [1, 2, 3], lambda n: 1, bound=None)
    assert count == 3 and torch.equal(labels, families)


def test_stored_names_of_grouped_modules_read_back():
    stored = grouped("model.layers.3.q_proj", 12)
    assert split_group(stored) == (12, "model.layers.3.q_proj")
    assert split_group("model.layers.3.q_proj") == (None, "model.layers.3.q_proj")
    tensors = {f"{grouped('m', 0)}.A.mean": 0, f"{grouped('m', 1)}.A.mean": 1}
    assert in_group(tensors, 1) == {"m.A.mean": 1} and in_group(tensors, None) is tensors


def _manifest(modules, groups_entry=None):
    files = {"versions/v000001/basis/shard-00000.safetensors": {"bytes": 1, "sha256": "0" * 64}}
    files["versions/v000001/groups.safetensors"] = {"bytes": 1, "sha256": "0" * 64}
    entry = {"basis": next(iter(files)), "a_shape": [2, 3], "b_shape": [3, 2], "k_a": 1, "k_b": 1}
    entry |= {"explained_variance_a": 1.0, "explained_variance_b": 1.0, "svd_route": "gram"}
    manifest = {"format_version": 1, "version": "v000001", "parent": None, "files": files, "created": "t"}
    manifest |= {"original_bytes": 1, "parameters": {}, "adapters": {"ok": 1, "quarantined": 0}}
    manifest["modules"] = {m: dict(entry) for m in modules}
    if groups_entry is not None:
        manifest["groups"] = groups_entry
    return manifest


@pytest.mark.parametrize(
    "modules, entry, problem",
    [
        (["g0/m", "g1/m"], None, "modules are grouped (g<N>/...) but the manifest has no groups"),
        (["g0/m", "g2/m"], 2, "the module names are not g<N>/... for each of the 2 groups"),
        (["g0/m", "g1/n"], 2, "the groups do not all hold the same modules"),
        (["g0/m"], {"count": "1"}, "groups is {'count': '1'}, not {count (at least 2), sketches}"),
        (["g0/m", "g1/m"], {"count": True}, "groups is {'count': True}, not {count (at least 2), sketches}"),
        # A count far above the modules' is refused without counting up to it.
        (["g0/m", "g1/m"], 10**12, "the module names are not g<N>/... for each of the 1000000000000 groups"),
        (
            ["g0/m", "g1/m"],
            {"count": 2, "sketches": "versions/v000001/basis/shard-00000.safetensors"},
            "groups.sketches 'versions/v000001/basis/shard-00000.safetensors' is not the version's "
            "groups.safetensors among the files",
        ),
    ],
)
def test_a_manifest_with_unsound_groups_is_refused(modules, entry, problem):
    if isinstance(entry, int):
        entry = {"count": entry, "sketches": "versions/v000001/groups.safetensors"}
    assert problem in manifest_problems(_manifest(modules, entry), "v000001")
    sound = {"count": 2, "sketches": "versions/v000001/groups.safetensors"}
    assert manifest_problems(_manifest(["g0/m", "g1/m"], sound), "v000001") == []
