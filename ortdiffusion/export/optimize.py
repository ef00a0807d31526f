"""Graph optimization for a target provider, with ONNX Runtime's own tools.

Three steps: ONNX Runtime's transformer optimizer's fusions for CLIP, UNet and VAE graphs
(attention, LayerNorm, Gelu, …); for the CPU, the UNet's and VAE's attention cores fused into
MultiHeadAttention (`attention.py`, which says why by hand); then ONNX Runtime's graph optimizer
at the extended level, saved at export so that the runtime loads an already-optimized graph.
Fusions whose operators only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd,
NhwcConv, packed QKV) are left out for the CPU.
The saved level is EXTENDED, not ALL: ONNX Runtime documents the layout optimizations of ALL as
specific to the machine that ran them; the runtime applies those itself at load.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

from .attention import fuse_attention

logger = logging.getLogger(__name__)


class Target(str, Enum):
    """What an export is optimized for; the manifest records the providers that follows from it."""

    GENERIC = "generic"  # the plain graph: runs on every provider
    CPU = "cpu"  # fused and pre-optimized for the CPU provider

    @property
    def providers(self) -> tuple[str, ...]:
        return {Target.GENERIC: ("tensorrt", "cuda", "cpu"), Target.CPU: ("cpu",)}[self]


#: The transformer optimizer's name for each component's graph family.
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae"}


def fusion_options(model_type: str, target: Target):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
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


def optimize_graph(files: list[Path], component: str, target: Target) -> dict[str, int]:
    """Optimize the graph (`files`: the graph, then its external data if any) in place for
    `target`; return the fused operator counts. A graph past 2 GB keeps its weights in the one
    external data file beside it."""
    if target is Target.GENERIC:
        return {}
    import tempfile

    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    path, external = files[0], len(files) > 1
    model_type = MODEL_TYPES.get(component)
    fused: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-opt-") as tmp:
        staged = Path(tmp) / path.name  # written aside, then moved over: the originals are read meanwhile
        source = path
        if model_type is not None:
            model = optimize_model(str(path), model_type=model_type, opt_level=0, use_gpu=False,
                                   optimization_options=fusion_options(model_type, target))
            fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
            if target is Target.CPU and model_type in ("unet", "vae"):
                fused["MultiHeadAttention"] = fuse_attention(model.model)
            fused_path = Path(tmp) / f"fused-{path.name}"
            model.save_model_to_file(str(fused_path), use_external_data_format=external, all_tensors_to_one_file=True)
            source = fused_path
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(staged)
        if external:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{path.name}.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        staged.replace(path)
        if external:
            (Path(tmp) / f"{path.name}.data").replace(files[1])
    logger.info("%s optimized for %s: %s", component, target.value, fused)
    return fused
