"""quantize, vlora-export and vlora-import work shard by shard: run with small shards (a small
memory bound) they write what one shard writes, each task is given only its own part (its modules,
or its batch of tasks), and what they publish verifies."""

import pyarrow as pa
import pytest
import torch
from conftest import make_collection

from pipeline.config import NO_BOUND, ComponentRule, Options
from pipeline.flow.compute import ShardTask
from pipeline.flow.vlora_import import ImportTask
from pipeline.io.format import LOADINGS
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.compress import compress
from pipeline.operations.quantize import quantize
from pipeline.operations.verify import verify_store
from pipeline.operations.vlora import TaskFiles, export_vlora, import_vlora
from pipeline.runners import SerialRunner
from pipeline.subspace import Subspace

TINY = 2000  # bytes: every micro module is its own shard
LARGE = 1 << 30  # one shard for everything


class Recording(SerialRunner):
    """In-process, keeping every task's input."""

    def __init__(self):
        self.items = []

    def map_unordered(self, fn, items, **options):
        self.items += items
        return super().map_unordered(fn, items, **options)

    def of(self, kind):
        return [item for item in self.items if isinstance(item, kind)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same collection compressed into two stores: modules in several shards, and in one."""
    root = tmp_path_factory.mktemp("sharded")
    make_collection(root / "src", 10, preset="micro")
    made = {}
    for name, budget in (("several", TINY), ("one", LARGE)):
        store = Store(Location(str(root / name)))
        options = Options(ComponentRule(3), task_memory=budget, method="flat", max_error=NO_BOUND)  # quantized
        compress(Location(str(root / "src")), store, SerialRunner(), options)
        made[name] = store
    return root, made


def _basis_objects(store: Store, version: str) -> set[str]:
    return {e["basis"] for e in store.manifest(version)["modules"].values()}


def _loadings(store: Store, version: str) -> pa.Table:
    return store.read_table(version, LOADINGS)


def _same_subspace(one: Subspace, other: Subspace) -> None:
    assert one.layer_names == other.layer_names and list(one.tasks) == list(other.tasks)
    for module in one.layer_names:
        for side in "AB":
            assert torch.equal(one.modules[module].side(side).components, other.modules[module].side(side).components)
            assert torch.equal(one.modules[module].side(side).mean, other.modules[module].side(side).mean)


def _verified(store: Store) -> None:
    assert [r["failures"] for r in verify_store(store, every=True)] == [[] for _ in store.versions()]


def test_quantize_in_shards_writes_what_one_shard_and_the_library_write(stores, tmp_path):
    root, made = stores
    assert len(_basis_objects(made["several"], "v000001")) > 1 and len(_basis_objects(made["one"], "v000001")) == 1
    assert _loadings(made["several"], "v000001").equals(_loadings(made["one"], "v000001"))
    runner = Recording()
    several = quantize(made["several"], 4, runner)
    one = quantize(made["one"], 4, SerialRunner())
    assert several["quantization"] == one["quantization"] and several["quantization"]["scheme"] == "nf4"
    assert _loadings(made["several"], several["version"]).equals(_loadings(made["one"], one["version"]))
    _same_subspace(Subspace.load(str(root / "several")), Subspace.load(str(root / "one")))
    # ...and what the in-process library's quantize makes of the same version.
    reference = Subspace.load(str(root / "one"), "v000001").quantize(4)
    assert reference.quantization["added_error"] == pytest.approx(one["quantization"]["added_error"], rel=1e-12)
    _same_subspace(reference, Subspace.load(str(root / "one")))
    # One task per basis object of the parent, given its modules and no adapter to read.
    tasks = runner.of(ShardTask)
    parent = made["several"].manifest("v000001")["modules"]
    assert len(tasks) == len(_basis_objects(made["several"], "v000001"))
    assert sorted(m for t in tasks for m in t.shard.modules) == sorted(parent)
    for task in tasks:
        assert len({parent[m]["basis"] for m in task.shard.modules}) == 1 and task.new == []
    _verified(made["several"])
    _verified(made["one"])


def test_vlora_export_and_import_in_shards_write_what_one_shard_writes(stores, tmp_path):
    root, made = stores
    store = made["one"]
    runners = {"several": Recording(), "one": Recording()}
    budgets = {"several": 24, "one": LARGE}  # 24 bytes: one task's loadings per export batch
    for name in ("several", "one"):
        out = Location(str(tmp_path / f"vlora-{name}"))
        export_vlora(store, "v000001", out, runners[name], options=Options(task_memory=budgets[name]))
    files = sorted(p.name for p in (tmp_path / "vlora-one").iterdir())
    assert len(files) == 10 + 2
    for name in files:
        assert (tmp_path / "vlora-several" / name).read_bytes() == (tmp_path / "vlora-one" / name).read_bytes()
    batches = runners["several"].of(TaskFiles)
    assert len(batches) == 10 and all(len(b.task_ids) == 1 for b in batches)
    assert len(runners["one"].of(TaskFiles)) == 1

    imported = {}
    for name, budget in (("several", TINY), ("one", LARGE)):
        target = Store(Location(str(tmp_path / f"imported-{name}")))
        runner = Recording()
        import_vlora(Location(str(tmp_path / "vlora-one")), target, runner, options=Options(task_memory=budget))
        imported[name] = (target, runner.of(ImportTask))
        _verified(target)
    (several, tasks), (one, single) = imported["several"], imported["one"]
    assert len(tasks) == 2 and len(single) == 1
    for task in tasks:  # each task is given its layers' ranges alone
        assert set(task.basis) == set(task.shard.modules) and len(task.shard.modules) == 1
        assert all(set(infos) == set(task.shard.modules) for _, infos in task.tasks)
    assert _loadings(several, "v000001").equals(_loadings(one, "v000001"))
    _same_subspace(Subspace.load(str(tmp_path / "imported-several")), Subspace.load(str(tmp_path / "imported-one")))
    # The round trip keeps every adapter's rebuilt factors.
    original, back = Subspace.load(str(root / "one"), "v000001"), Subspace.load(str(tmp_path / "imported-one"))
    for task_id in original.tasks:
        for module in original.layer_names:
            mine, theirs = original.reconstruct(task_id), back.reconstruct(task_id)
            torch.testing.assert_close(mine.lora_a[module], theirs.lora_a[module], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.lora_b[module], theirs.lora_b[module], atol=1e-5, rtol=1e-4)
