"""nn.Modules the rewrite inserts: NSA attention with its compressors and gates."""
from .compressor import Compressor
from .gate import BranchGate
from .nsa_attention import NSAAttention

__all__ = ["Compressor", "BranchGate", "NSAAttention"]
