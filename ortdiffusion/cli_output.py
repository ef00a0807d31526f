"""What the command line shows and writes: the parity table of an export, `info`'s summary of a
bundle, where `generate` writes its images (checked before any compute) and its progress bar."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .runtime.errors import InvalidRequestError


def parity_table(manifest) -> str:
    rows = ["| component | output | shape | max abs error | relative L2 | cosine |", "|---|---|---|---|---|---|"]
    for comp in manifest.components.values():
        for r in comp.parity:
            shape = " ".join(f"{k}={v}" for k, v in r.shape.items())
            rows.append(
                f"| {comp.name} | {r.output} | {shape} | {r.max_abs_error:.2e} | {r.rel_l2_error:.2e} | {r.cosine_similarity:.8f} |"
            )
    return "\n".join(rows)


def info_text(bundle: Path, manifest) -> str:
    """`ortdiffusion info`'s summary of a bundle, and this machine's providers."""
    from .runtime.providers import available_providers

    p = manifest.pipeline
    lines = [
        f"bundle        {bundle} (format {manifest.format_version}, hash {manifest.bundle_sha256[:16]})",
        f"source        {manifest.source.checkpoint} (weights {manifest.source.weights_sha256[:16]})",
        "made by       " + ", ".join(f"{k} {v}" for k, v in manifest.created_by.items()),
        f"pipeline      {p.family}, {p.prediction_type} prediction, {p.latent_channels} latent channels, "
        f"VAE ×{p.vae_scale_factor} (scaling {p.vae_scaling_factor:g}), {p.tokenizer_max_length} tokens",
        f"default       {p.default_width}x{p.default_height}, scheduler {p.default_scheduler} "
        f"(checkpoint's {p.scheduler_class}), {p.default_steps} steps, guidance {p.default_guidance:g}",
        "tasks         " + ", ".join(t.value for t in manifest.tasks()),
        "decoders      " + ", ".join(manifest.decoders())
        + ("; guidance embedded in the UNet (no negative prompt)" if manifest.embedded_guidance else ""),
    ]
    for c in manifest.components.values():
        size = sum(f.size for f in c.files) / 1e6
        worst = max((r.rel_l2_error for r in c.parity), default=float("nan"))
        ins = ", ".join(f"{i.name}{list(i.shape)}" for i in c.inputs)
        lines.append(
            f"{c.name:<13} {c.precision.value}, opset {c.opset}, {size:.1f} MB, for {'/'.join(c.providers)}, "
            f"parity rel L2 ≤ {worst:.1e}; inputs {ins}"
        )
    lines.append("this machine  onnxruntime providers: " + ", ".join(k.value for k in available_providers()))
    return "\n".join(lines)


def output_paths(path: Path, count: int) -> list[Path]:
    """Where `count` images go: `path` itself for one, `-0`, `-1`, … before the suffix for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def check_output(path: Path, count: int):
    """The format `-o`'s suffix names, once it is known the files can be written: refused before any
    compute (a missing directory, a directory given as the file, a read-only file system)."""
    import tempfile

    from .runtime.png import ImageFormat

    fmt = ImageFormat.from_suffix(path, field="output")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InvalidRequestError("output", f"{str(path)!r}: the directory {str(parent)!r} {what} (make it first: "
                                  f"mkdir -p {parent})")
    for p in output_paths(path, count):
        if p.is_dir():
            raise InvalidRequestError("output", f"{str(p)!r} is a directory; give a file name, such as {p / 'out.png'}")
    try:  # the only sure test of "can write here": a read-only mount, permissions, quotas, ACLs
        fd, probe = tempfile.mkstemp(prefix=".ortdiffusion-write-check-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InvalidRequestError("output", f"{str(path)!r}: cannot write in {str(parent)!r} "
                                  f"({e.strerror or e})") from None
    return fmt


class ProgressBar:
    """A one-line progress bar on stderr (no dependency: the runtime install has no tqdm)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.start = label, enabled, time.perf_counter()

    def __call__(self, step: int, total: int, latents: object = None) -> None:
        if not self.enabled:
            return
        done = step + 1
        filled = int(30 * done / total)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {rate:.1f} it/s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
