"""ortdiffusion: text-to-image on ONNX Runtime.

`from ortdiffusion import Pipeline` gives the runtime pipeline (no torch needed); export lives in
`ortdiffusion.export` and needs the `export` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .runtime.pipeline import Pipeline, PipelineResult


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ortdiffusion` (e.g. for the CLI's --help) stays instant.
    if name in ("Pipeline", "PipelineResult"):
        from .runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ortdiffusion' has no attribute {name!r}")


__all__ = ["Pipeline", "PipelineResult", "__version__"]
