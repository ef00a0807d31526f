"""Writing a bundle (or any model directory) so that a failure leaves nothing half-written:
everything goes into a temporary directory beside the output, renamed into place at the end.
The standard library only, so the torch-free import of ONNX exports uses it too."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(out_dir: Path):
    """A directory beside `out_dir` to write a bundle into; published over `out_dir` when the block
    ends, removed (nothing half-written stays) when it raises."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the published bundle's mode
    try:
        yield tmp
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place; an existing one is replaced only after that succeeds."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
