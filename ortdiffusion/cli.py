"""`ortdiffusion export | generate | vary | compare | bench | serve | info | cache` — the command line.

Every command takes a model the same way (`ortdiffusion.models`: `builtin`, a preset, a bundle, a
checkpoint directory, a hub name, a single-file checkpoint or an ONNX export in Optimum's layout), checks what it can — its extras, its arguments, where it will write — before
any work, and answers a mistake with one line that names the flag the user typed (exit 2), or the
file or extra at fault (exit 1), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .runtime.errors import InvalidRequestError, OrtDiffusionError, ProviderError  # onnxruntime is imported lazily
from .cli_output import ProgressBar, check_output, info_text, output_paths, parity_table
from .runtime.request import VARIATION_STRENGTH, parse_size

logger = logging.getLogger("ortdiffusion.cli")

#: The runtime's field names (the Python API's, diffusers' own) → the flag a CLI user typed.
FLAGS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "num_images_per_prompt": "--num-images",
    "negative_prompt": "--negative-prompt", "seed": "--seed", "scheduler": "--scheduler", "providers": "--provider",
    "size": "--size", "width": "--size", "height": "--size", "output": "-o", "engines": "--engines", "image": "--image",
    "mask_image": "--mask", "strength": "--strength", "lora": "--lora", "control_image": "--control-image",
    "controlnet_conditioning_scale": "--controlnet-scale", "control_guidance_start": "--control-start",
    "control_guidance_end": "--control-end"}


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cli_message(error: InvalidRequestError) -> str:
    """The error with the runtime's field name replaced by the flag (`--steps`, not `num_inference_steps`)."""
    field = getattr(error, "field", "")
    text = str(error)
    flag = FLAGS.get(field)
    if flag is None or not text.startswith(f"{field}: "):
        return text
    rest = text[len(field) + 2:]
    return f"{flag}: {field} {rest}" if field in ("width", "height") else f"{flag}: {rest}"


def _require_export(what: str) -> None:
    from .models import require_extra

    require_extra("export", what)


def _resolve_bundle(model: str | None, flag: str, config: str | None = None) -> Path:
    """The bundle `model` names, exporting it once into the cache if it is a checkpoint or preset
    (after checking the export extra is there, so a missing torch is said before any work)."""
    from .models import needs_export, resolve_bundle

    if needs_export(model, config=config):
        _require_export(f"{flag} {model} (exported once, then cached)")
    return resolve_bundle(model, progress=_err, config=config)


def _preference(args: argparse.Namespace):
    """The provider preference; with --allow-fallback the CPU is added after what was asked for,
    so `--provider cuda --allow-fallback` runs on the CPU where there is no CUDA (a warning says so)."""
    from .runtime.providers import ProviderKind, ProviderPreference, available_providers

    preference = ProviderPreference.parse(args.provider, args.allow_fallback)
    if preference is None or not args.allow_fallback:
        return preference
    have = available_providers()
    missing = [k.value for k in preference.kinds if k not in have]
    if ProviderKind.CPU not in preference.kinds:
        preference = ProviderPreference(kinds=(*preference.kinds, ProviderKind.CPU), options=preference.options,
                                        allow_fallback=True)
    if missing:
        _err(f"warning: {', '.join(missing)} not available in this onnxruntime; falling back to "
             f"{next(k.value for k in preference.kinds if k in have)} (--allow-fallback)")
    return preference


# -- export -------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .cli_models import cmd_export as run  # export in either layout, or import an ONNX export

    return run(args, _err)


