"""Model architectures, one file each, with a small dataclass config per model."""

from llmlab.models.mlp import MLP, HandMLP, MLPConfig, build_mlp

__all__ = ["MLP", "HandMLP", "MLPConfig", "build_mlp"]
