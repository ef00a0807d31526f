"""Checkpoint → bundle: export each component, check parity, write the manifest, then publish.

Everything is written into a temporary directory beside the output and renamed into place only
when every component has passed parity, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..runtime.errors import ExportError
from ..runtime.manifest import (
    FORMAT_VERSION,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TOKENIZER_NAME,
    UNET,
    VAE_DECODER,
    VAE_DECODER_FP32,
    VAE_DECODER_TINY,
    VAE_ENCODER,
    ComponentManifest,
    Manifest,
    PipelineConstants,
    Precision,
    SourceInfo,
    file_record,
    write_manifest,
)
from ..runtime.schedulers import default_scheduler_for
from ..runtime.tokenizer import PromptTokenizer
from .checkpoint import Checkpoint, load_checkpoint
from .fp16 import FP16_TOLERANCE, convert_to_fp16, measure_ranges
from .quantize import INT8_TOLERANCE, Calibration, quantize_unet, unet_calibration_feeds
from .lora_fuse import FusedLora, checkpoint_models, fuse_loras
from .lora_inputs import add_lora_inputs_in_place
from .onnx_export import DEFAULT_OPSET, Exporter, export_onnx
from .optimize import Target, cuda_fusions_fit, optimize_graph
from .parity import FP32_TOLERANCE, check_parity, measure_parity
from .staging import staged
from .specs import (
    UNET_FEEDS,
    ComponentSpec,
    text_encoder_component,
    tiny_decoder_component,
    unet_component,
    vae_decoder_component,
    vae_encoder_component,
)
from .weights import EXTERNAL_WEIGHTS_MIN_BYTES, offloaded, store_exact_fp32_weights_as_fp16, store_weights_externally

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    precision: Precision = Precision.FP32
    exporter: Exporter = Exporter.TORCHSCRIPT
    parity_tolerance: float = FP32_TOLERANCE
    overwrite: bool = False
    #: Store weights that fp16 holds exactly as fp16 (compute stays fp32; see export/weights.py).
    compact_weights: bool = True
    #: What a call that names no step count or guidance scale gets; None: the family's (`family_defaults`).
    default_steps: int | None = None
    default_guidance: float | None = None
    target: Target = Target.GENERIC
    #: With precision int8: the prompts and steps the UNet is calibrated on.
    calibration: Calibration = Calibration()
    #: A component whose weights pass this many bytes keeps them in `<component>.onnx.data`, which
    #: ONNX Runtime memory-maps instead of copying (export/weights.py).
    external_weights_min_bytes: int = EXTERNAL_WEIGHTS_MIN_BYTES
    #: A diffusers AutoencoderTiny directory (TAESD for SD 1/2, TAESDXL for SDXL) to add as the
    #: bundle's tiny decoder (`decoder="tiny"` per call), or None.
    tiny_decoder: Path | None = None
    #: LoRAs fused into the weights before export (`--lora FILE:SCALE`, export/lora_fuse.py).
    loras: tuple[FusedLora, ...] = ()
    #: Give the UNet and text encoder(s) LoRA inputs, switched per request (export/lora_inputs.py).
    lora_inputs: bool = False
    #: diffusers ControlNetModel directories: each becomes a component `controlnet_<k>`, and the UNet
    #: takes their residuals as inputs (export/controlnet.py). Empty: the plain UNet.
    controlnets: tuple[Path, ...] = ()


def export_component(
    spec: ComponentSpec, module: torch.nn.Module, bundle_dir: Path, options: ExportOptions = ExportOptions(),
    calibration_feeds: list[dict] | None = None,
) -> ComponentManifest:
    """Export one module by its spec into `bundle_dir`, check parity, return its manifest entry.

    Works for any `torch.nn.Module` whose forward takes the spec's inputs in order and returns its
    outputs (one tensor or a tuple).
    """
    files = export_onnx(spec, module, bundle_dir / f"{spec.name}.onnx", options.opset, options.exporter)
    if options.precision is Precision.INT8 and spec.name == UNET:
        precision, fp32_nodes, providers = Precision.INT8, (), (Target.CPU.value,)
        files, parity = _to_int8(spec, module, files, options, calibration_feeds)
    else:  # int8 quantizes the UNet only; the other components of an int8 export stay fp32
        target = options.target
        providers = target.providers
        fp16 = options.precision is Precision.FP16 and target.onnx_fp16
        fits = cuda_fusions_fit(module) if target is Target.CUDA else None
        if fp16:
            precision, fp32_nodes, files, parity = _to_fp16(spec, module, files, options, fits)
        else:
            precision, fp32_nodes = Precision.FP32, ()
            with offloaded(module, files[0].parent):  # ONNX Runtime's optimizer loads the graph's weights
                optimize_graph(files, spec.name, target, fits=fits)
                # Not for CUDA: its fused graph stays as ONNX Runtime's optimizer wrote it until a GPU
                # has run it (fused kernels reading Cast-fed weights is unverified there).
                if options.compact_weights and len(files) == 1 and target is not Target.CUDA:
                    store_exact_fp32_weights_as_fp16(files[0])
            parity = measure_parity(spec, module, files[0], target.parity_provider)
            check_parity(spec.name, parity, options.parity_tolerance)
    files = store_weights_externally(files, options.external_weights_min_bytes)
    return ComponentManifest(
        name=spec.name,
        files=tuple(file_record(bundle_dir, f) for f in files),
        precision=precision,
        opset=options.opset,
        providers=providers,
        inputs=tuple(i.info for i in spec.inputs),
        outputs=spec.outputs,
        dims=spec.dims,
        parity=tuple(parity),
        fp32_nodes=tuple(fp32_nodes),
    )


def _to_int8(spec: ComponentSpec, module: torch.nn.Module, files: list[Path], options: ExportOptions,
             feeds: list[dict] | None):
    """Static int8 from the plain graph (ONNX Runtime fuses the QDQ pairs itself at load)."""
    if not feeds:
        raise ExportError(f"{spec.name}: int8 needs calibration inputs (recorded by export_checkpoint)")
    files = quantize_unet(files, feeds)
    parity = measure_parity(spec, module, files[0])
    check_parity(spec.name, parity, max(options.parity_tolerance, INT8_TOLERANCE))
    return files, parity


def _to_fp16(spec: ComponentSpec, module: torch.nn.Module, files: list[Path], options: ExportOptions,
             fits: bool | None = None):
    """Optimized and converted to fp16 with a measured block list, parity-checked against torch fp32.
    The VAE's halves stay fp32 when their fp16 version misses parity (DESIGN.md: the VAE is where
    fp16 breaks first). The module's weights wait on disk until parity needs them (`offloaded`)."""
    target = options.target
    # Only the VAE may fall back to fp32, so only its fp32 graphs are kept aside meanwhile.
    fp32_files = [f.with_name(f".{f.name}.fp32") for f in files] if spec.name in (VAE_DECODER, VAE_ENCODER) else []
    try:
        with offloaded(module, files[0].parent):
            # A graph fused for CUDA does not run on the CPU, so its fp16 block list is measured
            # first, on the plain graph (fp16.convert_to_fp16 says how the nodes are matched).
            ranges = measure_ranges(files, spec) if target is Target.CUDA else None
            optimize_graph(files, spec.name, target, fp16=True, fits=fits)
            for f, backup in zip(files, fp32_files):
                shutil.copyfile(f, backup)
            fp32_nodes, fp16_files = convert_to_fp16(files, spec, ranges)
        parity = measure_parity(spec, module, fp16_files[0], target.parity_provider)
        tolerance = max(options.parity_tolerance, FP16_TOLERANCE)
        try:
            check_parity(spec.name, parity, tolerance)
            return Precision.FP16, fp32_nodes, fp16_files, parity
        except ExportError as e:
            if not fp32_files:
                raise
            logger.warning("%s: fp16 missed parity (%s); keeping it fp32", spec.name, e)
        for f in fp16_files:
            f.unlink()
        for f, backup in zip(files, fp32_files):
            backup.replace(f)
        parity = measure_parity(spec, module, files[0], options.target.parity_provider)
        check_parity(spec.name, parity, options.parity_tolerance)
        return Precision.FP32, (), files, parity
    finally:
        for backup in fp32_files:
            backup.unlink(missing_ok=True)


