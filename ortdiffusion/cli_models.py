"""The command line's model commands: `export` (a bundle, or Optimum's layout; an ONNX export in
Optimum's layout is imported instead) and `cache list|prune` (what ortdiffusion built once)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Say = Callable[[str], None]


def cmd_export(args: argparse.Namespace, say: Say) -> int:
    from .models import _local, is_optimum_export

    source = _local(str(args.checkpoint), download=True)
    if is_optimum_export(Path(source)):  # an ONNX export already: imported, without torch
        return _import(Path(source), args, say)
    from .models import require_extra

    require_extra("export", "export")
    from .cli_output import parity_table
    from .export.bundle import ExportOptions, export_checkpoint
    from .export.onnx_export import Exporter
    from .export.optimize import Target
    from .models import resolve_checkpoint
    from .export.lora_fuse import FusedLora
    from .runtime.manifest import Precision

    options = ExportOptions(
        opset=args.opset, precision=Precision(args.precision), exporter=Exporter(args.exporter), overwrite=args.overwrite,
        default_steps=args.default_steps, default_guidance=args.default_guidance, target=Target(args.target),
        tiny_decoder=args.tiny_decoder, loras=tuple(FusedLora.parse(t) for t in args.lora or ()),
        lora_inputs=args.lora_inputs,
        controlnets=tuple(getattr(args, "controlnet", None) or ()),
    )
    checkpoint = resolve_checkpoint(source, config=args.config, progress=say)
    start = time.perf_counter()
    if args.layout == "optimum":
        from .export.optimum_layout import write_optimum_layout

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{args.out.name}.bundle-", dir=args.out.parent) as tmp:
            manifest = export_checkpoint(checkpoint, Path(tmp) / "bundle", options, progress=say)
            write_optimum_layout(Path(tmp) / "bundle", args.out, checkpoint, overwrite=args.overwrite, progress=say)
    else:
        manifest = export_checkpoint(checkpoint, args.out, options, progress=say)
    print(f"exported {args.checkpoint} → {args.out} ({args.layout} layout) in {time.perf_counter() - start:.1f} s\n")
    print(parity_table(manifest))
    return 0


def _import(source: Path, args: argparse.Namespace, say: Say) -> int:
    from .runtime.errors import InvalidRequestError

    if args.layout != "bundle":
        raise InvalidRequestError("layout", f"{source} is already in Optimum's layout; export imports it into a bundle")
    from .export.optimum_layout import import_optimum

    start = time.perf_counter()
    manifest = import_optimum(source, args.out, progress=say, overwrite=args.overwrite)
    print(f"imported {source} → {args.out} in {time.perf_counter() - start:.1f} s: "
          f"{', '.join(manifest.components)}; tasks {', '.join(t.value for t in manifest.tasks())}")
    print("no torch model was at hand to check parity against; `ortdiffusion compare CHECKPOINT "
          f"{args.out}` checks it against the checkpoint it was made from")
    return 0


# -- cache ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # bundle, checkpoint, other, partial
    size: int
    used: float  # the last time it was resolved (its mtime)
    source: str  # what it was made from ("" where unknown)
    orphan: bool  # its source is gone from this machine


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def cache_entries(root: Path) -> list[Entry]:
    from .runtime.manifest import MANIFEST_NAME, load_manifest

    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for path in sorted(folder.iterdir()):
            partial = path.name.startswith(".") and (".partial-" in path.name or ".old-" in path.name)
            kind, source = ("partial" if partial else {"bundles": "bundle", "checkpoints": "checkpoint"}.get(folder.name, folder.name)), ""
            if kind == "bundle" and (path / MANIFEST_NAME).is_file():
                try:
                    source = load_manifest(path).source.checkpoint
                except Exception:  # a broken manifest is listed, not fatal
                    source = "?"
            orphan = bool(source) and source != "?" and not Path(source).exists()
            entries.append(Entry(path, kind, _size(path), path.stat().st_mtime, source, orphan))
    return entries


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def cmd_cache(args: argparse.Namespace, say: Say) -> int:
    from .runtime.cache import cache_dir

    root = cache_dir()
    entries = cache_entries(root)
    if args.cache_command == "list":
        print(f"{root} ({_mb(sum(e.size for e in entries))} in {len(entries)} entries)")
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
            note = f"  from {e.source}" + (" (gone)" if e.orphan else "") if e.source else ""
            print(f"{_mb(e.size):>12}  {used}  {e.kind:<10}  {e.path.relative_to(root)}{note}")
        return 0
    now = time.time()
    doomed = [e for e in entries if args.all or e.kind == "partial" or e.orphan
              or (args.older_than is not None and now - e.used > args.older_than * 86400)]
    for e in doomed:
        print(f"{'would remove' if args.dry_run else 'removed'} {e.path.relative_to(root)} ({_mb(e.size)})")
        if not args.dry_run:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
    freed = sum(e.size for e in doomed)
    print(f"{'would free' if args.dry_run else 'freed'} {_mb(freed)}; "
          f"{_mb(sum(e.size for e in entries) - freed)} kept in {root}")
    return 0


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="what ortdiffusion built once (exported bundles, presets, imports): list, prune")
    commands = p.add_subparsers(dest="cache_command", required=True)
    commands.add_parser("list", help="each entry with its size, when it was last used and what it was made from")
    prune = commands.add_parser("prune", help="remove unfinished leftovers and bundles whose source is gone "
                                "(and, with the options, more)")
    prune.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="also what was not used for DAYS")
    prune.add_argument("--all", action="store_true", help="everything")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")

    def run(args: argparse.Namespace) -> int:
        from .cli import _err

        return cmd_cache(args, _err)

    p.set_defaults(func=run)
