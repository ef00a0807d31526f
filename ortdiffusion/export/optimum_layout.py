"""ONNX exports in Hugging Face Optimum's layout: import one into a bundle, write a bundle as one.

Optimum's layout (what `optimum-cli export onnx`, the hub's ONNX branches and ONNX Runtime's own
published Stable Diffusion models hold):

    model_index.json
    text_encoder/model.onnx   unet/model.onnx (+ model.onnx_data)   vae_decoder/model.onnx
    vae_encoder/model.onnx    (each with its diffusers/transformers config.json)
    tokenizer/ (vocab.json, merges.txt, ...)   scheduler/scheduler_config.json

Import needs no torch: the graphs' interfaces are adapted to the bundle's (DESIGN.md, "The bundle")
with a few nodes at their edges — casts where Optimum's dtypes differ from ours (int32 token ids,
an int64 or scalar timestep, fp16 inputs and outputs), the VAE encoder's `latent_parameters` split
into the mean and standard deviation the runtime samples from — and the weights are hard-linked
(or copied) beside them untouched. The tokenizer becomes `tokenizer.json` with the `tokenizers`
library, the scheduler config is taken as it is. There is no torch model to measure parity
against, so the manifest records none; `ortdiffusion compare CHECKPOINT IMPORTED` checks it where
the source checkpoint is at hand.

`write_optimum_layout` goes the other way, so Optimum users can load what we optimized.

Finding a layout and its identity (`is_optimum_layout`, `layout_sha256`) needs only the standard
library; the rest needs `onnx` (imported inside the functions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import BundleError
from ..runtime.manifest import read_json_object

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
#: Bundle component → Optimum's folder; the VAE encoder is optional (text-to-image without it).
FOLDERS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder"}
REQUIRED = ("text_encoder", "unet", "vae_decoder")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "ORTStableDiffusionPipeline", "OnnxStableDiffusionPipeline")

Progress = Callable[[str], None]


# -- finding a layout (standard library only) ---------------------------------------------------


def is_optimum_layout(path: Path) -> bool:
    """A directory with a model_index.json and at least one `<component>/model.onnx`."""
    return (path / "model_index.json").is_file() and any((path / f / MODEL_FILE).is_file() for f in FOLDERS.values())


def layout_sha256(path: Path) -> str:
    """One hash over model_index.json and every file of the component, tokenizer and scheduler
    folders: the export's identity (the cache key of its imported bundle)."""
    h = hashlib.sha256()
    folders = [*FOLDERS.values(), "tokenizer", "scheduler"]
    files = [path / "model_index.json"] + sorted(f for d in folders if (path / d).is_dir()
                                                  for f in (path / d).rglob("*") if f.is_file())
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def check_layout(path: Path) -> dict[str, Any]:
    """model_index.json, the three required graphs, the tokenizer and the scheduler config are
    there, or a BundleError naming the first missing file and what it is for."""
    index_path = path / "model_index.json"
    index = _read_json(index_path)
    if index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise BundleError(str(index_path), f"_class_name {index.get('_class_name')!r} is not supported by the import; "
                          f"allowed: {', '.join(SUPPORTED_PIPELINES)} (Stable Diffusion 1/2)")
    for name in REQUIRED:
        graph = path / FOLDERS[name] / MODEL_FILE
        if not graph.is_file():
            raise BundleError(str(graph), f"missing: an ONNX export in Optimum's layout needs the {name} graph "
                              f"({', '.join(f'{FOLDERS[n]}/{MODEL_FILE}' for n in REQUIRED)})")
    for name in (*REQUIRED, "vae_encoder"):
        config = path / FOLDERS[name] / "config.json"
        if (path / FOLDERS[name] / MODEL_FILE).is_file() and not config.is_file():
            raise BundleError(str(config), f"missing: the {name} graph's config (its sizes and constants)")
    tokenizer = path / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (tokenizer / name).is_file():
                raise BundleError(str(tokenizer / name), "missing: the tokenizer needs tokenizer.json or vocab.json and merges.txt")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise BundleError(str(scheduler), "missing: the scheduler's config")
    return index


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path)


