"""Storing fp32 weights in half the bytes when that loses nothing.

A checkpoint saved in fp16 (like the built-in model's) is exported from fp32 modules whose weights
are all exactly representable in fp16. Such initializers are stored as fp16 with a Cast back to
fp32 in front of their users; ONNX Runtime folds the Cast when it loads the graph, so the graph
computes in fp32 exactly as before (parity is measured after this step) at half the file size.
Weights that fp16 cannot hold exactly stay fp32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 64  # a Cast node per tiny tensor costs more than it saves


def store_exact_fp32_weights_as_fp16(path: Path) -> int:
    """Rewrite `path` in place; return the number of initializers converted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size < MIN_ELEMENTS or not np.array_equal(half.astype(np.float32), values):
            kept.append(init)
            continue
        stored = numpy_helper.from_array(half, f"{init.name}__fp16")
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__to_fp32"))
        converted += 1
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(casts + nodes)  # Casts first keeps the graph topologically sorted
        onnx.save(model, str(path))
    logger.info("%s: %d initializers stored as fp16 (exactly representable)", path.name, converted)
    return converted


def save_with_external_data(model, path: Path) -> Path:
    """Write `model` as `path` with its weights (every tensor past 1 KiB) in one `<path>.data`
    beside it; return that file. A data file already there is replaced, not appended to (onnx
    appends to an existing one, leaving the old bytes behind), and it gets the graph's permissions
    (onnx creates it owner-only; a bundle is read by services running as other users)."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # `model` holds its weights in memory: they are rewritten below
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    _readable_like(path, data)
    return data


def _readable_like(graph: Path, data: Path) -> None:
    """Give `data` its graph's permissions: onnx (and ONNX Runtime's optimizer, which saves through
    it) creates external data owner-only, and a bundle is read by services running as other users."""
    data.chmod(graph.stat().st_mode & 0o777)


#: A graph whose weights pass this many bytes keeps them in an external data file beside it.
EXTERNAL_WEIGHTS_MIN_BYTES = 16 * 2**20


def store_weights_externally(files: list[Path], min_bytes: int = EXTERNAL_WEIGHTS_MIN_BYTES) -> list[Path]:
    """Move the weights of a one-file graph into `<graph>.data` beside it, when they pass
    `min_bytes`; return the files that now make up the graph.

    Why: ONNX Runtime memory-maps external data on the CPU and builds its tensors from the mapping,
    while weights inside the graph's protobuf are parsed into copies whose memory stays with the
    process. Measured on the SD-1.5-sized bundle (`benchmarks/results/cpu-speed-cpu2.md`): resident
    memory after loading the text encoder 654 → 336 MB, VAE decoder 389 → 317 MB, int8 UNet
    1490 → 885 MB (the fp32 UNet, past protobuf's 2 GB limit, was external already: 3330 MB for
    3279 MB of weights). Weights never read (a vocabulary's unused embedding rows) are never loaded.
    """
    import onnx

    path = files[0]
    if len(files) > 1:  # external already (past 2 GB), written by whichever step came last
        for data in files[1:]:
            _readable_like(path, data)
        return files
    model = onnx.load(str(path))
    if sum(t.ByteSize() for t in model.graph.initializer) <= min_bytes:
        return files
    data = save_with_external_data(model, path)
    logger.info("%s: weights moved to %s (%d MB)", path.name, data.name, data.stat().st_size // 2**20)
    return [path, data]


#: Offsets of weights in a gathered data file are multiples of this (a page): ONNX Runtime
#: memory-maps an external tensor only where its offset suits the mapping's granularity.
DATA_ALIGNMENT = 4096


def gather_external_data(model, source_dir: Path, path: Path, min_bytes: int = 1024,
                         transform: Callable[[object, bytes], bytes] | None = None) -> Path:
    """Write `model` as the graph `path` with its weights in one `<path>.data`; return that file.

    `model` may hold weights in memory (raw data) or refer to them in files under `source_dir`
    (loaded with `load_external_data=False`); the latter are copied over one tensor at a time, so
    the weights are never all in memory together. Why by hand: onnx's own save writes only weights
    held in memory, so saving a graph whose weights sit in other files meant loading all of them
    first — for the SD-1.5-sized UNet 3.4 GB in protobuf on top of the exporter's or optimizer's
    own (the export's memory peaks, `benchmarks/export_memory.py`). Written aside and renamed:
    `source_dir` may hold the data file being replaced. `transform(tensor, bytes)`: each weight's
    bytes as written (the streamed fp16 conversion converts the ones it marked there)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    data = path.with_name(path.name + ".data")
    partial = path.with_name(f".{data.name}.partial")
    graph = path.with_name(f".{path.name}.partial")
    sources: dict[str, object] = {}
    offset = 0
    try:
        with open(partial, "wb") as out:
            for tensor in _get_all_tensors(model):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= min_bytes:
                    blob = tensor.raw_data
                elif uses_external_data(tensor) and not tensor.HasField("raw_data"):
                    info = ExternalDataInfo(tensor)
                    if info.location not in sources:
                        sources[info.location] = open(source_dir / info.location, "rb")  # noqa: SIM115 - closed below
                    source = sources[info.location]
                    source.seek(int(info.offset or 0))
                    blob = source.read(int(info.length)) if info.length else source.read()
                else:
                    continue
                if transform is not None:
                    blob = transform(tensor, blob)
                padding = -offset % DATA_ALIGNMENT
                out.write(b"\0" * padding)
                offset += padding
                out.write(blob)
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                # (onnx's set_external_data wants the weight in memory, which is what this avoids)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(blob)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(blob)
                del blob
        onnx.save_model(model, str(graph))  # the graph alone: every weight past `min_bytes` is in `data` now
    except BaseException:
        # nothing half-written stays behind (an SDXL UNet's partial data file is gigabytes)
        partial.unlink(missing_ok=True)
        graph.unlink(missing_ok=True)
        raise
    finally:
        for source in sources.values():
            source.close()
    # both files complete: moved into place one right after the other
    partial.replace(data)
    graph.replace(path)
    _readable_like(path, data)
    return data


@contextmanager
def offloaded(module, directory: Path):
    """The torch module's weights on disk while steps that do not need them run (the optimizer, the
    fp16 range measurement and conversion): each of those holds the ONNX graph's weights, and the
    module's copy beside them took an SD-1.5 UNet's fp16 export past 8 GiB (9.2 GiB in range
    measurement) and would double an SDXL UNet's 10 GB. The parameters and buffers go to one file in
    `directory` and are replaced by meta tensors; on exit they come back memory-mapped from it
    (torch.load(mmap=True): pages read as parity touches them), the same values, so the parity check
    after compares against the same module. The file is unlinked on exit (the mapping keeps its pages until the module lets go);
    `directory` is the export's staging folder, so a crash leaves nothing outside it."""
    import gc

    import torch

    slots = []  # (submodule, dict holding the tensor, key, was a Parameter, requires_grad)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for holder in (sub._parameters, sub._buffers):
            for leaf, tensor in holder.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                slots.append((holder, leaf, name, isinstance(tensor, torch.nn.Parameter), tensor.requires_grad))
                tensors[name] = tensor.detach()
    tensor = None  # the last one would keep its storage alive (a memory-mapped checkpoint: the whole file's mapping)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".offloaded-{os.getpid()}-{id(module)}.pt"
    moved = False
    try:
        torch.save(tensors, path)  # keeps shared storages shared (tied weights stay one tensor)
        for holder, leaf, name, is_param, grad in slots:
            meta = tensors[name].to("meta")
            holder[leaf] = torch.nn.Parameter(meta, requires_grad=grad) if is_param else meta
        moved = True
        del tensors
        gc.collect()
        yield
    finally:
        if moved:  # else (the save failed: a full disk) the module still holds its own weights
            restored = torch.load(path, mmap=True, weights_only=True)
            for holder, leaf, name, is_param, grad in slots:
                holder[leaf] = torch.nn.Parameter(restored[name], requires_grad=grad) if is_param else restored[name]
            del restored
        path.unlink(missing_ok=True)  # a mapping keeps its pages readable until the module lets go
