"""Optional parts of BADGE and the extra that installs each: a command that needs a missing one names it."""

from __future__ import annotations

from importlib.util import find_spec

EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "plots": ("matplotlib",),
    "datasets": ("datasets",),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [module for module in EXTRAS[extra] if find_spec(module) is None]


def require(extra: str, purpose: str) -> None:
    """Raise `MissingExtra` naming `pip install 'badge[extra]'` unless every module of `extra` is installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{purpose} needs {', '.join(absent)}: pip install 'badge[{extra}]'")