# -- graph interfaces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    """One of our graph inputs or outputs and the name it has in the other layout."""

    ours: str
    theirs: str
    dtype: str  # ours: "float32" or "int64"
    shape: tuple[int | str, ...]


def _elem(dtype: str) -> int:
    import onnx

    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64,
            "int32": onnx.TensorProto.INT32}[dtype]


def _dtype_name(elem: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _fresh(graph, base: str) -> str:
    """A tensor name not used in `graph` (a graph adapted twice, there and back, must stay valid)."""
    used = {n for node in graph.node for n in (*node.input, *node.output)}
    used |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    name, n = base, 1
    while name in used:
        name, n = f"{base}{n}", n + 1
    return name


def _value_info(name: str, elem: int, shape: tuple[int | str, ...]):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, list(shape))


def _replace_input(graph, old_name: str, name: str, elem: int, shape: tuple, inner_elem: int, inner_rank: int | None = None) -> None:
    """Graph input `old_name` becomes `name` (dtype `elem`, `shape`), cast to what the graph
    computed with (`inner_elem`); `inner_rank` 0: the graph took a scalar, given the first element."""
    from onnx import helper

    index = next(i for i, v in enumerate(graph.input) if v.name == old_name)
    inner = _fresh(graph, f"{old_name}__adapted")
    _rename_uses(graph, old_name, inner)
    nodes, source = [], name
    if inner_rank == 0 and len(shape) == 1:
        first, scalar = _fresh(graph, f"{inner}__index"), _fresh(graph, f"{inner}__scalar")
        nodes.append(helper.make_node("Gather", [source, first], [scalar], axis=0))
        graph.initializer.append(helper.make_tensor(first, _elem("int64"), [], [0]))
        source = scalar
    nodes.append(helper.make_node("Cast", [source], [inner], to=inner_elem) if elem != inner_elem
                 else helper.make_node("Identity", [source], [inner]))
    for n, node in enumerate(nodes):
        graph.node.insert(n, node)
    graph.input.remove(graph.input[index])
    graph.input.insert(index, _value_info(name, elem, shape))


def _replace_output(graph, old_name: str, name: str, elem: int, shape: tuple, inner_elem: int) -> None:
    from onnx import helper

    index = next(i for i, v in enumerate(graph.output) if v.name == old_name)
    inner = _fresh(graph, f"{old_name}__adapted")
    _rename_uses(graph, old_name, inner)
    graph.node.append(helper.make_node("Cast", [inner], [name], to=elem) if elem != inner_elem
                      else helper.make_node("Identity", [inner], [name]))
    graph.output.remove(graph.output[index])
    graph.output.insert(index, _value_info(name, elem, shape))


def _adapt(model, inputs: list[Port], outputs: list[Port], to_ours: bool) -> None:
    """Give `model` the interface of `inputs`/`outputs` (ours when `to_ours`, else theirs), with
    casts where the dtypes differ; other outputs are dropped (ONNX Runtime prunes what feeds them)."""
    graph = model.graph
    elems = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.input}
    for port in inputs:
        old, new = (port.theirs, port.ours) if to_ours else (port.ours, port.theirs)
        new_elem = _elem(port.dtype) if to_ours else elems[old]
        _replace_input(graph, old, new, new_elem, port.shape, elems[old], ranks[old] if to_ours else None)
    if to_ours:  # only what the runtime reads: no `hidden_states.N`, no sampled latents
        wanted = {p.theirs for p in outputs} | {"latent_parameters"}
        for extra in [v for v in graph.output if v.name not in wanted]:
            graph.output.remove(extra)
    for port in outputs:
        old, new = (port.theirs, port.ours) if to_ours else (port.ours, port.theirs)
        new_elem = _elem(port.dtype) if to_ours else elems[old]
        _replace_output(graph, old, new, new_elem, port.shape, elems[old])