# -- generate -----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.manifest import load_manifest
    from .runtime.pipeline import Pipeline
    from .runtime.png import encode_images, write_atomically
    from .runtime.request import make_request
    from .runtime.vocabulary import prompt_warnings

    # 1. everything that can be checked without the model: size, where the images go, providers
    width, height = parse_size(args.size)
    fmt = check_output(args.output, max(args.num_images, 1))
    preference = _preference(args)
    # 2. the model's bundle (exported once if it is a checkpoint or preset), its manifest, the request
    bundle = _resolve_bundle(args.model, "--model", args.config)
    manifest = load_manifest(bundle)
    control = _control(manifest, args)
    request = make_request(manifest, args.prompt, negative_prompt=args.negative_prompt,
                           num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed,
                           width=width, height=height, image=args.image, mask_image=args.mask, strength=args.strength,
                           guidance_rescale=args.guidance_rescale, decoder=args.decoder,
                           long_prompts=args.long_prompt,
                           prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2,
                           added=_added_conditions(args), schedule={"denoising_end": args.denoising_end},
                           control=control)
    for warning in prompt_warnings(bundle, request.prompts, request.width, request.height):
        _err(f"warning: {warning}")
    # 3. load (1–2 s), generate, write
    started = time.perf_counter()
    refiner = _resolve_bundle(args.refiner, "--refiner") if args.refiner else None
    pipe = Pipeline.load(bundle, providers=preference, allow_fallback=args.allow_fallback, refiner=refiner)
    if args.lora:
        request = _with_loras(pipe, request, args.lora)
    load_s = time.perf_counter() - started
    bar = ProgressBar("denoising", enabled=not args.quiet)
    result = pipe.generate(request, callback=bar)
    encode_start = time.perf_counter()
    paths = [write_atomically(data, p) for data, p in
             zip(encode_images(result.images, result.metadata, fmt), output_paths(args.output, len(result.images)))]
    encode_s = time.perf_counter() - encode_start
    t = result.timings
    for path, seed in zip(paths, result.seeds):
        print(f"wrote {path} (seed {seed})")
    steps = len(t.unet_steps)
    print(
        f"providers: {', '.join(f'{k}={v}' for k, v in result.providers.items())}\n"
        f"load {load_s:.2f} s | tokenize {t.tokenize * 1e3:.1f} ms | text encoder {t.text_encoder * 1e3:.1f} ms | "
        f"unet {t.unet:.3f} s ({steps} steps, {t.unet / max(steps, 1) * 1e3:.1f} ms/step) | "
        f"scheduler {t.scheduler * 1e3:.1f} ms | decoder {t.decoder * 1e3:.1f} ms | "
        f"postprocess {t.postprocess * 1e3:.1f} ms | {fmt.value} {encode_s * 1e3:.1f} ms | total {t.total + encode_s:.3f} s"
    )
    return 0


def _control(manifest, args: argparse.Namespace):
    """The ControlNet flags → the request's control (runtime/control.py), or None without --control-image."""
    from .runtime.control import make_control

    images = getattr(args, "control_image", None)
    if not images:
        return None

    def one_or_each(values: list[float] | None, default: float | None):
        return default if not values else values[0] if len(values) == 1 else list(values)

    return make_control(manifest, [str(p) for p in images], one_or_each(args.controlnet_scale, None),
                        one_or_each(args.control_start, 0.0), one_or_each(args.control_end, 1.0),
                        args.guess_mode, args.canny, image_input=getattr(args, "image", None) is not None)


# -- info ---------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .runtime.manifest import load_manifest, verify_files
    from .runtime.providers import available_providers

    bundle = _resolve_bundle(str(args.bundle), "info")
    manifest = load_manifest(bundle)
    verify_files(bundle, manifest)
    if args.json:  # JSON alone, for jq and friends
        print(json.dumps({"bundle": str(bundle), "available_providers": [k.value for k in available_providers()],
                          "manifest": json.loads(manifest.to_json())}, indent=2))
        return 0
    print(info_text(bundle, manifest))
    return 0


