"""PEFT LoRA file names, key names and config fields: the one place that knows them."""

from __future__ import annotations

import functools
import re

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLED_WEIGHTS_FILE)

SIDES = ("A", "B")

# What one adapter's config may make a run hold (its text is kept in the catalog): larger or
# deeper configs are quarantined.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 16  # nesting of objects and arrays
MAX_PATTERNS = 1024  # entries of rank_pattern and alpha_pattern (each matched against every module)
MAX_TARGET_MODULES = 4096
MAX_RANK = 65536  # r and rank_pattern values
MAX_ALPHA = 1e6  # magnitude of lora_alpha and alpha_pattern values

# base_model.model.<module>.lora_A[.<adapter_name>].weight, as vlora and peft name them.
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def parse_key(key: str) -> tuple[str, str] | None:
    """(module, side) of a LoRA weight key, or None for keys that are not LoRA factors."""
    match = _KEY_RE.match(key)
    return (match["module"], match["side"]) if match else None


def weight_key(module: str, side: str) -> str:
    """The key `peft` writes and loads for one factor."""
    return f"base_model.model.{module}.lora_{side}.weight"


def pattern_value(patterns: dict, module: str, default):
    """Value of peft's `rank_pattern` / `alpha_pattern` for a module (peft's own matching rule)."""
    for pattern, value in patterns.items():
        if pattern_regex(pattern).match(module):
            return value
    return default


@functools.lru_cache(maxsize=4 * MAX_PATTERNS)
def pattern_regex(pattern: str) -> re.Pattern:
    """A pattern key compiled once (re's own cache holds 512); re.error for an invalid one."""
    return re.compile(rf"(.*\.)?({pattern})$")


def module_rank(config: dict, module: str) -> int:
    return int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))


def minimal_config(ranks: dict[str, int], base_model: str | None) -> dict:
    """A config for an adapter that came without one: scale 1, the ranks its shapes show."""
    rank = max(ranks.values())
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": None,
    }