def _split_latent_parameters(model, channels: int, shape: tuple) -> None:
    """Optimum's VAE encoder gives `latent_parameters` (mean and log-variance, concatenated on the
    channels, as diffusers' DiagonalGaussianDistribution takes them); the runtime takes the mean and
    std = exp(½·clamp(logvar, −30, 20)), diffusers' own formula."""
    from onnx import helper

    graph = model.graph
    out = next(v for v in graph.output if v.name == "latent_parameters")
    inner_elem = out.type.tensor_type.elem_type
    graph.output.remove(out)
    for name in ("latent_mean", "latent_std"):  # names the graph may use inside (one we wrote)
        _rename_uses(graph, name, _fresh(graph, f"{name}__inner"))
    f32 = _elem("float32")
    t = {k: _fresh(graph, f"latent_parameters__{k}") for k in ("f32", "split", "min", "max", "half", "logvar",
                                                                "clipped", "halved")}
    graph.initializer.extend([
        helper.make_tensor(t["split"], _elem("int64"), [2], [channels, channels]),
        helper.make_tensor(t["min"], f32, [], [-30.0]),
        helper.make_tensor(t["max"], f32, [], [20.0]),
        helper.make_tensor(t["half"], f32, [], [0.5]),
    ])
    graph.node.extend([
        helper.make_node("Cast", ["latent_parameters"], [t["f32"]], to=f32) if inner_elem != f32
        else helper.make_node("Identity", ["latent_parameters"], [t["f32"]]),
        helper.make_node("Split", [t["f32"], t["split"]], ["latent_mean", t["logvar"]], axis=1),
        helper.make_node("Clip", [t["logvar"], t["min"], t["max"]], [t["clipped"]]),
        helper.make_node("Mul", [t["clipped"], t["half"]], [t["halved"]]),
        helper.make_node("Exp", [t["halved"]], ["latent_std"]),
    ])
    graph.output.extend([_value_info("latent_mean", f32, shape), _value_info("latent_std", f32, shape)])


def _join_latent_parameters(model, shape: tuple) -> None:
    """Our encoder's mean and std → Optimum's `latent_parameters` (mean, log(std²))."""
    from onnx import helper

    graph = model.graph
    for name in ("latent_mean", "latent_std"):
        graph.output.remove(next(v for v in graph.output if v.name == name))
    _rename_uses(graph, "latent_parameters", _fresh(graph, "latent_parameters__inner"))
    var, logvar = _fresh(graph, "latent_parameters__var"), _fresh(graph, "latent_parameters__logvar")
    graph.node.extend([
        helper.make_node("Mul", ["latent_std", "latent_std"], [var]),
        helper.make_node("Log", [var], [logvar]),
        helper.make_node("Concat", ["latent_mean", logvar], ["latent_parameters"], axis=1),
    ])
    graph.output.append(_value_info("latent_parameters", _elem("float32"), shape))


# -- weights ------------------------------------------------------------------------------------


def _external_locations(model) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors

    locations = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return locations


def _relocate(model, location: str) -> None:
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_location == 1:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _save_graph(model, src_dir: Path, dst: Path, data_name: str) -> list[Path]:
    """Write `model` (loaded without its external data) to `dst`, its weights beside it as
    `data_name`: the one data file linked as it is, several (one per tensor, as old exports
    have) gathered into one."""
    import onnx

    locations = _external_locations(model)
    for location in sorted(locations):
        if not (src_dir / location).is_file():
            raise BundleError(str(src_dir / location), f"missing: {src_dir.name}/{MODEL_FILE} keeps its weights there")
    if not locations:
        onnx.save(model, str(dst))
        return [dst]
    if len(locations) == 1:
        _relocate(model, data_name)
        onnx.save(model, str(dst))
        _link_or_copy(src_dir / locations.pop(), dst.parent / data_name)
        return [dst, dst.parent / data_name]
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(src_dir))
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    return [dst, dst.parent / data_name]


def _load_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise BundleError(str(path), f"not a readable ONNX graph ({e})") from None


# -- the interfaces of each component -----------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What the configs say about the networks' sizes."""

    max_length: int
    hidden: int
    latent_channels: int
    unet_in: int
    unet_out: int
    latent_side: int  # the UNet's native latent size
    down_blocks: int  # the UNet's
    vae_blocks: int
    image_channels: int


