import pytest

from pipeline import peft_format
from pipeline.cli import parse_size
from pipeline.flow.plan import plan_shards, shard_bytes
from pipeline.io.format import manifest_problems
from pipeline.io.location import redact


def test_shards_cover_every_module_once_within_budget():
    widths = {f"layers.{i}.{m}": 1000 for i in range(10) for m in ("q", "v")}
    budget = shard_bytes(100, [1000] * 4)
    shards = plan_shards(widths, 100, budget, parallelism=1)
    assert sorted(m for s in shards for m in s.modules) == sorted(widths)
    assert all(shard_bytes(100, [1000] * len(s.modules)) <= budget for s in shards)
    assert [s.name for s in shards][:2] == ["shard-00000", "shard-00001"]


def test_small_collections_still_spread_over_the_workers():
    widths = {f"m{i}": 10 for i in range(8)}
    assert len(plan_shards(widths, 4, 1 << 30, parallelism=4)) >= 4


def test_a_module_over_budget_gets_a_shard_of_its_own():
    shards = plan_shards({"big": 10**6, "small": 10}, 100, task_memory=1000, parallelism=1)
    assert [s.modules for s in shards] == [("big",), ("small",)]


@pytest.mark.parametrize(
    "key, parsed",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "A")),
        (
            "base_model.model.encoder.layer.1.attention.self.value.lora_B.default.weight",
            ("encoder.layer.1.attention.self.value", "B"),
        ),
        ("model.layers.0.q_proj.lora_B.weight", ("model.layers.0.q_proj", "B")),
        ("base_model.model.classifier.weight", None),
        ("base_model.model.x.lora_A.bias", None),
    ],
)
def test_lora_keys_parse_as_peft_and_vlora_name_them(key, parsed):
    assert peft_format.parse_key(key) == parsed


def test_rank_pattern_follows_peft_matching():
    config = {"r": 8, "rank_pattern": {"q_proj": 4, "layers.1.v_proj": 2}}
    assert peft_format.module_rank(config, "model.layers.0.q_proj") == 4
    assert peft_format.module_rank(config, "model.layers.0.v_proj") == 8
    assert peft_format.module_rank(config, "model.layers.1.v_proj") == 2
    assert peft_format.module_rank(config, "model.layers.11.v_proj") == 8


def test_sizes_parse_in_binary_units():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2G") == 2 * 2**30
    assert parse_size("1000") == 1000


def test_progress_without_a_terminal_logs_a_few_plain_lines(caplog):
    from pipeline.progress import Progress

    caplog.set_level("INFO", logger="pipeline.progress")
    progress = Progress("compute", 8, "shards")
    for _ in range(8):
        progress.advance()
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "compute: 1/8 shards" and lines[-1] == "compute: 8/8 shards" and len(lines) <= 5


def test_json_log_lines_are_objects_without_secrets(capsys):
    import json
    import logging

    from pipeline.cli import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler()]
    try:
        configure_logging(False, "json")
        logging.getLogger("pipeline.test").warning("reading s3://key:secret@bucket/x?X-Amz-Signature=abc")
    finally:
        root.handlers = saved
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["level"] == "WARNING" and entry["logger"] == "pipeline.test" and entry["time"]
    assert entry["message"] == "reading s3://bucket/x"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("GET s3://key:secret@bucket/x?X-Amz-Signature=abc failed: why?", "GET s3://bucket/x failed: why?"),
        ("'https://h/p?token=1' and http://q/r?a=b\nthen s3://b/k", "'https://h/p' and http://q/r\nthen s3://b/k"),
        (
            "short read of /a/b (changed or truncated?) after 3 tries",
            "short read of /a/b (changed or truncated?) after 3 tries",
        ),
        (
            "Custom endpoint `http://h:9/?q=secret` was not a valid URI",
            "Custom endpoint `http://h:9/` was not a valid URI",
        ),
    ],
)
def test_redaction_strips_credentials_and_query_strings_of_uris_only(text, shown):
    assert redact(text) == shown


@pytest.mark.parametrize("basis", [["a"], {"b": 1}, None, 3])
def test_a_module_whose_basis_is_not_a_path_is_a_problem_not_a_crash(basis):
    path = "versions/v000001/bases/shard-000.safetensors"
    manifest = {
        "format_version": 1,
        "version": "v000001",
        "parent": None,
        "files": {path: {"bytes": 1, "sha256": "0" * 64}},
        "modules": {"m": {"basis": basis}},
    }
    problems = manifest_problems(manifest, "v000001")
    assert f"module 'm': basis {basis!r} is not one of the files" in problems


@pytest.mark.parametrize("method", ["bogus", None, 3, ["flat"]])
def test_a_manifest_whose_method_is_not_one_of_the_methods_is_refused(tmp_path, method):
    """parameters.method is checked when a manifest is read, like its other fields: one line
    naming the object and the value; a manifest without it (early stores) reads as flat."""
    import json

    from pipeline.errors import IntegrityError
    from pipeline.io.location import Location
    from pipeline.io.store import Store

    manifest = {
        "format_version": 1,
        "version": "v000001",
        "parent": None,
        "created": "2026-01-01T00:00:00+00:00",
        "original_bytes": 1,
        "adapters": {"ok": 1, "quarantined": 0},
        "parameters": {"method": method},
        "files": {},
        "modules": {},
    }
    assert manifest_problems(manifest, "v000001") == [
        f"parameters.method {method!r} is not one of auto, flat, aligned, joint"
    ]
    for sound in ({}, {"method": "joint"}):
        assert manifest_problems({**manifest, "parameters": sound}, "v000001") == []
    (tmp_path / "versions/v000001").mkdir(parents=True)
    (tmp_path / "versions/v000001/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError) as refused:
        Store(Location(str(tmp_path))).manifest("v000001")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "versions/v000001/manifest.json is not a valid manifest" in message
    assert f"parameters.method {method!r}" in message
