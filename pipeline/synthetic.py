"""Seeded synthetic PEFT collections, for the demo, the tests and benchmarks.

Structure `shared`: every module side is mean + (coefficients @ a low-dimensional shared basis)
+ noise, as adapters fine-tuned on related tasks look.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors

from pipeline import peft_format
from pipeline.io.location import Location


@dataclass(frozen=True)
class Preset:
    layers: int
    modules: dict[str, tuple[int, int]]  # name -> (d_in, d_out)
    rank: int
    alpha: int


PRESETS = {
    "micro": Preset(1, {"q_proj": (64, 64), "v_proj": (64, 64)}, 4, 8),
    "tiny": Preset(4, {"q_proj": (256, 256), "v_proj": (256, 256)}, 8, 16),
    "qwen0.5b": Preset(24, {"q_proj": (896, 896), "v_proj": (896, 128)}, 16, 32),
    "mistral7b-qkv": Preset(32, {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024)}, 16, 32),
}


def generate(
    out: Location, n: int, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
    shared_dim: int = 6, noise: float = 0.05, prefix: str = "adapter",
) -> list[str]:
    """Write n adapter folders `<prefix>-NNNNN` under out; returns their task ids."""
    spec = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    structure = {}
    for layer in range(spec.layers):
        for name, (d_in, d_out) in spec.modules.items():
            module = f"model.layers.{layer}.self_attn.{name}"
            for side, shape in (("A", (spec.rank, d_in)), ("B", (d_out, spec.rank))):
                width = shape[0] * shape[1]
                structure[module, side] = (
                    shape,
                    torch.randn(width, generator=gen) * 0.02,
                    torch.randn(shared_dim, width, generator=gen) * 0.02,
                )
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.modules),
        "base_model_name_or_path": f"synthetic/{preset}", "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
        "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
    }
    ids = []
    for index in range(n):
        task_id = f"{prefix}-{index:05d}"
        weights = {}
        for (module, side), (shape, mean, basis) in structure.items():
            coefficients = torch.randn(basis.shape[0], generator=gen)
            values = mean + coefficients @ basis + noise * 0.02 * torch.randn(mean.shape[0], generator=gen)
            weights[peft_format.weight_key(module, side)] = values.reshape(shape).to(dtype)
        folder = out.child(task_id)
        folder.write_bytes(save_safetensors(weights), peft_format.WEIGHTS_FILE)
        folder.write_bytes(json.dumps(config, indent=2).encode(), peft_format.CONFIG_FILE)
        ids.append(task_id)
    return ids