def pipeline_components(ckpt: Checkpoint) -> list[tuple[ComponentSpec, torch.nn.Module]]:
    """The networks of a Stable Diffusion pipeline, with their specs: the three of text-to-image,
    and the VAE's encoder, which image inputs need (img2img, inpainting, variations). SDXL's are
    in export/sdxl.py."""
    if ckpt.is_sdxl:
        from . import sdxl

        return sdxl.pipeline_components(ckpt)
    max_length = int(ckpt.tokenizer.model_max_length)
    latent = int(ckpt.unet.config.sample_size)
    components = [
        text_encoder_component(ckpt.text_encoder, max_length),
        unet_component(ckpt.unet, max_length, latent_channels=int(ckpt.vae.config.latent_channels)),
        vae_decoder_component(ckpt.vae, latent),
    ]
    # the image encoder: a KL autoencoder's latent distribution (a VQ model's encoder has none)
    if type(ckpt.vae).__name__ == "AutoencoderKL":
        components.append(vae_encoder_component(ckpt.vae, latent))
    return components


def pipeline_constants(ckpt: Checkpoint, options: ExportOptions, unet: ComponentManifest) -> PipelineConstants:
    vae_scale = 2 ** (len(ckpt.vae.config.block_out_channels) - 1)
    size = int(ckpt.unet.config.sample_size) * vae_scale
    steps, guidance = family_defaults(ckpt)
    tokenizer = ckpt.tokenizer or ckpt.tokenizer_2  # an SDXL refiner has only the second
    constants = PipelineConstants(
        family=FAMILIES.get(ckpt.pipeline_class, "stable-diffusion"),
        prediction_type=str(ckpt.scheduler_config.get("prediction_type", "epsilon")),
        latent_channels=int(ckpt.vae.config.latent_channels),
        vae_scaling_factor=float(ckpt.vae.config.scaling_factor),
        vae_shift_factor=getattr(ckpt.vae.config, "shift_factor", None),
        vae_scale_factor=vae_scale,
        tokenizer_max_length=int(tokenizer.model_max_length),
        pad_token_id=int(tokenizer.pad_token_id),
        default_width=size,
        default_height=size,
        scheduler_class=ckpt.scheduler_class,
        scheduler_config=ckpt.scheduler_config,
        default_scheduler=default_scheduler_for(ckpt.scheduler_class).value,
        default_steps=options.default_steps if options.default_steps is not None else steps,
        default_guidance=options.default_guidance if options.default_guidance is not None else guidance,
        unet_feeds={i.name: UNET_FEEDS.get(i.name, "") for i in unet.inputs},
    )
    if ckpt.is_sdxl:
        from . import sdxl

        return sdxl.pipeline_constants(ckpt, constants)
    return constants


