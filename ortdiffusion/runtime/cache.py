"""Where ortdiffusion keeps what it builds once: exported bundles, preset checkpoints, TensorRT engines."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`ORTDIFFUSION_CACHE`, else `$XDG_CACHE_HOME/ortdiffusion` (default ~/.cache/ortdiffusion)."""
    root = os.environ.get("ORTDIFFUSION_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ortdiffusion"
    return Path(root)
