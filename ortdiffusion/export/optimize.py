"""Graph optimization for a target provider, with ONNX Runtime's own tools.

For the CPU, three steps: ONNX Runtime's transformer optimizer's fusions for CLIP, UNet and VAE
graphs (LayerNorm, Gelu, …); the UNet's and VAE's attention cores fused into MultiHeadAttention
(`attention.py`, which says why by hand); then ONNX Runtime's graph optimizer at the extended
level, saved at export so that the runtime loads an already-optimized graph. Fusions whose
operators only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv,
packed QKV) are left out for the CPU. The saved level is EXTENDED, not ALL: ONNX Runtime documents
the layout optimizations of ALL as specific to the machine that ran them; the runtime applies
those itself at load.

For CUDA: the transformer optimizer's GPU fusions, as ONNX Runtime's own stable-diffusion script
(`onnxruntime.transformers.models.stable_diffusion.optimize_pipeline`) sets them: attention as
MultiHeadAttention (flash / memory-efficient kernels), GroupNorm, SkipGroupNorm, BiasSplitGelu,
BiasAdd, NHWC convolution, SkipLayerNorm; packed QKV/KV only for fp16. The graph-level
optimizations are left to the runtime's load (they depend on the provider, which the export
machine may lack).

For TensorRT: the plain graph. TensorRT parses standard ONNX only (no com.microsoft operators),
does its own fusions and builds fp16 engines itself (`trt_fp16_enable`), as NVIDIA's diffusion
demo and ONNX Runtime's TensorRT engine builder feed it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import numpy as np

from ..runtime.providers import session_options
from .attention import fuse_attention

logger = logging.getLogger(__name__)


class Target(str, Enum):
    """What an export is optimized for; the manifest records the providers that follows from it."""

    GENERIC = "generic"  # the plain graph: runs on every provider
    CPU = "cpu"  # fused and pre-optimized for the CPU provider
    CUDA = "cuda"  # fused with operators that only the CUDA provider has
    TENSORRT = "tensorrt"  # the plain graph, for TensorRT to build its engines from

    @property
    def providers(self) -> tuple[str, ...]:
        return {Target.GENERIC: ("tensorrt", "cuda", "cpu"), Target.CPU: ("cpu",), Target.CUDA: ("cuda",),
                Target.TENSORRT: ("tensorrt",)}[self]

    @property
    def parity_provider(self) -> str:
        """The ONNX Runtime provider export checks parity on: the one the graph was built for,
        where its operators need it (CUDA); the CPU provider where the graph is plain ONNX."""
        return "CUDAExecutionProvider" if self is Target.CUDA else "CPUExecutionProvider"

    @property
    def onnx_fp16(self) -> bool:
        """Whether `--precision fp16` converts the graph: not for TensorRT, which keeps the fp32
        graph and builds fp16 engines from it (its documented way; it picks per-layer precision)."""
        return self is not Target.TENSORRT


#: The transformer optimizer's name for each component's graph family.
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_decoder_fp32": "vae",
               "vae_encoder": "vae"}


#: Sizes onnxruntime-gpu 1.31.1's diffusion kernels take, or they refuse the input at run time
#: (messages seen on an H100; ONNX Runtime's contrib_ops/cuda/diffusion sources): BiasSplitGelu's
#: hidden size (GEGLU's projection, both halves), BiasAdd's channels (a transformer block's output
#: plus its residual), GroupNorm's channels per group (two per thread; a block of at most 512).
BIAS_SPLIT_GELU_SIZES = frozenset({2560, 5120, 6144, 10240, 12288})
BIAS_ADD_CHANNELS = frozenset({320, 640, 1280})
GROUP_NORM_MAX_CHANNELS_PER_GROUP = 512


def cuda_fusions_fit(module) -> dict[str, bool]:
    """Which of the transformer optimizer's CUDA-only fusions ONNX Runtime's kernels can run for the
    shapes of `module`, by FusionOptions name. The optimizer fuses by pattern, not by shape, and a
    kernel that refuses its input fails only at run time. Real checkpoints fit (SD 1.5: 320/640/1280
    channels, 10 per group, GEGLU 2560/5120/10240); tiny test configs do not, and keep those nodes
    unfused (standard ONNX operators, which run on CUDA as well)."""
    import torch

    groups = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    group_norm = all(m.num_channels % m.num_groups == 0 and (m.num_channels // m.num_groups) % 2 == 0
                     and m.num_channels // m.num_groups <= GROUP_NORM_MAX_CHANNELS_PER_GROUP for m in groups)
    geglu = [m.proj.out_features for m in module.modules()
             if type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None), torch.nn.Linear)]
    blocks = [m for m in module.modules() if type(m).__name__.endswith("Transformer2DModel")]
    channels = [getattr(b.proj_out, "out_features", getattr(b.proj_out, "out_channels", None)) for b in blocks]
    return {"enable_group_norm": group_norm, "enable_skip_group_norm": group_norm,
            "enable_bias_splitgelu": all(n in BIAS_SPLIT_GELU_SIZES for n in geglu),
            "enable_bias_add": all(c in BIAS_ADD_CHANNELS for c in channels)}


def fusion_options(model_type: str, target: Target, fp16: bool = False, fits: dict[str, bool] | None = None):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if target is Target.CUDA:
        for name, fit in (fits or {}).items():  # a fusion whose kernel would refuse these shapes is left out
            setattr(options, name, getattr(options, name, False) and fit)
        # As ONNX Runtime's stable-diffusion script: packed QKV / KV attention inputs only for fp16
        # (the kernels that take them packed are fp16 ones).
        options.enable_packed_qkv = fp16 and options.enable_packed_qkv
        options.enable_packed_kv = fp16 and options.enable_packed_kv
        return options
    if target is Target.CPU and model_type in ("unet", "vae"):
        # Its UNet attention fusion writes self-attention as the `Attention` op, whose CPU kernel
        # materialises the [heads, S, S] scores; `attention.fuse_attention` writes
        # MultiHeadAttention instead (flash attention on the CPU). LayerNorm fusions are kept.
        options.enable_attention = False
    if target is Target.CPU:
        for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
            if hasattr(options, name):
                setattr(options, name, False)
    return options


@contextmanager
def numpy2_num_heads_fix() -> Iterator[None]:
    """Work around onnxruntime's UNet attention fusion under NumPy >= 2.4 (onnxruntime 1.31.1, still in 1.32.0).

    `FusionAttentionUnet.get_num_heads` calls `int()` on a one-element array, which NumPy 2.4 turns
    from a deprecation into `TypeError: only 0-dimensional arrays can be converted to Python
    scalars`. No option avoids that call (a `num_heads` given to the optimizer is only a fallback
    after it), and pinning NumPy below 2.4 would hold back every user of the package; so for the
    duration of one optimization this one method is replaced by the same logic with `.item()`.
    Nothing else of onnxruntime is touched. Remove when onnxruntime fixes it upstream.
    """
    import sys

    import onnxruntime.transformers.optimizer  # noqa: F401 - loads the fusion modules
    from onnxruntime.transformers import fusion_attention_unet

    # onnxruntime's transformer tools import each other as top-level modules too, so the class may
    # exist twice; patch every copy.
    classes = {fusion_attention_unet.FusionAttentionUnet}
    if "fusion_attention_unet" in sys.modules:
        classes.add(sys.modules["fusion_attention_unet"].FusionAttentionUnet)
    originals = {cls: cls.get_num_heads for cls in classes}

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        num_heads = 0
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and list(value.shape) == [1]:
                    num_heads = int(value[0].item())
        else:
            value = self.model.get_constant_value(reshape_q.input[1])
            if isinstance(value, np.ndarray) and list(value.shape) == [4]:
                num_heads = int(value[2].item())
        return max(num_heads, 0)

    for cls in classes:
        cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.get_num_heads = original


def declare_contrib_opset(model) -> None:
    """Import the com.microsoft domain where fused nodes use it, as the optimizer's own save does
    (the graph is saved here without it: its save would load every weight)."""
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        opset = model.opset_import.add()
        opset.domain, opset.version = "com.microsoft", 1


@contextmanager
def external_data_readable_from(directory: Path) -> Iterator[None]:
    """Run the body with `directory` as the working directory. ONNX Runtime's fusions read the
    few weights they need through `onnx.numpy_helper.to_array(tensor)`, which finds a tensor's
    external data relative to the working directory; this is what lets them run on a graph loaded
    without its weights. Export is the only caller, one component at a time."""
    import os

    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def optimize_graph(files: list[Path], component: str, target: Target, fp16: bool = False,
                   fits: dict[str, bool] | None = None) -> dict[str, int]:
    """Optimize the graph (`files`: the graph, then its external data if any) in place for
    `target`; return the fused operator counts. A graph past 2 GB keeps its weights in the one
    external data file beside it. `fp16`: the graph will be converted to fp16 next (CUDA's packed
    attention inputs are fused only then). `fits`: the CUDA fusions the module's shapes allow (`cuda_fusions_fit`).

    The fusions run on the graph without its weights in memory: loaded with
    `load_external_data=False`, the few weights a fusion reads come from disk one by one, and the
    fused graph refers to the original data file for all it left alone. Loaded whole, the
    SD-1.5-sized UNet (3.4 GB of weights) took this step to a 23.7 GB peak
    (`benchmarks/results/export-memory-sd15-cpu2.json`)."""
    if target in (Target.GENERIC, Target.TENSORRT):
        return {}
    import tempfile
    from contextlib import nullcontext

    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from .weights import gather_external_data

    path, external = files[0], len(files) > 1
    # a ControlNet is a UNet's encoder half: the UNet's fusions (export/controlnet.py names them controlnet_<k>)
    model_type = MODEL_TYPES.get(component, "unet" if component.startswith("controlnet_") else None)
    gpu = target is Target.CUDA
    fused: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-opt-") as tmp:
        staged = Path(tmp) / path.name  # written aside, then moved over: the originals are read meanwhile
        # The fused graph for ONNX Runtime's CPU optimizer sits beside the original, so that the
        # weights it did not touch are read from the original data file where they are.
        source, fused_graph = path, path.with_name(f".fused-{path.name}")
        if model_type is not None:
            structure = onnx.load(str(path), load_external_data=False)
            with external_data_readable_from(path.parent), numpy2_num_heads_fix() if gpu else nullcontext():
                # The NumPy-2 workaround is needed only where the UNet attention fusion runs (CUDA).
                model = optimize_model(structure, model_type=model_type, opt_level=0, use_gpu=gpu,
                                       optimization_options=fusion_options(model_type, target, fp16, fits))
                fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
                if target is Target.CPU and model_type in ("unet", "vae"):
                    fused["MultiHeadAttention"] = fuse_attention(model.model)
                model.topological_sort()
                declare_contrib_opset(model.model)
                if gpu:  # the fused graph is the result; its weights gathered into one data file
                    if external:
                        gather_external_data(model.model, path.parent, staged)
                    else:
                        onnx.save_model(model.model, str(staged))
                elif external:  # new (fused) weights in a data file of their own; the rest stays where it is
                    onnx.save_model(model.model, str(fused_graph), save_as_external_data=True,
                                    all_tensors_to_one_file=True, location=f"{fused_graph.name}.data",
                                    size_threshold=1024)
                    source = fused_graph
                else:  # under 2 GB, loaded whole: one file (ONNX Runtime's save would keep referring to a data file)
                    onnx.save_model(model.model, str(fused_graph))
                    source = fused_graph
            # The optimizer's model and fusion objects refer to each other: without a collection
            # here, their cycles kept 9.3 GB (SD-1.5's UNet, loaded whole then) into the next step.
            del model, structure
            gc.collect()
        try:
            if target is Target.CPU:
                config = {"session.optimized_model_external_initializers_file_name": f"{path.name}.data",
                          "session.optimized_model_external_initializers_min_size_in_bytes": "1024"} if external else {}
                options = session_options(optimization="extended", config=config, optimized_model_path=str(staged))
                ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        finally:
            fused_graph.unlink(missing_ok=True)
            fused_graph.with_name(f"{fused_graph.name}.data").unlink(missing_ok=True)
        if staged.exists():
            staged.replace(path)
            if external:
                (Path(tmp) / f"{path.name}.data").replace(files[1])
    logger.info("%s optimized for %s: %s", component, target.value, fused)
    return fused
