"""lora-subspace: compress collections of LoRA adapters into shared low-rank subspaces."""

__version__ = "0.1.0"