def _ports(name: str, s: Sizes, pooled: int | None) -> tuple[list[Port], list[Port]]:
    latents = ("batch", s.latent_channels, "height", "width")
    image = ("batch", s.image_channels, "image_height", "image_width")
    if name == "text_encoder":
        outs = [Port("last_hidden_state", "last_hidden_state", "float32", ("batch", s.max_length, s.hidden))]
        if pooled is not None:
            outs.append(Port("pooled_output", "pooler_output", "float32", ("batch", pooled)))
        return [Port("input_ids", "input_ids", "int64", ("batch", s.max_length))], outs
    if name == "unet":
        return ([Port("sample", "sample", "float32", latents), Port("timestep", "timestep", "float32", ("batch",)),
                 Port("encoder_hidden_states", "encoder_hidden_states", "float32", ("batch", s.max_length, s.hidden))],
                [Port("out_sample", "out_sample", "float32", ("batch", s.unet_out, "height", "width"))])
    if name == "vae_decoder":
        return [Port("latent_sample", "latent_sample", "float32", latents)], [Port("sample", "sample", "float32", image)]
    return [Port("sample", "sample", "float32", image)], []  # vae_encoder: its outputs are made apart


def _dims(name: str, s: Sizes) -> dict:
    """The sizes each symbolic dimension may take: the ranges export's component specs give."""
    from ..runtime.manifest import DimRange

    if name == "text_encoder":
        return {"batch": DimRange(1, 2, 32)}
    if name == "unet":
        multiple = 2 ** (s.down_blocks - 1)
        side = DimRange(multiple, s.latent_side, max(s.latent_side * 4, multiple), multiple)
        return {"batch": DimRange(1, 2, 64), "height": side, "width": side}
    if name == "vae_decoder":
        side = DimRange(1, s.latent_side, s.latent_side * 4)
        return {"batch": DimRange(1, 1, 32), "height": side, "width": side}
    scale = 2 ** (s.vae_blocks - 1)
    side = DimRange(scale, s.latent_side * scale, s.latent_side * scale * 4, scale)
    return {"batch": DimRange(1, 1, 8), "image_height": side, "image_width": side}


# -- import -------------------------------------------------------------------------------------


def import_optimum(src: Path | str, out_dir: Path | str, progress: Progress | None = None,
                   overwrite: bool = False):
    """Import an ONNX export in Optimum's layout into a bundle at `out_dir` (torch-free)."""
    from .. import __version__
    from ..runtime.manifest import FORMAT_VERSION, TOKENIZER_NAME, Manifest, SourceInfo, file_record, write_manifest
    from .staging import staged

    say = progress or (lambda msg: logger.info("%s", msg))
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(str(out_dir), "already exists; choose another output or allow overwriting")
    # 1. the layout is complete; its configs give the networks' sizes and the pipeline's constants
    check_layout(src)
    configs = {name: _read_json(src / name / "config.json") for name in ("text_encoder", "unet", "vae_decoder")}
    scheduler_config = _read_json(src / "scheduler" / "scheduler_config.json")
    tokenizer_json, max_length, pad_id = _tokenizer(src / "tokenizer")
    sizes = _sizes(src, configs, max_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged(out_dir) as tmp:
        # 2. each graph with the bundle's interface at its edges, its weights linked beside it
        components, extra = {}, {"imported_from": "optimum-layout"}
        for name, folder in FOLDERS.items():
            if (src / folder / MODEL_FILE).is_file():
                say(f"{name}: importing {folder}/{MODEL_FILE}")
                component = _import_component(name, src / folder, tmp, sizes, configs["text_encoder"], extra)
                if component is not None:
                    components[name] = component
        # 3. the tokenizer as tokenizer.json, the constants, the manifest
        (tmp / TOKENIZER_NAME).write_text(tokenizer_json, encoding="utf-8")
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            created_by=_versions(__version__),
            source=SourceInfo(checkpoint=str(src.resolve()), weights_sha256=layout_sha256(src)),
            pipeline=_constants(sizes, configs["vae_decoder"], scheduler_config, pad_id),
            components=components,
            tokenizer=file_record(tmp, tmp / TOKENIZER_NAME),
            extra=extra,
        )
        write_manifest(tmp, manifest)
    say(f"imported {src} → {out_dir}")
    return manifest


