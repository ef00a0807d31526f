"""Cold start: the optimized-graph cache (runtime/optimized_graphs.py) and the sessions created on
first use (the image encoder). Neither may change an image, a provider report or a placement check."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ortdiffusion import Pipeline
from ortdiffusion.runtime.manifest import UNET, VAE_ENCODER, load_manifest
from ortdiffusion.runtime.optimized_graphs import RECORD_NAME, cache_key, cacheable, entry_for

PROMPT = "a red circle on the left"
CPU = [("CPUExecutionProvider", {})]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTDIFFUSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "graphs"


def pixels(pipe: Pipeline, **kwargs) -> np.ndarray:
    return np.asarray(pipe(PROMPT, num_inference_steps=3, seed=5, **kwargs).images[0])


def test_the_key_misses_for_another_bundle_onnxruntime_provider_or_fixed_dims(tiny_bundle):
    unet = load_manifest(tiny_bundle).components[UNET]
    key = cache_key(unet, "1.32.0", CPU, {}, "all")
    assert key == cache_key(unet, "1.32.0", CPU, {}, "all") and key.startswith("unet-")
    changed = replace(unet, files=(replace(unet.files[0], sha256="0" * 64), *unet.files[1:]))
    others = [cache_key(changed, "1.32.0", CPU, {}, "all"), cache_key(unet, "1.33.0", CPU, {}, "all"),
              cache_key(unet, "1.32.0", [("CPUExecutionProvider", {"x": "1"})], {}, "all"),
              cache_key(unet, "1.32.0", CPU, {"batch": 2}, "all"), cache_key(unet, "1.32.0", CPU, {}, "basic")]
    assert len({key, *others}) == 6
    # only CPU-provider sessions of single-file graphs are cached
    assert cacheable(unet, CPU) and not cacheable(unet, [("CUDAExecutionProvider", {}), *CPU])
    assert not cacheable(replace(unet, files=(*unet.files, unet.files[0])), CPU)


def test_cached_graphs_give_the_same_pixels_and_load_unoptimized(tiny_bundle, cache):
    reference = pixels(Pipeline.load(tiny_bundle, providers="cpu", graph_cache=False))
    assert not cache.exists()
    first = Pipeline.load(tiny_bundle, providers="cpu")
    assert {n: s.graph_cache for n, s in first.sessions.loaded().items()} == dict.fromkeys(first.sessions.loaded(), "saved")
    assert np.array_equal(pixels(first), reference)
    second = Pipeline.load(tiny_bundle, providers="cpu")
    assert all(s.graph_cache == "loaded" for s in second.sessions.loaded().values())
    unet = second.sessions[UNET]._session
    assert unet.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert np.array_equal(pixels(second), reference)
    assert second.providers == {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu", "vae_encoder": "cpu"}
    assert all(set(counts) == {"cpu"} for counts in second.placement.values())  # still checked, per node
    assert not list(cache.rglob("*.partial"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no record"])
def test_a_damaged_entry_is_ignored_and_rebuilt(tiny_bundle, cache, damage):
    reference = pixels(Pipeline.load(tiny_bundle, providers="cpu"))
    manifest = load_manifest(tiny_bundle)
    import onnxruntime as ort

    entry = entry_for(cache, manifest.components[UNET], ort.__version__, CPU, {})
    size = entry.model.stat().st_size
    if damage == "garbage":  # the recorded size, not a graph
        entry.model.write_bytes(b"\x00not a graph" * (size // 12) + b"\x00" * (size % 12))
    elif damage == "truncated":
        entry.model.write_bytes(entry.model.read_bytes()[: size // 2])
    else:
        (entry.folder / RECORD_NAME).unlink()
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    assert pipe.sessions[UNET].graph_cache == "saved" and entry.ready()
    assert np.array_equal(pixels(pipe), reference)
    assert Pipeline.load(tiny_bundle, providers="cpu").sessions[UNET].graph_cache == "loaded"


def test_an_unwritable_cache_only_costs_the_optimization(tiny_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ORTDIFFUSION_CACHE", str(blocker))
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    assert all(s.graph_cache is None for s in pipe.sessions.loaded().values())
    assert pixels(pipe).shape == (64, 64, 3)


def test_the_image_encoder_is_created_on_first_use(tiny_bundle, cache):
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    assert VAE_ENCODER not in pipe.sessions.loaded() and VAE_ENCODER in pipe.sessions
    expected = {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu", "vae_encoder": "cpu"}
    assert pipe.providers == expected
    text = pipe(PROMPT, num_inference_steps=2, seed=1)
    assert text.providers == expected and VAE_ENCODER not in pipe.sessions.loaded()
    # an image input after a text-only call: the encoder's session is made then, and checked as any other
    image = pipe(PROMPT, image=Image.fromarray(np.asarray(text.images[0])), strength=0.5, num_inference_steps=2, seed=1)
    assert VAE_ENCODER in pipe.sessions.loaded() and image.providers == expected
    assert pipe.sessions[VAE_ENCODER].placement is not None
    eager = Pipeline.load(tiny_bundle, providers="cpu", graph_cache=False)
    again = eager(PROMPT, image=Image.fromarray(np.asarray(text.images[0])), strength=0.5, num_inference_steps=2, seed=1)
    assert np.array_equal(np.asarray(image.images[0]), np.asarray(again.images[0]))


def test_placement_creates_what_it_reports(tiny_bundle, cache):
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    assert set(pipe.placement) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert VAE_ENCODER in pipe.sessions.loaded()


def test_load_all_creates_the_lazy_sessions(tiny_bundle, cache):
    """What the service calls before it says it is ready: an edit request pays for no session."""
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    pipe.sessions.load_all()
    assert set(pipe.sessions.loaded()) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_sessions_made_at_load_are_made_side_by_side_and_fail_in_order():
    """`parallel`: each eager session in a thread of its own, all overlapping (what the CPU load does,
    the UNet's session no longer waiting for the others); a failure is raised, the first in
    component order, after every creation has ended; lazy ones still wait for first use."""
    import threading
    import time

    from ortdiffusion.runtime.session import Sessions

    started, threads = {}, {}
    barrier = threading.Barrier(3, timeout=10)  # passes only if the three creations run at once

    def make(name):
        started[name], threads[name] = time.perf_counter(), threading.current_thread().name
        barrier.wait()
        return f"session of {name}"

    sessions = Sessions(["text_encoder", "unet", "vae_decoder", "vae_encoder"], make, lazy={"vae_encoder"}, parallel=True)
    assert sessions.loaded() == {n: f"session of {n}" for n in ("text_encoder", "unet", "vae_decoder")}
    assert len(set(threads.values())) == 3 and threading.current_thread().name not in threads.values()

    ended = []

    def failing(name):
        time.sleep(0.2 if name == "vae_decoder" else 0.0)
        ended.append(name)
        if name in ("unet", "vae_decoder"):
            raise RuntimeError(f"{name} failed")
        return name

    with pytest.raises(RuntimeError, match="unet failed"):
        Sessions(["text_encoder", "unet", "vae_decoder"], failing, parallel=True)
    assert sorted(ended) == ["text_encoder", "unet", "vae_decoder"]  # none left running behind the error
    serial = []
    Sessions(["text_encoder", "unet"], lambda n: serial.append(threading.current_thread().name) or n)
    assert serial == [threading.current_thread().name] * 2  # the default: one at a time, here


def test_pipeline_makes_cpu_sessions_side_by_side(tiny_bundle, cache, monkeypatch):
    from ortdiffusion.runtime import session

    seen = {}
    real = session.Sessions.__init__

    def spy(self, names, make, lazy=(), parallel=False):
        seen["parallel"] = parallel
        real(self, names, make, lazy, parallel)

    monkeypatch.setattr(session.Sessions, "__init__", spy)
    pipe = Pipeline.load(tiny_bundle, providers="cpu")
    assert seen["parallel"] is True
    assert np.array_equal(pixels(pipe), pixels(Pipeline.load(tiny_bundle, providers="cpu", graph_cache=False)))
