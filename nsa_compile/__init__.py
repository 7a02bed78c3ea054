"""nsa_compile: rewrite dense causal attention into Native Sparse Attention (and add Engram)."""
from .config import EngramConfig, NSAConfig
from . import ops

__all__ = ["NSAConfig", "EngramConfig", "ops"]
