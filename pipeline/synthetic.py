"""Seeded synthetic PEFT collections, for the demo, the tests and benchmarks.

Structures, per module side:
- `shared`: mean + (coefficients @ a low-dimensional shared basis) + noise, as adapters
  fine-tuned on related tasks look;
- `same-init`: one common lora_A init (PEFT's Kaiming-uniform scale) plus a small drift, and
  lora_B grown from zero, as adapters trained from one seed look;
- `gauge`: the `shared` adapters with each module's factors re-parameterised A -> R A, B -> B R^T
  by a random orthogonal R: every delta W = B A is unchanged, but the factors no longer line up.

Adapter i depends only on (seed, structure, preset, i), so a collection can be generated in
chunks, or grown later with the same structure (`start`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors

from pipeline import peft_format
from pipeline.io.location import Location

STRUCTURES = ("shared", "same-init", "gauge")


@dataclass(frozen=True)
class Preset:
    layers: int
    modules: dict[str, tuple[int, int]]  # name -> (d_in, d_out)
    rank: int
    alpha: int

    def adapter_bytes(self, item_size: int) -> int:
        """Tensor bytes of one adapter."""
        return self.layers * sum(self.rank * (d_in + d_out) for d_in, d_out in self.modules.values()) * item_size


PRESETS = {
    "micro": Preset(1, {"q_proj": (64, 64), "v_proj": (64, 64)}, 4, 8),
    "tiny": Preset(4, {"q_proj": (256, 256), "v_proj": (256, 256)}, 8, 16),
    "qwen0.5b": Preset(24, {"q_proj": (896, 896), "v_proj": (896, 128)}, 16, 32),
    "mistral7b-qkv": Preset(32, {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024)}, 16, 32),
}


def generate(
    out: Location,
    n: int,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shared_dim: int = 6,
    noise: float = 0.05,
    prefix: str = "adapter",
    structure: str = "shared",
    start: int = 0,
) -> list[str]:
    """Write adapter folders `<prefix>-NNNNN` (start .. start + n - 1) under out; returns their task ids."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r} (expected one of {', '.join(STRUCTURES)})")
    spec = PRESETS[preset]
    sides = _collection_sides(spec, structure, torch.Generator().manual_seed(seed), shared_dim)
    config = json.dumps(_config(spec, preset), indent=2).encode()
    ids = []
    for index in range(start, start + n):
        # A gauge adapter is the shared one of the same index, re-parameterised: same delta W.
        family = "shared" if structure == "gauge" else structure
        digest = hashlib.sha256(f"{seed}/{family}/{preset}/{index}".encode()).digest()
        own = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        weights = _adapter_weights(sides, structure, noise, own)
        if structure == "gauge":
            _rotate(weights, sides, spec.rank, own)
        task_id = f"{prefix}-{index:05d}"
        folder = out.child(task_id)
        folder.write_bytes(
            save_safetensors({k: v.to(dtype).contiguous() for k, v in weights.items()}), peft_format.WEIGHTS_FILE
        )
        folder.write_bytes(config, peft_format.CONFIG_FILE)
        ids.append(task_id)
    return ids


def _collection_sides(spec: Preset, structure: str, gen: torch.Generator, shared_dim: int) -> dict:
    """(module, side) -> (shape, mean, shared basis of shape (shared_dim, width)): what every
    adapter of the collection shares, drawn from `gen` in module order."""
    sides = {}
    for layer in range(spec.layers):
        for name, (d_in, d_out) in spec.modules.items():
            module = f"model.layers.{layer}.self_attn.{name}"
            for side, shape in (("A", (spec.rank, d_in)), ("B", (d_out, spec.rank))):
                width = shape[0] * shape[1]
                if structure == "same-init":
                    # A: PEFT's init, U(-1/sqrt(d_in), 1/sqrt(d_in)); B: starts at zero.
                    bound = 1 / math.sqrt(d_in)
                    mean = (torch.rand(width, generator=gen) * 2 - 1) * bound if side == "A" else torch.zeros(width)
                    scale = 0.02 * bound if side == "A" else 0.02
                else:
                    mean, scale = torch.randn(width, generator=gen) * 0.02, 0.02
                sides[module, side] = (shape, mean, torch.randn(shared_dim, width, generator=gen) * scale)
    return sides


def _config(spec: Preset, preset: str) -> dict:
    """adapter_config.json of every adapter of a preset."""
    return {
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": sorted(spec.modules),
        "base_model_name_or_path": f"synthetic/{preset}",
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
    }


def _adapter_weights(sides: dict, structure: str, noise: float, own: torch.Generator) -> dict[str, torch.Tensor]:
    """One adapter's factors, keyed as peft writes them: mean + its coefficients @ the shared basis + noise."""
    weights = {}
    for (module, side), (shape, mean, basis) in sides.items():
        coefficients = torch.randn(basis.shape[0], generator=own)
        spread = basis.abs().mean() if structure == "same-init" else 0.02
        values = mean + coefficients @ basis + noise * spread * torch.randn(mean.shape[0], generator=own)
        weights[peft_format.weight_key(module, side)] = values.reshape(shape)
    return weights


def _rotate(weights: dict[str, torch.Tensor], sides: dict, rank: int, own: torch.Generator) -> None:
    """Each module's factors re-parameterised in place, A -> R A, B -> B R^T, by a random orthogonal R."""
    for module in dict.fromkeys(m for m, _ in sides):
        a_key, b_key = peft_format.weight_key(module, "A"), peft_format.weight_key(module, "B")
        rotation, _ = torch.linalg.qr(torch.randn(rank, rank, generator=own))
        weights[a_key], weights[b_key] = rotation @ weights[a_key], weights[b_key] @ rotation.T