# -- compare ------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    _require_export("compare (it runs the checkpoint in torch)")
    from .export.compare import compare
    from .models import resolve_checkpoint

    checkpoint = resolve_checkpoint(str(args.checkpoint), config=args.config, progress=_err)
    bundle = _resolve_bundle(str(args.bundle if args.bundle is not None else args.checkpoint), "compare", args.config)
    from .runtime.lora import LoraSpec

    report = compare(checkpoint, bundle, args.prompt, args.steps, args.guidance, args.scheduler, args.seed,
                     args.image, args.provider, tuple(LoraSpec.parse(t) for t in args.lora or ()))
    print(f"torch ({checkpoint}, fp32) against ONNX Runtime ({bundle}), {report.precision}\n")
    print("| what | figures | limit | result |\n|---|---|---|---|")
    for line in report.lines:
        figures = ", ".join(f"{k} {v:.3g}" for k, v in line.figures.items())
        print(f"| {line.what} | {figures} | {line.limit} | {'pass' if line.passed else 'FAIL'} |")
    if report.latent_divergence:
        print("\nlatents, step by step (relative L2): " + " ".join(f"{d['rel_l2_error']:.1e}" for d in report.latent_divergence))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=float))
    if args.image:
        print(f"side by side (torch | ONNX | difference ×10): {args.image}")
    print("\nPASS" if report.passed else "\nFAIL")
    return 0 if report.passed else 3


# -- bench --------------------------------------------------------------------------------------


