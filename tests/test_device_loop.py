"""The denoising loop on the device (IO binding + the step graph): it must draw what the host loop
draws, for every scheduler, and nothing may cross between host and device inside the loop.

On a GPU this is the default path; here it runs on the CPU provider (`io_binding=True`), which
exercises the same bindings, graphs and tables. tests/test_gpu.py runs it on CUDA where there is one.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import psnr
from ortdiffusion import Pipeline
from ortdiffusion.runtime import NumericalError, SchedulerName
from ortdiffusion.runtime.device_loop import PIXEL_GRAPHS, STEP_GRAPHS


@pytest.fixture(scope="module")
def device_pipeline(tiny_bundle):
    return Pipeline.load(tiny_bundle, providers="cpu", io_binding=True)


@pytest.mark.parametrize("scheduler", [s.value for s in SchedulerName])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_device_loop_draws_what_the_host_loop_draws(tiny_pipeline, device_pipeline, scheduler, guidance):
    kwargs = dict(seed=11, num_inference_steps=6, scheduler=scheduler, guidance_scale=guidance)
    host = tiny_pipeline("a red circle", **kwargs)
    device = device_pipeline("a red circle", **kwargs)
    assert host.transfers.in_loop > 0 and device.transfers.in_loop == 0
    # the same float32 arithmetic in another order: at most a rounding step apart
    a, b = np.asarray(host.images[0], np.int16), np.asarray(device.images[0], np.int16)
    assert np.abs(a - b).max() <= 1, psnr(a, b)


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])
def test_device_loop_rescales_guidance_as_the_host_loop(tiny_pipeline, device_pipeline, scheduler):
    kwargs = dict(seed=5, num_inference_steps=6, scheduler=scheduler, guidance_scale=40.0, negative_prompt="blue")
    plain = tiny_pipeline("a red circle", **kwargs).images[0]
    host = tiny_pipeline("a red circle", guidance_rescale=1.0, **kwargs).images[0]
    device = device_pipeline("a red circle", guidance_rescale=1.0, **kwargs).images[0]
    assert psnr(host, plain) < 40, "the rescale must change the picture for the comparison to mean anything"
    a, b = np.asarray(host, np.int16), np.asarray(device, np.int16)
    assert np.abs(a - b).max() <= 1, psnr(a, b)


def test_device_loop_sends_the_same_arrays_whatever_the_step_count(tiny_pipeline, device_pipeline):
    few, many = (device_pipeline("a cat", seed=1, num_inference_steps=n).transfers for n in (3, 9))
    assert (few.host_to_device, few.device_to_host, few.in_loop) == (many.host_to_device, many.device_to_host, 0)
    # ids, first latents, zeros for x0, the two tables, step, NaN count, first UNet input and timestep
    assert few.host_to_device == 9
    assert few.device_to_host == 3  # the latents' NaN count, the pixels' NaN count and the 8-bit image
    # the image comes back as 8 bits per channel (made on the device), not as float32 pixels
    assert few.bytes_device_to_host == 4 + 4 + 64 * 64 * 3
    host_few, host_many = (tiny_pipeline("a cat", seed=1, num_inference_steps=n).transfers for n in (3, 9))
    assert host_many.in_loop - host_few.in_loop == 6 * 4  # per step: 3 UNet inputs over, its output back


def test_device_loop_hands_each_step_to_a_callback(device_pipeline, tiny_pipeline):
    seen, host_seen = [], []
    kwargs = dict(seed=2, num_inference_steps=4)
    r = device_pipeline("a dog", callback=lambda i, n, x: seen.append(x.copy()), **kwargs)
    tiny_pipeline("a dog", callback=lambda i, n, x: host_seen.append(x.copy()), **kwargs)
    assert len(seen) == 4 and r.transfers.in_loop == 4  # one read-back per step, counted
    np.testing.assert_allclose(seen[-1], host_seen[-1], rtol=1e-4, atol=1e-4)


def test_device_loop_nan_guard_names_the_unet(device_pipeline, monkeypatch):
    import onnxruntime as ort

    unet = device_pipeline.sessions["unet"]

    class Broken:  # the UNet's output gets one NaN, as an fp16 overflow would give
        def __getattr__(self, name):
            return getattr(unet, name)

        def run_bound(self, *args, **kwargs):
            out = unet.run_bound(*args, **kwargs)["out_sample"].numpy()
            out[0, 0, 0, 0] = np.nan
            return {"out_sample": ort.OrtValue.ortvalue_from_numpy(out)}

    monkeypatch.setitem(device_pipeline.sessions, "unet", Broken())
    with pytest.raises(NumericalError, match="unet: 1 latent values became non-finite"):
        device_pipeline("a cat", seed=1, num_inference_steps=1)


def test_device_loop_decoder_nan_guard_reads_the_pixels_and_names_the_decoder(device_pipeline, monkeypatch):
    """The 8-bit tail counts non-finite pixels on the device; where there are some, the float pixels
    come back and the decoder's guard runs as on the host (no fp32 decoder here: refused by name)."""
    import onnxruntime as ort

    decoder = device_pipeline.decoders["full"]
    session = decoder.session

    class Broken:  # the decoder's output gets two NaNs, as an fp16 overflow would give
        def __getattr__(self, name):
            return getattr(session, name)

        def run_bound(self, *args, **kwargs):
            out = session.run_bound(*args, **kwargs)[decoder.output_name].numpy().copy()
            out[0, 0, :2, 0] = np.nan
            return {decoder.output_name: ort.OrtValue.ortvalue_from_numpy(out)}

    monkeypatch.setattr(decoder, "session", Broken())
    with pytest.raises(NumericalError, match="vae_decoder: 2 non-finite pixel values"):
        device_pipeline("a cat", seed=1, num_inference_steps=1)


