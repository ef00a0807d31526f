"""int8 for the CPU provider: the UNet quantized statically, calibrated on real denoising inputs.

ONNX Runtime's own static quantization (`onnxruntime.quantization.quantize_static`), QDQ format:
weights int8 per output channel, activations uint8 (the U8S8 pair its x86 kernels run with AVX-512
VNNI), ranges from MinMax calibration. The calibration inputs are what the UNet really sees:
diffusers' own StableDiffusionPipeline runs the checkpoint on calibration prompts and a forward
hook records every UNet call (latents at every step, timesteps, text embeddings with and without
the prompt). By default the prompts are the built-in model's scene captions.

Only the UNet is quantized: it is where the time goes (20 steps × 2 for guidance); the text encoder
runs once and the image decoder is where quantization shows most, so both stay fp32.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .weights import save_with_external_data

logger = logging.getLogger(__name__)

#: Relative L2 error of the int8 UNet's noise prediction against torch fp32 above which export
#: fails. A sanity bound that catches a broken quantization; the quality cost proper is measured
#: end to end (`ortdiffusion compare`, the built-in model's evaluator).
INT8_TOLERANCE = 0.25


@dataclass(frozen=True)
class Calibration:
    prompts: tuple[str, ...] = ()  # empty: 16 built-in scene captions
    steps: int = 8
    size: int | None = None  # image side; None: the checkpoint's native size, at most 256
    guidance: float = 5.0
    seed: int = 0


def scene_prompts(n: int = 16, seed: int = 0) -> tuple[str, ...]:
    from ..builtin.scenes import caption_for, random_scene

    rng = random.Random(seed)
    return tuple(caption_for(random_scene(rng), rng) for _ in range(n))


def unet_calibration_feeds(ckpt: Checkpoint, calibration: Calibration = Calibration()) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs at every step of diffusers' pipeline on the calibration prompts."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    scheduler = getattr(diffusers, ckpt.scheduler_class).from_config(ckpt.scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=ckpt.vae, text_encoder=ckpt.text_encoder, tokenizer=ckpt.tokenizer, unet=ckpt.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    native = int(ckpt.unet.config.sample_size) * 2 ** (len(ckpt.vae.config.block_out_channels) - 1)
    size = calibration.size or min(native, 256)
    feeds: list[dict[str, np.ndarray]] = []

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = kwargs["encoder_hidden_states"]
        batch = sample.shape[0]
        feeds.append({
            "sample": sample.detach().float().numpy().copy(),
            "timestep": np.full((batch,), float(torch.as_tensor(timestep).reshape(-1)[0]), np.float32),
            "encoder_hidden_states": text.detach().float().numpy().copy(),
        })

    handle = ckpt.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = calibration.prompts or scene_prompts(seed=calibration.seed)
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                pipe(prompt, num_inference_steps=calibration.steps, guidance_scale=calibration.guidance,
                     height=size, width=size, output_type="latent",
                     generator=torch.Generator().manual_seed(calibration.seed + i))
    finally:
        handle.remove()
    logger.info("unet calibration: %d calls recorded (%d prompts × %d steps, %d×%d)",
                len(feeds), len(prompts), calibration.steps, size, size)
    return feeds


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def fuse_attention_in_place(files: list[Path]) -> int:
    """The attention cores as MultiHeadAttention (`attention.py`) before quantization: they then
    run as fp32 flash attention instead of two activation × activation MatMuls quantized to 8 bits
    (the lossiest of the UNet's products) around a softmax held in full, [heads, S, S]."""
    import onnx

    from .attention import fuse_attention

    model = onnx.load(str(files[0]))
    fused = fuse_attention(model)
    # ONNX's shape inference, which the quantizer reads tensor types from, does not know the
    # com.microsoft operator, so its outputs are typed here (fp32, like its inputs); without that
    # the quantizer leaves the attention output projections unquantized ("failed to infer the type").
    typed = {vi.name for vi in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type == "MultiHeadAttention":
            model.graph.value_info.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
                                          for o in node.output if o and o not in typed)
    if len(files) > 1:
        save_with_external_data(model, files[0])
    else:
        onnx.save(model, str(files[0]))
    logger.info("unet: %d attention cores fused before quantization", fused)
    return fused


def quantize_unet(files: list[Path], feeds: list[dict[str, np.ndarray]]) -> list[Path]:
    """Quantize the fp32 UNet graph (`files`: graph, then external data if any) in place (int8
    QDQ, static, MinMax); return the files that now make it up (int8 fits one file)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Feeds, CalibrationDataReader):
        pass

    path, large = files[0], len(files) > 1
    fuse_attention_in_place(files)
    prepared = path.with_name(f".{path.stem}.prep.onnx")
    quantized = path.with_name(f".{path.stem}.int8.onnx")
    scratch = [prepared, quantized, *(p.with_name(p.name + ".data") for p in (prepared, quantized))]
    try:
        # ONNX Runtime's recommended preparation (graph cleanup, ONNX shape inference). Its symbolic
        # shape inference gives up on the UNet ("Incomplete symbolic shape inference"), so it is skipped.
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True, save_as_external_data=large,
                          all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
        quantize_static(
            str(prepared), str(quantized), Reader(feeds),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"], use_external_data_format=large,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        for extra in files[1:]:
            extra.unlink()
        onnx.save(onnx.load(str(quantized)), str(path))  # gathers any external data into the graph
        return [path]
    finally:
        for p in scratch:
            p.unlink(missing_ok=True)
        for p in path.parent.glob(f".{path.stem}.*"):  # whatever the quantizer left beside them
            if p.is_file():
                p.unlink()