def _sizes(src: Path, configs: dict[str, dict[str, Any]], max_length: int) -> Sizes:
    text, unet, vae = configs["text_encoder"], configs["unet"], configs["vae_decoder"]
    sizes = Sizes(
        max_length=max_length, hidden=int(text.get("hidden_size", unet.get("cross_attention_dim", 768))),
        latent_channels=int(vae.get("latent_channels", 4)), unet_in=int(unet.get("in_channels", 4)),
        unet_out=int(unet.get("out_channels", 4)), latent_side=int(unet.get("sample_size", 64)),
        down_blocks=len(unet.get("block_out_channels", (0,) * 4)), vae_blocks=len(vae.get("block_out_channels", (0,) * 4)),
        image_channels=int(vae.get("out_channels", 3)),
    )
    if sizes.unet_in != sizes.latent_channels:
        raise BundleError(str(src / "unet" / "config.json"), f"in_channels {sizes.unet_in}: the import takes "
                          f"text-to-image UNets ({sizes.latent_channels} latent channels), not inpainting ones")
    return sizes


def _import_component(name: str, folder: Path, out: Path, sizes: Sizes, text_config: dict[str, Any],
                      extra: dict[str, Any]):
    """One graph of the layout as a bundle component (None: an encoder the runtime cannot use)."""
    from ..runtime.manifest import ComponentManifest, Precision, TensorInfo, file_record

    graph_path = folder / MODEL_FILE
    model = _load_graph(graph_path)
    theirs_in = {v.name: v for v in model.graph.input}
    theirs_out = [v.name for v in model.graph.output]
    pooled = None
    if name == "text_encoder" and "pooler_output" in theirs_out:
        pooled = int(text_config.get("projection_dim", sizes.hidden)) if "text_embeds" in theirs_out else sizes.hidden
    inputs, outputs = _ports(name, sizes, pooled)
    if name == "vae_encoder" and "latent_parameters" not in theirs_out:
        logger.warning("%s: outputs %s, not latent_parameters (a sample drawn inside the graph, as old exports did); "
                       "the bundle is text-to-image only", graph_path, theirs_out)
        return None
    _check_ports(graph_path, inputs, outputs, theirs_in, theirs_out)
    fp16 = _elem("float16")
    edges = [theirs_in[p.theirs] for p in inputs] if name != "text_encoder" else list(model.graph.output)
    precision = Precision.FP16 if any(v.type.tensor_type.elem_type == fp16 for v in edges) else Precision.FP32
    if name == "unet" and not theirs_in["timestep"].type.tensor_type.shape.dim:
        extra["one_timestep_per_batch"] = True  # newer Optimum exports: one timestep for the batch (the loop's way)
    _adapt(model, inputs, outputs, to_ours=True)
    if name == "vae_encoder":
        shape = ("batch", sizes.latent_channels, "height", "width")
        _split_latent_parameters(model, sizes.latent_channels, shape)
        outputs = [Port("latent_mean", "", "float32", shape), Port("latent_std", "", "float32", shape)]
    # the manifest lists them in the graph's order, which the runtime checks (Optimum's may differ from ours)
    order = {v.name: n for n, v in enumerate([*model.graph.input, *model.graph.output])}
    inputs, outputs = sorted(inputs, key=lambda p: order[p.ours]), sorted(outputs, key=lambda p: order[p.ours])
    files = _save_graph(model, folder, out / f"{name}.onnx", f"{name}.onnx.data")
    return ComponentManifest(
        name=name, files=tuple(file_record(out, f) for f in files), precision=precision,
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
        providers=("tensorrt", "cuda", "cpu"),  # the plain graph, as a generic export's
        inputs=tuple(TensorInfo(p.ours, p.dtype, p.shape) for p in inputs),
        outputs=tuple(TensorInfo(p.ours, p.dtype, p.shape) for p in outputs),
        dims=_dims(name, sizes),
    )