#: The manifest's `family` by the checkpoint's pipeline class (Stable Diffusion's otherwise).
FAMILIES = {"LDMTextToImagePipeline": "latent-diffusion", "LatentConsistencyModelPipeline": "latent-consistency"}


def family_defaults(ckpt: Checkpoint) -> tuple[int, float]:
    """(steps, guidance scale) a call that names neither gets: what the model's makers recommend.
    An LCM UNet (it takes `timestep_cond`): diffusers' LatentConsistencyModelPipeline defaults, 4
    steps at 8.5. A checkpoint named "…turbo…" (SD-Turbo, SDXL-Turbo: adversarially distilled, no
    guidance): 1 step at 0, as their model cards say. Anything else: 20 steps at 7.5."""
    if getattr(ckpt.unet.config, "time_cond_proj_dim", None):
        return 4, 8.5
    if ckpt.pipeline_class == "LDMTextToImagePipeline":  # CompVis' model card: 50 steps at 6
        return 50, 6.0
    if "turbo" in str(ckpt.path).lower():
        return 1, 0.0
    return 20, 7.5


TOKENIZER_PROBES = (
    "",
    "a red circle on the left",
    "A Lighthouse at dusk, oil painting; 4k!!  (detailed)",
    "word " * 100,  # past the limit: truncation must agree too
)


