"""nsa_compile: rewrite dense causal attention into Native Sparse Attention (and add Engram)."""
from .config import EngramConfig, NSAConfig
from . import ops
from .modules.engram import Engram
from .optim import param_groups
from .passes.api import inspect, sparsify

__all__ = ["sparsify", "inspect", "NSAConfig", "EngramConfig", "ops", "Engram", "param_groups"]