def engine_pythons(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The interpreters of the engines that live in environments of their own."""
    from .bench.worker import OPENVINO_VARIANTS

    pythons = [("optimum", args.optimum_python)] if args.optimum_python else []
    if args.openvino_python:
        pythons += [(name, args.openvino_python) for name in OPENVINO_VARIANTS]
    return tuple(pythons)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # said before the run, not after it
        raise ImportError("bench --plot needs matplotlib: pip install 'ortdiffusion[bench]' (or leave out --plot)")
    from .bench.report import markdown, plot
    from .bench.runner import ENGINES, BenchPlan, Setting, run_bench
    from .runtime.cache import cache_dir
    from .runtime.schedulers import SchedulerName

    sizes = [parse_size(s) for s in args.size.split(",")]
    settings = tuple(Setting(int(b), w, h, args.steps) for (w, h) in sizes for b in args.batch.split(","))
    engines = tuple(e.strip() for e in args.engines.split(","))
    for engine in engines:
        if engine not in ENGINES:
            raise InvalidRequestError("engines", f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
    scheduler = SchedulerName.parse(args.scheduler, field="scheduler").value if args.scheduler else None
    plan = BenchPlan(models=tuple(args.model or ["tiny"]), engines=engines, settings=settings, runs=args.runs,
                     warmup=args.warmup, provider=args.provider, guidance=args.guidance,
                     pythons=engine_pythons(args), scheduler=scheduler,
                     task=args.task)
    report = run_bench(plan, progress=_err)
    table = markdown(report)
    print(table)
    for export in report.exports:
        _err(f"{export['model']}: {export['engine']} used the bundle {export['bundle']}")
    _err(f"exports are cached in {cache_dir() / 'bundles'} (set ORTDIFFUSION_CACHE to move them; delete to re-export)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if not report.records:
        _err("error: no engine could run here (see the reasons above)")
        return 1
    if args.plot:
        plot(report, args.plot)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.cli import cmd_serve as run

    return run(args, _err)


# -- entry --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .runtime.schedulers import SchedulerName

    parser = argparse.ArgumentParser(prog="ortdiffusion", description="Text-to-image on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"ortdiffusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="a model → ONNX bundle (or Optimum's layout), parity-checked")
    p.add_argument("checkpoint", type=Path, help="a diffusers checkpoint directory, a hub name (org/name), a single-file "
                   "checkpoint (.safetensors, .ckpt), builtin or a preset (tiny, sd15-arch, sd21-arch); an ONNX export "
                   "in Optimum's layout is imported")
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=["bundle", "optimum"], default="bundle",
                   help="optimum: write Optimum's layout (model_index.json, text_encoder/model.onnx, ...) that "
                   "ORTStableDiffusionPipeline loads")
    _config_arg(p)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="fp16: float16 except nodes whose values overflow it on calibration inputs (measured); "
                   "the image decoder stays fp32 if its fp16 version misses parity. int8: the UNet quantized "
                   "statically for the CPU provider, calibrated on diffusers' own pipeline runs")
    p.add_argument("--target", choices=["generic", "cpu", "cuda", "tensorrt"], default="generic",
                   help="generic: the plain graph, runs anywhere; cpu: ONNX Runtime's fusions and graph optimizations "
                   "for the CPU provider; cuda: its GPU fusions (flash attention, GroupNorm, NHWC convolution; "
                   "parity is checked on the CUDA provider, so export where it runs); tensorrt: the plain graph, "
                   "from which TensorRT builds fp16 engines itself")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--default-steps", type=int, help="steps a call that names none gets (default: the family's: "
                   "20; 4 for LCM; 1 for a *turbo* checkpoint)")
    p.add_argument("--default-guidance", type=float, help="guidance a call that names none gets (7.5; 8.5 LCM; 0 turbo)")
    p.add_argument("--tiny-decoder", type=Path, default=None, help="a diffusers AutoencoderTiny directory (TAESD) to add "
                   "as a fast decoder, chosen per call with --decoder tiny")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="fuse a LoRA (diffusers/PEFT or kohya "
                   "safetensors) into the weights at SCALE (default 1); repeatable")
    p.add_argument("--lora-inputs", action="store_true", help="give the UNet and text encoder LoRA inputs, so that "
                   "LoRAs are chosen per request (generate --lora, serve --lora-dir) with no rebuild")
    p.add_argument("--controlnet", type=Path, action="append", default=None, metavar="DIR",
                   help="a diffusers ControlNetModel directory to add (repeatable: several ControlNets, in order); "
                        "the UNet then takes their residuals, chosen per call with generate --control-image")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new bundle passed)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="prompt → PNG, JPEG or WebP; with --image: img2img, with --mask: inpainting")
    p.add_argument("prompt")
    p.add_argument("--image", type=Path, default=None, help="an input image: img2img (the bundle needs its vae_encoder)")
    p.add_argument("--mask", type=Path, default=None, help="with --image: inpaint where the mask is white")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much of the schedule runs on it, 0–1 (default 0.8; 1 with --mask)")
    control = p.add_argument_group("ControlNet (bundles exported with --controlnet; diffusers' semantics)")
    control.add_argument("--control-image", type=Path, action="append", default=None,
                         help="a control image (edges, depth, pose); one per ControlNet of the bundle, in order")
    control.add_argument("--canny", action="store_true", help="turn the control images into Canny edges first")
    control.add_argument("--controlnet-scale", type=float, action="append", default=None,
                         help="controlnet_conditioning_scale: one, or one per ControlNet (default 1; 0.8 with --image)")
    control.add_argument("--control-start", type=float, action="append", default=None,
                         help="control_guidance_start: the fraction of the schedule where control begins (default 0)")
    control.add_argument("--control-end", type=float, action="append", default=None,
                         help="control_guidance_end: where it ends (default 1)")
    control.add_argument("--guess-mode", action="store_true",
                         help="diffusers' guess_mode: the ControlNets see the conditional prompt only")
    _generation_args(p)

    p = sub.add_parser("vary", help="an image → variations of it (img2img with the empty prompt)")
    p.add_argument("image", type=Path)
    p.add_argument("--strength", type=float, default=VARIATION_STRENGTH,
                   help=f"how far a variation may move from the image, 0–1 (default {VARIATION_STRENGTH})")
    _generation_args(p)
    p.set_defaults(prompt="", mask=None)

    p = sub.add_parser("compare", help="torch against ONNX Runtime, per component and end to end")
    p.add_argument("checkpoint", type=Path, help="builtin, a preset, a diffusers checkpoint directory, or a bundle "
                   "(compared against the checkpoint it was exported from)")
    p.add_argument("bundle", type=Path, nargs="?", default=None,
                   help="the bundle to judge (default: the model's own, exported once and cached)")
    p.add_argument("--prompt", default="a red circle on the left")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--image", type=Path, default=None, help="write torch | ONNX | difference as one PNG")
    p.add_argument("--provider", default=None, help="where the bundle runs (default: the CPU, or the provider a "
                   "CUDA export was made for)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="the end-to-end image with this LoRA on "
                   "both sides (diffusers' load_lora_weights; the bundle needs --lora-inputs); repeatable")
    _config_arg(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="latency, per-stage timings, throughput and memory against baselines")
    p.add_argument("--model", action="append", help="bundle, checkpoint or preset (tiny, sd15-arch, sd21-arch); repeatable")
    p.add_argument("--engines", default="ortdiffusion,torch,optimum", help="run side by side, in alternating order: ortdiffusion (generic fp32 bundle), ortdiffusion-cpu "
                   "(CPU fusions), ortdiffusion-int8, ortdiffusion-fp16, ortdiffusion-cuda (CUDA target, fp16), "
                   "ortdiffusion-cuda-graphs, torch, torch-compile (UNet and decode compiled; max-autotune on a GPU), optimum, openvino (OpenVINO GenAI fp32), openvino-int8, openvino-bf16")
    p.add_argument("--size", default="64x64", help="comma-separated WxH")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,2,4,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--task", default="text-to-image", choices=["text-to-image", "image-to-image", "inpainting"],
                   help="what every engine does; the image tasks use diffusers' img2img and inpainting pipelines "
                   "for torch, and the same input image, mask and strength for all")
    p.add_argument("--scheduler", default=None,
                   help="the scheduler every engine runs (torch and Optimum get diffusers' equivalent); default: the one "
                        "ours runs for the model (the checkpoint's own where implemented, DDIM for PNDM)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per engine and setting, after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--provider", default=None)
    p.add_argument("--optimum-python", default=None,
                   help="python of a separate environment with optimum[onnxruntime] (see README)")
    p.add_argument("--openvino-python", default=None,
                   help="python of a separate environment with optimum-intel and openvino-genai, for the engines "
                        "openvino (fp32), openvino-int8 (int8 weights) and openvino-bf16 (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="a PNG of the stages and rates (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, cmd_serve)
    from .cli_models import add_cache_parser

    add_cache_parser(sub)

    p = sub.add_parser("info", help="a bundle's manifest in short, and this machine's providers")
    p.add_argument("bundle", type=Path, help="builtin, a preset, a bundle or a diffusers checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the bundle, this machine's providers and the whole "
                   "manifest as one JSON document instead")
    p.set_defaults(func=cmd_info)
    for command in sub.choices.values():  # `-v` after the subcommand too; SUPPRESS keeps one given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens")
    return parser


def _with_loras(pipe, request, specs: list[str]):
    """`--lora FILE[:SCALE]` (repeatable): each file loaded into `pipe`, the request's set."""
    from dataclasses import replace

    from .runtime.lora import LoraSpec

    chosen = {}
    for text in specs:
        spec = LoraSpec.parse(text)
        chosen[pipe.load_lora(spec.path)] = spec.scale
    return replace(request, lora=pipe.loras.selection(chosen))


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="for a single-file checkpoint: a diffusers directory or hub name with "
                   "the model's configs and tokenizer (default: the one diffusers infers from its keys)")


