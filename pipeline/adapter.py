"""One LoRA adapter in memory, as the in-process API takes and returns it.

Field names follow vlora's LoRAWeights (`lora_a`, `lora_b`, `layer_names`, `rank`), so either
library's adapters can be handed to the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline import peft_format
from pipeline.errors import AdapterError
from pipeline.io.adapters import AdapterRef
from pipeline.io.location import Location
from pipeline.io.safetensors_ranges import DTYPE_NAMES


@dataclass
class Adapter:
    """Per module: lora_a (r, d_in) and lora_b (d_out, r). `config` is its adapter_config.json
    (None: written as a minimal one on export); `uri` where it was read from, if anywhere."""

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict | None = None
    uri: str = ""
    config_text: str = ""  # the config file as read, written back unchanged
    weights_bytes: int = 0  # the weights file's size; 0: measured when first needed
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.lora_a) != set(self.lora_b):
            missing = sorted(set(self.lora_a) ^ set(self.lora_b))
            raise AdapterError(f"module {missing[0]!r} has only one of lora_A and lora_B")
        if not self.lora_a:
            raise AdapterError("no LoRA factors")
        for module in self.lora_a:
            a, b = self.lora_a[module], self.lora_b[module]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or 0 in (*a.shape, *b.shape):
                raise AdapterError(
                    f"module {module!r}: shapes lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                    "do not form a LoRA pair"
                )
        if not self.config_text and self.config is not None:
            self.config_text = json.dumps(self.config, indent=2)

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.lora_a)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a in self.lora_a.values())

    @property
    def dtype(self) -> str:
        """The safetensors name of the factors' dtype (F32, BF16, ...)."""
        return DTYPE_NAMES[next(iter(self.lora_a.values())).dtype]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors under the keys peft writes and loads."""
        weights = {}
        for module in self.layer_names:
            weights[peft_format.weight_key(module, "A")] = self.lora_a[module].contiguous()
            weights[peft_format.weight_key(module, "B")] = self.lora_b[module].contiguous()
        return weights

    def size_bytes(self) -> int:
        """Bytes of the adapter as files: its weights file (as read, else as peft would write it)
        and its config."""
        if not self.weights_bytes:
            self.weights_bytes = len(save_safetensors(self.state_dict(), metadata={"format": "pt"}))
        return self.weights_bytes + len(self.config_text.encode())

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: dict | None = None) -> Adapter:
        factors: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
        for key, tensor in state_dict.items():
            parsed = peft_format.parse_key(key)
            if parsed is None:
                raise AdapterError(f"{key!r} is not a LoRA factor; it would be lost by compression")
            module, side = parsed
            if module in factors[side]:
                raise AdapterError(
                    f"module {module!r} has two lora_{side} tensors (several adapter names in one state dict?)"
                )
            factors[side][module] = tensor
        return cls(factors["A"], factors["B"], config)

    @classmethod
    def load(cls, uri: str, endpoint_url: str | None = None) -> Adapter:
        """A PEFT adapter folder (path, file:// or s3://), checked as compress checks it."""
        from pipeline.flow.scan import scan_adapter

        location = Location(uri, endpoint_url)
        scanned = scan_adapter(AdapterRef(location.root.rsplit("/", 1)[-1], location))
        if not scanned.ok:
            raise AdapterError(f"{location}: {scanned.reason}")
        adapter = cls.from_state_dict(load_safetensors(location.read_bytes(peft_format.WEIGHTS_FILE)), scanned.config)
        adapter.uri, adapter.config_text, adapter.weights_bytes = (
            str(location),
            scanned.config_text,
            scanned.weights_bytes,
        )
        return adapter

    def save(self, uri: str, endpoint_url: str | None = None) -> None:
        """Write as a PEFT folder (weights, then config) that peft, vLLM, LoRAX and TGI load."""
        from pipeline.operations.export import write_peft_folder

        config = self.config_text or json.dumps(
            peft_format.minimal_config({m: a.shape[0] for m, a in self.lora_a.items()}, None), indent=2
        )
        write_peft_folder(Location(uri, endpoint_url), self.state_dict(), config)


def as_adapter(value) -> Adapter:
    """An Adapter from what users hold: an Adapter, vlora's LoRAWeights (or anything with
    lora_a / lora_b dicts), a PEFT state dict, or a folder path or URI."""
    if isinstance(value, Adapter):
        return value
    if hasattr(value, "lora_a") and hasattr(value, "lora_b"):
        metadata = dict(getattr(value, "metadata", None) or {})  # vlora keeps the adapter's config here
        return Adapter(dict(value.lora_a), dict(value.lora_b), metadata if "r" in metadata else None, metadata=metadata)
    if isinstance(value, Mapping):
        return Adapter.from_state_dict(value)
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return Adapter.load(str(value))
    raise TypeError(f"cannot read an adapter from {type(value).__name__}")
