"""BADGE: early-exit BERT-family encoders with block-wise bypasses and divergence-based early exiting.

Importing it registers the saved models with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForSequenceClassification`) and the `early-exit-classification` pipeline task.
"""

from badge.config import MultiExitConfig
from badge.engine import EarlyExitEngine, EngineOutput
from badge.modeling import MultiExitModel
from badge.pipeline import EarlyExitClassificationPipeline
from badge.rules import ExitPolicy

__all__ = [
    "EarlyExitClassificationPipeline",
    "EarlyExitEngine",
    "EngineOutput",
    "ExitPolicy",
    "MultiExitConfig",
    "MultiExitModel",
]
__version__ = "0.1.0"
