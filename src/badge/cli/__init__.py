"""The `badge` command: a thin layer over the Python API (`badge.workflows`, `badge.calibration`, ...).

badge quickstart                 train the embedded default (MiniLM-L6 on rotten-tomatoes)
badge train --encoder DIR ...    train a multi-exit model on your data
badge evaluate MODEL_DIR ...     per-exit metrics, or a sweep of every exit rule

Each module registers its commands on `app`: `train`, `evaluate` (evaluate, export, prune, calibrate),
`deploy` (predict, serve), `quickstart`.
"""

from transformers.utils import logging as hf_logging

from badge.cli.common import app

# Each module registers its commands on `app` as it loads; this order is the order of `badge --help`.
# isort: off
from badge.cli import train  # noqa: E402, F401
from badge.cli import evaluate  # noqa: E402, F401
from badge.cli import deploy  # noqa: E402, F401
from badge.cli import quickstart  # noqa: E402, F401

# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """The `badge` console script."""
    hf_logging.disable_progress_bar()
    app()