def write_tokenizer(ckpt: Checkpoint, bundle_dir: Path) -> None:
    """Save tokenizer.json and check it tokenizes exactly as the checkpoint's transformers tokenizer."""
    path = bundle_dir / TOKENIZER_NAME
    tokenizer = ckpt.tokenizer or ckpt.tokenizer_2  # an SDXL refiner: its one tokenizer is also tokenizer.json
    tokenizer.backend_tokenizer.save(str(path))
    constants_len, pad = int(tokenizer.model_max_length), int(tokenizer.pad_token_id)
    ours = PromptTokenizer(path, constants_len, pad)(list(TOKENIZER_PROBES), warn_truncation=False)
    ref = tokenizer(
        list(TOKENIZER_PROBES), padding="max_length", max_length=constants_len, truncation=True, return_tensors="np"
    ).input_ids
    if ours.shape != ref.shape or (ours != ref).any():
        bad = next(i for i in range(len(TOKENIZER_PROBES)) if ours.shape != ref.shape or (ours[i] != ref[i]).any())
        raise ExportError(f"tokenizer: tokenizer.json gives other ids than transformers for {TOKENIZER_PROBES[bad]!r}")


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {
        "ortdiffusion": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def check_options(options: ExportOptions) -> None:
    """Refuse, before any work, an export this machine cannot check or that makes no sense."""
    import onnxruntime as ort

    if options.precision is Precision.INT8 and options.target not in (Target.GENERIC, Target.CPU):
        raise ExportError(f"precision int8 is for the CPU provider; target {options.target.value} allows fp32 or fp16")
    provider = options.target.parity_provider
    if provider not in ort.get_available_providers():
        raise ExportError(
            f"target {options.target.value}: export checks parity on {provider}, which this onnxruntime "
            f"({ort.__version__}) lacks (it offers {', '.join(ort.get_available_providers())}); export on a "
            "machine with onnxruntime-gpu and a GPU, or choose --target generic")
    if options.tiny_decoder is not None and not (Path(options.tiny_decoder) / "config.json").is_file():
        raise ExportError(f"{options.tiny_decoder}: not a diffusers AutoencoderTiny directory (no config.json); "
                          "--tiny-decoder takes one, e.g. a local copy of madebyollin/taesd")
    for path in options.controlnets:
        if not (Path(path) / "config.json").is_file():
            raise ExportError(f"{path}: not a diffusers ControlNetModel directory (no config.json); --controlnet "
                              "takes one, e.g. a local copy of lllyasviel/sd-controlnet-canny")
    if options.precision is Precision.FP16 and not options.target.onnx_fp16:
        logger.info("target %s: the graph stays fp32; TensorRT builds fp16 engines from it (trt_fp16_enable)",
                    options.target.value)


def export_checkpoint(
    checkpoint_dir: Path | str, out_dir: Path | str, options: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
) -> Manifest:
    """Export a diffusers checkpoint directory to a bundle at `out_dir`."""
    say = progress or (lambda msg: logger.info("%s", msg))
    check_options(options)
    out_dir = Path(out_dir)
    if out_dir.exists() and not options.overwrite:
        raise ExportError(f"{out_dir}: already exists; choose another output or allow overwriting")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    say(f"loading checkpoint {checkpoint_dir}")
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.is_sdxl and options.precision is Precision.INT8:
        raise ExportError("precision int8: calibration runs diffusers' SD pipeline; SDXL exports fp32 or fp16")
    if options.loras:
        say(f"fusing {len(options.loras)} LoRA(s) into the weights")
        fuse_loras(checkpoint_models(ckpt), options.loras)
    with staged(out_dir) as tmp:
        components = {}
        specs = pipeline_components(ckpt)
        controlnets = ()
        if options.controlnets:
            from .controlnet import with_controlnets

            specs, controlnets = with_controlnets(specs, tuple(options.controlnets),
                                                  2 ** (len(ckpt.vae.config.block_out_channels) - 1))
        feeds = None
        if options.precision is Precision.INT8:
            say("int8: recording the UNet's inputs in diffusers' pipeline for calibration")
            feeds = unet_calibration_feeds(ckpt, options.calibration)
        for n, (spec, module) in enumerate(specs, 1):
            say(f"[{n}/{len(specs)}] {spec.name}: exporting and checking parity")
            components[spec.name] = export_component(spec, module, tmp, _component_options(ckpt, spec.name, options),
                                                     feeds if spec.name == UNET else None)
            worst = max(r.rel_l2_error for r in components[spec.name].parity)
            say(f"[{n}/{len(specs)}] {spec.name}: done, worst relative L2 error {worst:.2e}")
            if spec.name == VAE_DECODER and components[spec.name].precision is Precision.FP16:
                # DESIGN.md's precision rule: pixels an fp16 decoder overflowed are decoded again in
                # fp32 at run time, by this copy (loaded only when that happens)
                say(f"[{n}/{len(specs)}] {spec.name}: keeping an fp32 copy for the NaN guard's retry")
                components[VAE_DECODER_FP32] = export_component(replace(spec, name=VAE_DECODER_FP32), module, tmp,
                                                                replace(options, precision=Precision.FP32))
        if options.tiny_decoder is not None:
            say(f"{VAE_DECODER_TINY}: exporting {options.tiny_decoder} and checking parity")
            components[VAE_DECODER_TINY] = _tiny_decoder(options.tiny_decoder, ckpt, tmp, options)
        write_tokenizer(ckpt, tmp)
        extra = {TINY_DECODER_SOURCE: str(Path(options.tiny_decoder).resolve())} if options.tiny_decoder else {}
        if options.loras:  # what the weights carry beyond the checkpoint's
            extra[FUSED_LORAS] = [{"path": str(f.path.resolve()), "scale": f.scale} for f in options.loras]
        tokenizers = {}
        if ckpt.is_sdxl and ckpt.text_encoder is not None:  # the refiner's one tokenizer is tokenizer.json
            from .sdxl import write_tokenizer_2

            tokenizers[TEXT_ENCODER_2] = file_record(tmp, write_tokenizer_2(ckpt, tmp, TOKENIZER_PROBES))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            created_by=_versions(),
            source=SourceInfo(checkpoint=str(Path(checkpoint_dir).resolve()), weights_sha256=ckpt.weights_sha256),
            pipeline=_with_controlnet_feeds(pipeline_constants(ckpt, options, components[UNET]), components,
                                            controlnets),
            components={k: components[k] for k in (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_DECODER_FP32,
                                                   VAE_ENCODER, VAE_DECODER_TINY, *(c.component for c in controlnets))
                        if k in components},
            tokenizer=file_record(tmp, tmp / TOKENIZER_NAME),
            extra=extra,
            tokenizers=tokenizers,
            controlnets=controlnets,
        )
        write_manifest(tmp, manifest)
        if options.lora_inputs:
            say("adding LoRA inputs to the UNet and text encoder(s)")
            manifest = add_lora_inputs_in_place(tmp, manifest)
    return manifest


