"""Where a model runs and in which precision: `--device cpu|cuda|auto` and `--dtype float32|float16|bfloat16`."""

from __future__ import annotations

import torch
from torch import nn

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`cpu`, `cuda` (or `cuda:N`), or `auto`/None (CUDA where available, else the CPU) as a `torch.device`."""
    if isinstance(device, torch.device):
        name = device.type
    else:
        name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ValueError(f"device {name!r}: CUDA is not available here ({build}); use cpu or auto")
        return torch.device(device if isinstance(device, torch.device) else name)
    raise ValueError(f"device {name!r} is not one of {list(DEVICES)} (or cuda:N)")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`float32`, `float16` or `bfloat16` (names or torch dtypes) as a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")


def place(model: nn.Module, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Move `model` to `device` and cast its floating-point weights to `dtype` (None: leave as is); returns it."""
    target_dtype = resolve_dtype(dtype)
    if device is not None:
        model = model.to(resolve_device(device))
    if target_dtype is not None:
        model = model.to(target_dtype)
    return model


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings must include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
