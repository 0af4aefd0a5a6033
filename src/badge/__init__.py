"""BADGE: early-exit BERT-family encoders with block-wise bypasses and divergence-based early exiting."""

from badge.config import MultiExitConfig
from badge.engine import EarlyExitEngine, EngineOutput
from badge.modeling import MultiExitModel
from badge.rules import ExitPolicy

__all__ = ["EarlyExitEngine", "EngineOutput", "ExitPolicy", "MultiExitConfig", "MultiExitModel"]
__version__ = "0.1.0"