def test_step_graphs_placement_is_checked(device_pipeline):
    """The step graphs get the networks' per-node check: on the provider the UNet runs on, every node."""
    placement = device_pipeline.device_loop.step_graph_placement
    assert set(placement) == set(STEP_GRAPHS) | set(PIXEL_GRAPHS) and len(placement) == 6 + 2  # rescaled only where guided
    for p in placement.values():
        assert set(p.nodes) == {"cpu"} and p.nodes["cpu"] > 10 and p.off_provider == ()


def test_shipped_step_graphs_are_what_the_exporter_builds():
    from ortdiffusion.export import step_graph
    from ortdiffusion.runtime.device_loop import GRAPHS, STEP_GRAPHS

    for (guided, blended, rescaled), name in STEP_GRAPHS.items():
        fresh = step_graph.build(guided, blended, rescaled).SerializeToString(deterministic=True)
        assert (GRAPHS / name).read_bytes() == fresh, f"{name} is stale: python -m ortdiffusion.export.step_graph"
    for dtype, name in PIXEL_GRAPHS.items():
        fresh = step_graph.build_to_uint8(dtype).SerializeToString(deterministic=True)
        assert (GRAPHS / name).read_bytes() == fresh, f"{name} is stale: python -m ortdiffusion.export.step_graph"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_8_bit_tail_gives_the_host_postprocess_bytes(dtype):
    """The device's pixels → 8-bit images: byte for byte the host's step 7 (diffusers' postprocess),
    halfway values and out-of-range pixels included; non-finite pixels counted."""
    import onnxruntime as ort

    from ortdiffusion.runtime.device_loop import GRAPHS

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1.3, 1.3, (2, 3, 40, 24)).astype(dtype)
    pixels[0, 0, 0, :5] = [k / 255 * 2 - 1 for k in (0.5, 1.5, 2.5, 254.5, 127.5)]  # rounds half to even
    session = ort.InferenceSession(str(GRAPHS / PIXEL_GRAPHS[dtype]), providers=["CPUExecutionProvider"])
    image, bad = session.run(None, {"pixels": pixels})
    x = pixels.astype(np.float32)
    expected = (np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    assert image.dtype == np.uint8 and image.shape == (2, 40, 24, 3) and bad.tolist() == [0.0]
    assert np.array_equal(image, expected)
    pixels[1, 2, 3, 4], pixels[0, 1, 0, 0] = np.nan, -np.inf
    assert session.run(None, {"pixels": pixels})[1].tolist() == [2.0]


@pytest.fixture(scope="module")
def bucketed(tiny_bundle):
    """Static-shape UNet sessions for 2-image 64×64 calls, one kept at a time (on CUDA each would
    capture a CUDA graph; on the CPU provider the same sessions and fixed buffers run without)."""
    return Pipeline.load(tiny_bundle, providers="cpu", io_binding=True, cuda_graphs=[(2, 64, 64)], max_cuda_graphs=1)


def test_graph_bucket_pads_the_batch_and_draws_what_the_host_draws(bucketed, tiny_pipeline):
    graphs = bucketed.device_loop.graphs
    assert graphs.pick(1, 64, 64) == 2 and graphs.pick(2, 64, 64) == 2
    assert graphs.pick(3, 64, 64) is None and graphs.pick(1, 32, 32) is None  # no bucket: no graph
    kwargs = dict(seed=[4], num_inference_steps=4, scheduler="euler-ancestral")
    host, device = tiny_pipeline("a red circle", **kwargs), bucketed("a red circle", **kwargs)
    assert len(device.images) == 1  # the padding image is dropped
    assert np.abs(np.asarray(host.images[0], np.int16) - np.asarray(device.images[0], np.int16)).max() <= 1
    assert device.transfers.in_loop == 0


def test_graph_cache_keeps_at_most_max_graphs_and_reuses_a_bucket(bucketed):
    graphs = bucketed.device_loop.graphs
    before = graphs.built
    bucketed("a cat", seed=1, num_inference_steps=2)  # guided: UNet batch 4
    bucketed("a cat", seed=2, num_inference_steps=2)
    assert graphs.built - before <= 1  # the second call replays the first's bucket
    bucketed("a cat", seed=1, num_inference_steps=2, guidance_scale=1.0)  # unguided: UNet batch 2
    assert len(graphs._buckets) == 1 and next(iter(graphs._buckets))[0] == 2  # the guided one went
    bucketed(["a cat", "a dog", "a cow"], seed=[1, 2, 3], num_inference_steps=2)  # 3 images: no bucket
    assert len(graphs._buckets) == 1


def test_cuda_graph_options_are_refused_clearly(tiny_bundle):
    from ortdiffusion.runtime import ProviderError
    from ortdiffusion.runtime.providers import CudaOptions

    assert CudaOptions(enable_cuda_graph=True).to_ort()["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in CudaOptions().to_ort()
    with pytest.raises(ProviderError, match="cuda_graphs: needs io_binding"):
        Pipeline.load(tiny_bundle, providers="cpu", io_binding=False, cuda_graphs=[(1, 64, 64)])
    with pytest.raises(ValueError, match=r"cuda_graphs: each bucket is \(images, height, width\)"):
        Pipeline.load(tiny_bundle, providers="cpu", io_binding=True, cuda_graphs=[(1, 62, 64)])