def _constants(sizes: Sizes, vae_config: dict[str, Any], scheduler_config: dict[str, Any], pad_id: int):
    from ..runtime.manifest import PipelineConstants
    from ..runtime.schedulers import default_scheduler_for

    scheduler_class = str(scheduler_config.get("_class_name", "PNDMScheduler"))
    vae_scale = 2 ** (sizes.vae_blocks - 1)
    shift = vae_config.get("shift_factor")
    return PipelineConstants(
        family="stable-diffusion",
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        latent_channels=sizes.latent_channels,
        vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        vae_shift_factor=None if shift is None else float(shift),
        vae_scale_factor=vae_scale,
        tokenizer_max_length=sizes.max_length,
        pad_token_id=pad_id,
        default_width=sizes.latent_side * vae_scale,
        default_height=sizes.latent_side * vae_scale,
        scheduler_class=scheduler_class,
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        default_scheduler=default_scheduler_for(scheduler_class).value,
        unet_feeds={"sample": "latents", "timestep": "timestep", "encoder_hidden_states": "text_encoder/last_hidden_state"},
    )


def _check_ports(graph_path: Path, inputs: list[Port], outputs: list[Port], theirs_in: dict, theirs_out: list[str]) -> None:
    """Every input the graph takes is one the runtime feeds, every output it needs is there."""
    known = {p.theirs for p in inputs}
    for name in theirs_in:
        if name not in known:
            raise BundleError(str(graph_path), f"input {name!r} is not one the import can feed (it takes "
                              f"{', '.join(sorted(known))}: Stable Diffusion 1/2 text-to-image graphs)")
    for port in inputs:
        if port.theirs not in theirs_in:
            raise BundleError(str(graph_path), f"no input {port.theirs!r}; inputs: {', '.join(theirs_in)}")
    for port in outputs:
        if port.theirs not in theirs_out:
            raise BundleError(str(graph_path), f"no output {port.theirs!r}; outputs: {', '.join(theirs_out)}")


def _versions(version: str) -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"ortdiffusion": version, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "imported": "optimum-layout"}


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _token(value: Any, default: str) -> str:
    if isinstance(value, dict):  # an AddedToken as transformers saves it
        return str(value.get("content", default))
    return str(value) if value is not None else default


def _tokenizer(folder: Path) -> tuple[str, int, int]:
    """tokenizer.json (as transformers' CLIPTokenizer builds it from vocab.json and merges.txt),
    the model's max length and the pad token's id."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    special = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
    max_length = int(config.get("model_max_length", 77))
    if max_length > 10_000:  # transformers' "no limit" sentinel
        max_length = 77
    tokens = {key: _token(special.get(key, config.get(key)), default)
              for key, default in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS), ("pad_token", EOS))}
    if (folder / "tokenizer.json").is_file():
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    else:
        text = clip_tokenizer_json(folder / "vocab.json", folder / "merges.txt", tokens)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text)
    pad_id = tokenizer.token_to_id(tokens["pad_token"])
    if pad_id is None:
        raise BundleError(str(folder), f"the pad token {tokens['pad_token']!r} is not in the vocabulary")
    return text, max_length, pad_id


def clip_tokenizer_json(vocab_path: Path, merges_path: Path, tokens: dict[str, str]) -> str:
    """CLIP's byte-level BPE as a `tokenizers` Tokenizer, built as transformers' CLIPTokenizer
    builds its backend (normalizer, split pattern, BOS/EOS post-processor), serialised."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = _read_json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=tokens["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in dict.fromkeys(tokens.values()) if t in vocab])
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    for token in (bos, eos):
        if token not in vocab:
            raise BundleError(str(vocab_path), f"no {token!r} in the vocabulary (CLIP's BOS/EOS tokens)")
    tokenizer.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                            add_prefix_space=False)
    return tokenizer.to_str()


# -- writing Optimum's layout -------------------------------------------------------------------


