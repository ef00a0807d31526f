"""OpenVINO GenAI's `Text2ImagePipeline` as a bench engine: the torch-free CPU peer a user would
pick instead of us (issue 29). Models are exported with optimum-intel, as OpenVINO's own guides do
(`optimum-cli export openvino --model ... --task text-to-image [--weight-format int8]`), once, into
the cache; the engine then runs them with `openvino_genai` alone.

It lives in an environment of its own (optimum-intel pins its own transformers), given to the
bench as `--openvino-python` (docs/benchmarks.md says how to make it). Kept apart from
`worker.py`'s imports so that no other engine's process imports OpenVINO.

Precision: OpenVINO's CPU plugin runs fp32 models in bf16 where the CPU has bf16 instructions
(the AMD EPYC of `benchmarks/results/openvino-probe-cpu2.json` did; the one of this session's
bench has no AVX-512 and OpenVINO reports f32 as its default), so each variant sets
`INFERENCE_PRECISION_HINT` and says what it ran:

- `openvino`: fp32 weights, f32 compute — the same precision as ours' fp32 bundle;
- `openvino-int8`: int8 weights (NNCF's weight compression, what `--weight-format int8` does),
  f32 compute;
- `openvino-bf16`: fp32 weights, bf16 compute where the CPU has it (OpenVINO's own default there:
  what a user who changes nothing gets); recorded as fp32 on a CPU without bf16.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from .records import Sample
from .tasks import PROMPT, Task

#: variant -> (optimum-intel's --weight-format, OpenVINO's INFERENCE_PRECISION_HINT, the record's precision)
VARIANTS = {"openvino": ("fp32", "f32", "fp32"),
            "openvino-int8": ("int8", "f32", "int8-weights"),
            "openvino-bf16": ("fp32", "bf16", "bf16")}

#: Ours' scheduler names -> openvino_genai.Scheduler.Type member names (the diffusers classes they mirror).
SCHEDULER_TYPES = {"ddim": "DDIM", "euler": "EULER_DISCRETE", "euler_a": "EULER_ANCESTRAL_DISCRETE",
                   "lcm": "LCM", "pndm": "PNDM", "lms": "LMS_DISCRETE"}


def exported_dir(model: str, variant: str) -> Path:
    from ..models import resolve_checkpoint
    from ..runtime.cache import cache_dir

    weights, _, _ = VARIANTS[variant]
    return cache_dir() / "openvino" / f"{resolve_checkpoint(model).name}-{weights}"


def export(model: str, variant: str) -> Path:
    """`optimum-cli export openvino --task text-to-image --weight-format W` of `model`'s diffusers
    checkpoint, cached: the command OpenVINO's own guides give, which also converts the tokenizer
    to the OpenVINO model GenAI runs (`save_pretrained` of optimum-intel's pipeline does not).
    Written to a temporary directory and renamed, so an interrupted export looks unfinished."""
    import importlib.util
    import shutil
    import sys

    from ..models import resolve_checkpoint

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.intel") is None \
            or importlib.util.find_spec("openvino_genai") is None:
        raise ImportError("optimum-intel and openvino-genai are not installed in this environment")
    out = exported_dir(model, variant)
    if (out / "model_index.json").is_file():
        return out
    weights, _, _ = VARIANTS[variant]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                    str(resolve_checkpoint(model)), "--task", "text-to-image", "--weight-format", weights, str(partial)],
                   check=True, stdout=sys.stderr)
    partial.rename(out)
    return out


class OpenVINOEngine:
    name = "openvino"

    def __init__(self, model: str, provider: str | None, variant: str = "openvino", scheduler: str | None = None,
                 task: str = "text-to-image"):
        if Task(task) is not Task.TEXT_TO_IMAGE:
            raise ValueError(f"the bench runs OpenVINO GenAI for text-to-image only, not {task}")
        if provider not in (None, "cpu"):
            raise ValueError(f"the bench runs OpenVINO on the CPU only, not {provider}")
        import openvino_genai as ov_genai

        self.name = variant
        path = exported_dir(model, variant)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: not exported (the runner's prepare step exports it)")
        _, hint, self.precision = VARIANTS[variant]
        import openvino as ov

        if hint == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            # a CPU without bf16 instructions: OpenVINO computes in f32 whatever the hint says (its
            # default there); the record says what ran, not what was asked
            self.precision = "fp32 (no bf16 on this CPU)"
        self.pipe = ov_genai.Text2ImagePipeline(str(path), "CPU", INFERENCE_PRECISION_HINT=hint)
        self.scheduler = type_name = None
        if scheduler:
            type_name = SCHEDULER_TYPES.get(scheduler)
            if type_name is None:
                raise ValueError(f"OpenVINO GenAI has no scheduler mirroring ours' {scheduler!r}; "
                                 f"it has {', '.join(SCHEDULER_TYPES)}")
            config = path / "scheduler" / "scheduler_config.json"
            self.pipe.set_scheduler(ov_genai.Scheduler.from_config(str(config), getattr(ov_genai.Scheduler.Type, type_name)))
            self.scheduler = scheduler
        else:
            self.scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        self.ov_genai = ov_genai
        # OpenVINO's CPU plugin (the record's engine name says which runtime; the device kind is what it compares on)
        self.providers = {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu"}

    def run(self, batch: int, width: int, height: int, steps: int, guidance: float) -> Sample:
        import numpy as np
        from PIL import Image

        from ..runtime.png import encode_png

        start = time.perf_counter()
        tensor = self.pipe.generate(PROMPT, width=width, height=height, num_inference_steps=steps,
                                    guidance_scale=guidance, num_images_per_prompt=batch, rng_seed=0)
        png_start = time.perf_counter()
        pixels = np.asarray(tensor.data)  # (batch, height, width, 3) uint8
        for image in pixels:  # as a user's save loop does
            encode_png(Image.fromarray(image), {})
        end = time.perf_counter()
        return Sample(end_to_end=end - start, stages={**self.stages(), "png_encode": [end - png_start]})

    def stages(self) -> dict[str, list[float]]:
        """The last generate's stage times from GenAI's own performance metrics (milliseconds,
        microseconds for the raw per-step list): the networks; the rest of generate's time is
        charged to `scheduler` (the host work between the networks: GenAI runs the scheduler,
        guidance and tokenization in C++ and reports them only together)."""
        m = self.pipe.get_performance_metrics()
        text = sum(m.get_text_encoder_infer_duration().values()) / 1e3
        unet = [us / 1e6 for us in m.raw_metrics.unet_inference_durations]
        decoder = m.get_vae_decoder_infer_duration() / 1e3
        rest = m.get_generate_duration() / 1e3 - text - sum(unet) - decoder
        return {"text_encoder": [text], "unet_step": unet, "decoder": [decoder], "scheduler": [max(rest, 0.0)]}


def prepare(engine: str, model: str) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        path = export(model, engine)
    except ImportError as e:
        return {"error": f"{engine} unavailable: {e} (an environment with optimum-intel and openvino-genai, given as "
                         "--openvino-python: docs/benchmarks.md)"}
    except subprocess.CalledProcessError as e:  # optimum-cli said why on stderr, which the bench passes through
        return {"error": f"{engine} could not export: optimum-cli exited with {e.returncode}"}
    return {"prepared": str(path), "s": time.perf_counter() - start}
