"""Shared fixtures: one local Ray for the session, a moto S3 server on loopback, synthetic collections."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
from pathlib import Path

import pytest

# Dummy credentials before Ray starts, so its workers inherit them; nothing here reaches AWS.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
os.environ.pop("AWS_PROFILE", None)
# A short read timeout, so the fault-injection tests see a slow response time out and be retried.
os.environ["LORA_SUBSPACE_S3_READ_TIMEOUT"] = "2"

DATA = Path(__file__).parent / "data"
MINILM = DATA / "minilm-lora"


@pytest.fixture(scope="session")
def runner():
    import ray

    from pipeline.runners.ray_runner import RayRunner

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield RayRunner()
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket per test: no test sees another's objects or cached listings."""
    import boto3

    name = f"test-bucket-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def minilm_copy(tmp_path) -> Path:
    """The four real peft-trained adapters, copied so a test may damage them."""
    target = tmp_path / "minilm"
    shutil.copytree(MINILM, target, ignore=shutil.ignore_patterns("README.md"))
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


PEFT_ADAPTERS = 5


def peft_base_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def peft_collection(tmp_path_factory):
    """PEFT_ADAPTERS adapters written by peft itself (r=4, alpha=8) on a tiny random Llama."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    for index in range(PEFT_ADAPTERS):
        torch.manual_seed(100 + index)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(peft_base_model(), config).save_pretrained(root / f"task-{index}")
    return root


def assert_same_outputs(originals: Path, exported: Path) -> None:
    """Every adapter under `exported` loads in peft next to its original and gives its outputs."""
    import torch
    from peft import PeftModel

    inputs = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for index in range(PEFT_ADAPTERS):
        name = f"task-{index}"
        model = PeftModel.from_pretrained(peft_base_model(), originals / name, adapter_name="original")
        result = model.load_adapter(exported / name, adapter_name="exported")
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k and ".exported." in k]
        with torch.no_grad():
            model.set_adapter("original")
            expected = model(inputs).logits
            model.set_adapter("exported")
            actual = model(inputs).logits
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        assert model.peft_config["exported"].r == 4 and model.peft_config["exported"].lora_alpha == 8


def make_collection(path: Path, n: int, **kwargs) -> list[str]:
    """n synthetic float32 adapters (tiny preset) under path."""
    from pipeline.io.location import Location
    from pipeline.synthetic import generate

    return generate(Location(str(path)), n, **kwargs)


LOW_RANK = 4  # mixed_ranks: the rank of every third adapter (the others keep the collection's)


def mixed_ranks(src: Path, ids: list[str], dtype) -> None:
    """Cut every third adapter of `src` to rank LOW_RANK and store every adapter's factors in `dtype`."""
    import json

    from safetensors.torch import load_file, save_file

    from pipeline import peft_format

    for index, task_id in enumerate(ids):
        folder = src / task_id
        tensors = load_file(str(folder / peft_format.WEIGHTS_FILE))
        if index % 3 == 0:
            tensors = {k: (v[:LOW_RANK] if ".lora_A." in k else v[:, :LOW_RANK]) for k, v in tensors.items()}
            config = json.loads((folder / peft_format.CONFIG_FILE).read_text())
            (folder / peft_format.CONFIG_FILE).write_text(json.dumps({**config, "r": LOW_RANK}))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / peft_format.WEIGHTS_FILE))


def run_cli(*args: str) -> int:
    from pipeline.cli import main

    return main([str(a) for a in args])


def rebase_twice_at_once(source, store, runner) -> tuple[list[str], list[str]]:
    """Two `rebase` runs started together from two threads: (versions published, refusals)."""
    import threading

    from pipeline.config import Options
    from pipeline.errors import PipelineError
    from pipeline.io.store import Store
    from pipeline.operations.grow import grow

    outcomes, start = [], threading.Barrier(2)

    def rebase():
        start.wait()
        try:
            result = grow(source, Store(store), runner, "rebase", Options())
            outcomes.append(result["versions"][0]["version"] if result["versions"] else "is up to date")
        except PipelineError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=rebase) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o.startswith("v0")], [o for o in outcomes if not o.startswith("v0")]


def kill_session(leader: int, timeout: float = 60.0) -> None:
    """SIGKILL every process of the session `leader` started (start_new_session=True), until none
    is left. A killed driver's embedded Ray starts each worker in a process group of its own, so
    killing the driver's group leaves workers that finish their task and write after the driver
    died; a test that goes on before they are gone races them."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == leader:
                        os.kill(int(entry), signal.SIGKILL)
                        left.append(entry)
                except (ProcessLookupError, PermissionError):
                    continue
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of session {leader} outlived SIGKILL: {left}")
        time.sleep(0.1)