def write_optimum_layout(bundle_dir: Path | str, out_dir: Path | str, checkpoint: Path | str | None = None,
                         overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write an fp32 or fp16 bundle (ours) in Optimum's layout, for `ORTStableDiffusionPipeline`.
    Configs and tokenizer files come from `checkpoint` (the diffusers checkpoint it was exported
    from; default: the manifest's source, where it is on this machine), else are made from the manifest."""
    from ..runtime.manifest import load_manifest, verify_files
    from .staging import staged

    say = progress or (lambda msg: logger.info("%s", msg))
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = load_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    if out_dir.exists() and not overwrite:
        raise BundleError(str(out_dir), "already exists; choose another output or allow overwriting")
    source = Path(checkpoint) if checkpoint is not None else Path(manifest.source.checkpoint)
    if not (source / "model_index.json").is_file() or not (source / "vae" / "config.json").is_file():
        source = None
    c = manifest.pipeline
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged(out_dir) as tmp:
        for name, component in manifest.components.items():
            if name not in FOLDERS:  # the fp32 decoder kept for the NaN guard, a tiny decoder: Optimum has no place for them
                say(f"{name}: not written (Optimum's layout has no place for it)")
                continue
            say(f"{name}: writing {FOLDERS[name]}/{MODEL_FILE}")
            model = _load_graph(bundle_dir / component.model_file.path)
            ports_in = [Port(i.name, "input_ids" if i.name == "input_ids" else i.name, i.dtype, i.shape) for i in component.inputs]
            ports_out = [Port(o.name, {"pooled_output": "pooler_output"}.get(o.name, o.name), o.dtype, o.shape)
                         for o in component.outputs if name != "vae_encoder"]
            _adapt(model, ports_in, ports_out, to_ours=False)
            if name == "vae_encoder":
                _join_latent_parameters(model, ("batch", 2 * c.latent_channels, "height", "width"))
            folder = tmp / FOLDERS[name]
            folder.mkdir()
            _save_graph(model, bundle_dir, folder / MODEL_FILE, DATA_FILE)
            (folder / "config.json").write_text(json.dumps(_component_config(name, source, manifest), indent=2),
                                                encoding="utf-8")
        _write_tokenizer_folder(bundle_dir / manifest.tokenizer.path, tmp / "tokenizer", source, c)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": c.scheduler_class, **c.scheduler_config}, indent=2), encoding="utf-8")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                 "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
                 "scheduler": ["diffusers", c.scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    say(f"wrote {out_dir} in Optimum's layout")
    return out_dir


def _component_config(name: str, source: Path | None, manifest) -> dict[str, Any]:
    """The component's config: the checkpoint's own, else the constants the runtime knows."""
    folder = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}[name]
    if source is not None and (source / folder / "config.json").is_file():
        return _read_json(source / folder / "config.json")
    c = manifest.pipeline
    unet = manifest.components["unet"]
    if name == "text_encoder":
        hidden = manifest.components["text_encoder"].outputs[0].shape[-1]
        return {"hidden_size": hidden, "max_position_embeddings": c.tokenizer_max_length}
    if name == "unet":
        blocks = len(bin(unet.dims["height"].multiple_of)) - 2  # multiple_of = 2 ** (blocks - 1)
        return {"_class_name": "UNet2DConditionModel", "in_channels": c.latent_channels,
                "out_channels": unet.outputs[0].shape[1], "sample_size": c.default_height // c.vae_scale_factor,
                "cross_attention_dim": unet.inputs[2].shape[-1], "time_cond_proj_dim": None,
                "block_out_channels": [0] * blocks}
    blocks = c.vae_scale_factor.bit_length()
    config = {"_class_name": "AutoencoderKL", "latent_channels": c.latent_channels, "scaling_factor": c.vae_scaling_factor,
              "block_out_channels": [0] * blocks, "in_channels": 3, "out_channels": 3}
    if c.vae_shift_factor is not None:
        config["shift_factor"] = c.vae_shift_factor
    return config


def _write_tokenizer_folder(tokenizer_json: Path, out: Path, source: Path | None, c) -> None:
    """The checkpoint's tokenizer folder where it is at hand; else vocab.json and merges.txt (which
    every transformers version reads) taken from tokenizer.json, with the config that names CLIP."""
    if source is not None and (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", out)
        return
    out.mkdir()
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    vocab = model["vocab"]
    pad = next((t for t, i in vocab.items() if i == c.pad_token_id), EOS)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": c.tokenizer_max_length, "bos_token": BOS,
         "eos_token": EOS, "unk_token": EOS, "pad_token": pad}, indent=2), encoding="utf-8")