#: The manifest's `extra` key listing the LoRAs fused at export (path, scale).
FUSED_LORAS = "fused_loras"


def _with_controlnet_feeds(constants: PipelineConstants, components: dict[str, ComponentManifest],
                           controlnets: tuple) -> PipelineConstants:
    """The UNet's residual inputs are fed by the ControlNets (none: the constants as they are)."""
    if not controlnets:
        return constants
    from .controlnet import controlnet_feeds

    return controlnet_feeds(constants, components[controlnets[0].component].outputs)


def _component_options(ckpt: Checkpoint, name: str, options: ExportOptions) -> ExportOptions:
    """SDXL's VAE overflows fp16 (the well-known black image): where its config says `force_upcast`,
    as diffusers upcasts it, its halves stay fp32 in an fp16 export (the UNet and encoders are fp16)."""
    if ckpt.is_sdxl and name in (VAE_DECODER, VAE_ENCODER) and getattr(ckpt.vae.config, "force_upcast", False):
        return replace(options, precision=Precision.FP32)
    return options


def add_image_encoder(checkpoint_dir: Path | str, bundle_dir: Path | str, options: ExportOptions = ExportOptions(),
                      progress: Progress | None = None) -> Manifest:
    """Give a bundle exported before image inputs existed its image encoder (the VAE encoder of the
    checkpoint it came from), leaving every other file as it is: how the built-in bundle got one.
    Written beside the bundle and published like an export."""
    def export(ckpt: Checkpoint, out: Path, options: ExportOptions) -> ComponentManifest:
        spec, module = vae_encoder_component(ckpt.vae, int(ckpt.unet.config.sample_size))
        return export_component(spec, module, out, options)

    return _add_component(VAE_ENCODER, "exporting and checking parity", export, checkpoint_dir, bundle_dir,
                          options, progress)


