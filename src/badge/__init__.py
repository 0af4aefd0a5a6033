"""BADGE: early-exit BERT-family encoders with block-wise bypasses and divergence-based early exiting."""

from badge.config import MultiExitConfig
from badge.modeling import MultiExitModel

__all__ = ["MultiExitConfig", "MultiExitModel"]
__version__ = "0.1.0"
