"""What needs a CUDA GPU: the CUDA target's export (parity is checked on the CUDA provider) and the
pipeline on it. Marked `gpu`: skipped where ONNX Runtime has no CUDA provider (conftest.py)."""

from __future__ import annotations

import pytest

from conftest import psnr

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_fp16_bundle(tiny_checkpoint, tmp_path_factory):
    from ortdiffusion.export.bundle import ExportOptions, export_checkpoint
    from ortdiffusion.export.optimize import Target
    from ortdiffusion.runtime.manifest import Precision

    out = tmp_path_factory.mktemp("gpu") / "tiny-cuda-fp16"
    return out, export_checkpoint(tiny_checkpoint, out, ExportOptions(target=Target.CUDA, precision=Precision.FP16))


def test_cuda_target_exports_fused_fp16_with_parity_on_cuda(cuda_fp16_bundle):
    import onnx

    out, manifest = cuda_fp16_bundle
    assert all(c.providers == ("cuda",) for c in manifest.components.values())
    assert manifest.components["unet"].precision.value == "fp16"
    ops = {n.op_type for n in onnx.load(str(out / "unet.onnx")).graph.node}
    # the tiny UNet's sizes are not ones ONNX Runtime's GroupNorm/BiasSplitGelu kernels take: those
    # stay unfused (optimize.cuda_fusions_fit); attention and NHWC convolution are fused
    assert {"MultiHeadAttention", "NhwcConv"} <= ops and "GroupNorm" not in ops
    vae_ops = {n.op_type for n in onnx.load(str(out / "vae_decoder.onnx")).graph.node}
    assert "GroupNorm" in vae_ops  # the tiny decoder's groups fit
    assert all(r.rel_l2_error <= 2e-2 for c in manifest.components.values() for r in c.parity)


def draws_like_the_cpu(bundle, tiny_pipeline, prompt: str, seed: int, steps: int) -> float:
    """Load `bundle` on CUDA (and nothing else), draw `prompt`, return the PSNR against the CPU fp32 image."""
    from ortdiffusion import Pipeline

    pipe = Pipeline.load(bundle, providers="cuda")  # the per-node check passed: only shape arithmetic off CUDA
    assert set(pipe.providers.values()) == {"cuda"}
    assert all(counts["cuda"] > counts.get("cpu", 0) for counts in pipe.placement.values()), pipe.placement
    kwargs = dict(seed=seed, num_inference_steps=steps)
    return psnr(pipe(prompt, **kwargs).images[0], tiny_pipeline(prompt, **kwargs).images[0])


def test_cuda_pipeline_draws_what_the_cpu_pipeline_draws(cuda_fp16_bundle, tiny_pipeline):
    out, _ = cuda_fp16_bundle
    assert draws_like_the_cpu(out, tiny_pipeline, "a red circle", seed=3, steps=4) > 30


def test_generic_bundle_runs_on_cuda(tiny_bundle, tiny_pipeline):
    assert draws_like_the_cpu(tiny_bundle, tiny_pipeline, "a blue square", seed=5, steps=3) > 35


def test_cuda_loop_stays_on_the_device_and_replays_a_cuda_graph(tiny_bundle, tiny_pipeline):
    """On CUDA the default loop is the device loop: nothing crosses inside it; a CUDA-graph bucket
    draws the same picture and its second call reuses the captured session."""
    from ortdiffusion import Pipeline

    kwargs = dict(seed=[7], num_inference_steps=4)
    cpu = tiny_pipeline("a green star", **kwargs).images[0]
    plain = Pipeline.load(tiny_bundle, providers="cuda")
    assert plain.device_loop is not None
    # no step-graph node off CUDA but shape arithmetic: otherwise ONNX Runtime would copy inside the loop
    assert all(p.off_provider == () for p in plain.device_loop.step_graph_placement.values())
    print("step graph placement on CUDA:", plain.device_loop.step_graph_placement)
    r = plain("a green star", **kwargs)
    assert r.transfers.in_loop == 0 and psnr(r.images[0], cpu) > 35
    graphed = Pipeline.load(tiny_bundle, providers="cuda", cuda_graphs=[(1, 64, 64)])
    first, second = graphed("a green star", **kwargs), graphed("a green star", **kwargs)
    assert graphed.device_loop.graphs.built == 1
    assert psnr(first.images[0], cpu) > 35 and psnr(second.images[0], first.images[0]) > 60


def test_torch_engine_times_its_cuda_stages_with_events(tiny_checkpoint):
    """diffusers on CUDA runs ahead of the GPU: its stages are timed with CUDA events, read after the
    run's synchronize, so each UNet step has a duration on the GPU and the stages fit in the run."""
    from ortdiffusion.bench.diffusers_engines import CudaEventClock, TorchEngine

    engine = TorchEngine(str(tiny_checkpoint), "cuda", scheduler="ddim")
    assert engine.device == "cuda"
    assert isinstance(engine.pipe.unet.forward.clock, CudaEventClock)
    record = engine.run(batch=2, width=64, height=64, steps=4, guidance=7.5)
    stages = record.stages
    assert len(stages["unet_step"]) == 4 and all(s > 0 for s in stages["unet_step"])
    assert sum(sum(v) for v in stages.values()) <= record.end_to_end