#: The manifest's `extra` key that records where the tiny decoder came from (for `compare`).
TINY_DECODER_SOURCE = "tiny_decoder_source"


def add_tiny_decoder(tiny_decoder: Path | str, checkpoint_dir: Path | str, bundle_dir: Path | str,
                     options: ExportOptions = ExportOptions(), progress: Progress | None = None) -> Manifest:
    """Give an existing bundle a tiny decoder (a diffusers AutoencoderTiny directory), leaving every
    other file as it is; published like an export."""
    def export(ckpt: Checkpoint, out: Path, options: ExportOptions) -> ComponentManifest:
        return _tiny_decoder(tiny_decoder, ckpt, out, options)

    return _add_component(VAE_DECODER_TINY, f"exporting {tiny_decoder} and checking parity", export, checkpoint_dir,
                          bundle_dir, options, progress,
                          extra={TINY_DECODER_SOURCE: str(Path(tiny_decoder).resolve())})


def _add_component(name: str, doing: str, export: Callable[[Checkpoint, Path, ExportOptions], ComponentManifest],
                   checkpoint_dir: Path | str, bundle_dir: Path | str, options: ExportOptions,
                   progress: Progress | None, extra: dict | None = None) -> Manifest:
    """Export component `name` of the checkpoint into a copy of an existing bundle (at its decoder's
    precision), every other file as it is, and publish the copy over the bundle like an export."""
    say = progress or (lambda msg: logger.info("%s", msg))
    from ..runtime.manifest import load_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    ckpt = load_checkpoint(checkpoint_dir)
    with staged(bundle_dir) as tmp:
        shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
        for f in tmp.glob(f"{name}.onnx*"):
            f.unlink()
        say(f"{name}: {doing}")
        component = export(ckpt, tmp, replace(options, precision=manifest.components[VAE_DECODER].precision))
        manifest = replace(manifest, components={**manifest.components, name: component},
                           extra={**manifest.extra, **(extra or {})})
        write_manifest(tmp, manifest)
    return manifest


def _tiny_decoder(path: Path | str, ckpt: Checkpoint, out: Path, options: ExportOptions) -> ComponentManifest:
    """Export the AutoencoderTiny at `path` as the tiny decoder of `ckpt`'s bundle."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    try:
        tiny = AutoencoderTiny.from_pretrained(str(path)).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise ExportError(f"{path}: not a diffusers AutoencoderTiny directory ({e})") from None
    if int(tiny.config.latent_channels) != int(ckpt.vae.config.latent_channels):
        raise ExportError(f"{path}: its latent_channels ({tiny.config.latent_channels}) are not the checkpoint VAE's "
                          f"({ckpt.vae.config.latent_channels}): a tiny decoder made for another model family")
    if getattr(ckpt.vae.config, "shift_factor", None):
        raise ExportError(f"{path}: the checkpoint's VAE has a shift_factor; tiny decoders are supported for "
                          "Stable Diffusion 1/2 and SDXL VAEs only")
    spec, module = tiny_decoder_component(tiny, float(ckpt.vae.config.scaling_factor), int(ckpt.unet.config.sample_size))
    return export_component(spec, module, out, options)