def _generation_args(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `vary` share."""
    from .runtime.schedulers import SchedulerName

    p.add_argument("--model", default=None, help="builtin (the default), a preset (tiny, sd15-arch, sd21-arch, sdxl-arch), "
                   "a bundle, a diffusers checkpoint directory, a hub name (org/name), a single-file checkpoint "
                   "(.safetensors, .ckpt) or an ONNX export in Optimum's layout")
    _config_arg(p)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="default: the model's (manifest)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (manifest)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="0–1, diffusers' guidance_rescale (default 0)")
    p.add_argument("--decoder", default=None, help="full (default) or tiny: the bundle's tiny decoder, where it has one")
    p.add_argument("--long-prompt", action="store_true", help="encode a prompt past the tokenizer's length in windows "
                   "(as the web UIs do) instead of truncating it")
    p.add_argument("--scheduler", default=None, help=", ".join(s.value for s in SchedulerName))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA file applied at SCALE (default 1) "
                   "to a bundle exported with --lora-inputs; repeatable, blended")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--provider", default=None, help="ordered preference, e.g. cuda,cpu (default: best available)")
    p.add_argument("--allow-fallback", action="store_true", help="accept a provider outside --provider, the CPU included")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                   help="the image file; its suffix names the format: .png (default), .jpg/.jpeg, .webp")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sdxl = p.add_argument_group("SDXL (diffusers' names)")
    sdxl.add_argument("--prompt-2", default=None, help="the second text encoder's prompt (default: the prompt)")
    sdxl.add_argument("--negative-prompt-2", default=None)
    sdxl.add_argument("--refiner", default=None, help="a refiner the model hands its latents to (ensemble of experts)")
    sdxl.add_argument("--denoising-end", type=float, default=None,
                      help="the fraction of the schedule the model runs before the refiner takes over, e.g. 0.8")
    for name in ("original-size", "crops-coords-top-left", "target-size"):
        sdxl.add_argument(f"--{name}", default=None, metavar="HxW" if name != "crops-coords-top-left" else "TOPxLEFT",
                          help="an added condition (time_ids); default: the image's size" if name != "crops-coords-top-left"
                          else "an added condition (time_ids); default: 0x0")
    sdxl.add_argument("--aesthetic-score", type=float, default=None, help="the refiner's (default 6)")
    sdxl.add_argument("--negative-aesthetic-score", type=float, default=None, help="the refiner's (default 2.5)")
    p.set_defaults(func=cmd_generate)


def _added_conditions(args: argparse.Namespace) -> dict[str, object]:
    """The SDXL added conditions given on the command line, by diffusers' names; sizes as HxW."""
    added: dict[str, object] = {}
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        text = getattr(args, name, None)
        if text is not None:
            first, second = parse_size(text, f"--{name.replace('_', '-')}")  # "AxB" → (A, B): height, width
            added[name] = (first, second)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if getattr(args, name, None) is not None:
            added[name] = getattr(args, name)
    return added


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("onnxruntime") is None:  # every command runs ONNX Runtime: said before any work
        _err("error: ortdiffusion needs ONNX Runtime, which is not installed: pip install 'ortdiffusion[cpu]' "
             "(or 'ortdiffusion[gpu]' on an NVIDIA GPU)")
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, inside the handler below
        return code
    except InvalidRequestError as e:
        _err(f"error: {cli_message(e)}")
        return 2
    except (OrtDiffusionError, ImportError) as e:
        hint = ""
        if isinstance(e, ProviderError) and getattr(args, "provider", None) and not getattr(args, "allow_fallback", True):
            hint = f" (--provider {args.provider}; add --allow-fallback to run on what this machine has)"
        _err(f"error: {e}{hint}")
        return 1
    except BrokenPipeError:
        # The reader went away (`ortdiffusion info --json | head`): stop quietly, as Unix tools do;
        # stdout goes to /dev/null so the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


#: Commands after which `run` ends the process without the interpreter's teardown: they leave no
#: thread, child process or exit handler with work to do.
FAST_EXIT = frozenset({"generate", "vary", "info"})


def run() -> None:
    """The `ortdiffusion` script: `main`, and after a one-shot command the process ends at once
    (os._exit, once everything written is flushed), skipping the interpreter's teardown of
    onnxruntime, numpy and the sessions: 0.3–1 s of a cold `generate` on a busy 2-core machine
    (docs/runtime.md, "Cold start")."""
    argv = sys.argv[1:]
    code = main(argv)
    if next((a for a in argv if not a.startswith("-")), None) in FAST_EXIT:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a reader that went away: nothing left to say
            pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
