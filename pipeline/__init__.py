"""lora-subspace: compress collections of LoRA adapters into shared low-rank subspaces.

The in-process API: `from pipeline import Subspace, Adapter` (docs/api.md). Packages, lowest
layer first (README "Layout"): linalg, io, flow, operations; the CLI, jobspec and the API on top.
"""

__version__ = "0.1.0"
__all__ = ["Adapter", "Subspace", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so the CLI and Ray workers do not pay for what they do not use.
    if name == "Subspace":
        from pipeline.subspace import Subspace

        return Subspace
    if name == "Adapter":
        from pipeline.adapter import Adapter

        return Adapter
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
