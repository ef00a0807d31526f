"""Pipeline behaviour: seeds, batching, guidance, threads, PNG metadata, the NaN guard, bad input."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ortdiffusion.runtime.errors import InvalidRequestError, NumericalError
from ortdiffusion.runtime.png import read_png_metadata


def pixels(result):
    return [np.asarray(im) for im in result.images]


def test_result_carries_images_timings_providers(tiny_pipeline):
    r = tiny_pipeline("a red circle", seed=1, num_inference_steps=4)
    assert len(r.images) == 1 and r.images[0].size == (64, 64) and r.images[0].mode == "RGB"
    assert r.providers == {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu", "vae_encoder": "cpu"}
    assert len(r.timings.unet_steps) == 4 and r.timings.total > 0
    assert r.timings.total >= r.timings.unet + r.timings.text_encoder + r.timings.decoder
    assert r.seeds == [1]


def test_same_seed_same_image_other_seed_other_image(tiny_pipeline):
    a, b, c = (tiny_pipeline("a red circle", seed=s, num_inference_steps=4) for s in (5, 5, 6))
    assert np.array_equal(pixels(a)[0], pixels(b)[0])
    assert not np.array_equal(pixels(a)[0], pixels(c)[0])


def test_image_depends_only_on_its_own_seed(tiny_pipeline):
    """Seed s for n images gives s, s+1, …; each equals the image generated alone with that seed."""
    batch = tiny_pipeline("a green square", seed=20, num_images_per_prompt=3, num_inference_steps=4, scheduler="euler-ancestral")
    assert batch.seeds == [20, 21, 22]
    for img, seed in zip(pixels(batch), batch.seeds):
        alone = tiny_pipeline("a green square", seed=seed, num_inference_steps=4, scheduler="euler-ancestral")
        assert np.abs(img.astype(int) - pixels(alone)[0].astype(int)).max() <= 1


def test_list_of_seeds_and_prompts(tiny_pipeline):
    r = tiny_pipeline(["a red circle", "a blue star"], seed=[7, 9], num_inference_steps=3)
    assert r.seeds == [7, 9] and len(r.images) == 2
    assert [m["prompt"] for m in r.metadata] == ["a red circle", "a blue star"]


class SessionSpy:
    """A session that calls `hook(feeds, release_memory, outputs)` on each run (which may change outputs)."""

    def __init__(self, session, hook):
        self._session, self._hook = session, hook

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, feeds, release_memory=False):
        outputs = self._session.run(feeds, release_memory=release_memory)
        self._hook(feeds, release_memory, outputs)
        return outputs


def test_guidance_at_most_one_runs_only_the_conditional_half(tiny_pipeline, monkeypatch):
    batches, lasts = [], []

    def hook(feeds, release, outputs):
        batches.append(feeds["sample"].shape[0])
        lasts.append(release)

    monkeypatch.setitem(tiny_pipeline.sessions, "unet", SessionSpy(tiny_pipeline.sessions["unet"], hook))
    tiny_pipeline("a red circle", seed=1, num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=2)
    tiny_pipeline("a red circle", seed=1, num_inference_steps=2, guidance_scale=7.0, num_images_per_prompt=2)
    assert batches == [2, 2, 4, 4]
    assert lasts == [False, True, False, True]  # the UNet's arena is released after the last step only


def test_four_threads_match_sequential_calls(tiny_pipeline):
    calls = [dict(prompt=p, seed=s, num_inference_steps=5, scheduler=sch)
             for p, s, sch in [("a red circle", 1, "ddim"), ("a blue square", 2, "euler"),
                               ("a green star", 3, "dpm++2m-karras"), ("a pink triangle", 4, "euler-ancestral")]]
    sequential = [pixels(tiny_pipeline(**c))[0] for c in calls]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda c: pixels(tiny_pipeline(**c))[0], calls * 2))
    for i, img in enumerate(threaded):
        assert np.array_equal(img, sequential[i % 4])


def test_png_carries_parameters(tiny_pipeline, tmp_path):
    r = tiny_pipeline("a lighthouse at dusk", negative_prompt="fog", seed=42, num_inference_steps=3,
                      guidance_scale=6.5, scheduler="euler", num_images_per_prompt=2)
    paths = r.save(tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    meta = read_png_metadata(paths[1])
    assert meta["prompt"] == "a lighthouse at dusk" and meta["negative_prompt"] == "fog"
    assert meta["seed"] == "43" and meta["steps"] == "3" and meta["scheduler"] == "euler"
    assert meta["guidance_scale"] == "6.5" and meta["size"] == "64x64"
    assert meta["model_hash"] == tiny_pipeline.model_hash[:16]
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_a_batch_is_encoded_in_parallel_to_the_same_pngs_in_order():
    """encode_pngs runs encode_png on threads: byte for byte what one at a time gives, in order,
    also in a child forked after the pool started (its threads are not inherited)."""
    import multiprocessing
    import threading

    from PIL import Image

    from ortdiffusion.runtime.png import encode_png, encode_pngs

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(6)]
    meta = [{"seed": str(i), "prompt": f"picture {i}"} for i in range(6)]
    one_by_one = [encode_png(im, m) for im, m in zip(images, meta)]
    seen = set()
    original = Image.Image.save

    def recording_save(self, *args, **kwargs):
        seen.add(threading.current_thread().name)
        return original(self, *args, **kwargs)

    Image.Image.save = recording_save
    try:
        assert encode_pngs(images, meta) == one_by_one
    finally:
        Image.Image.save = original
    assert all(name.startswith("ortdiffusion-png") for name in seen), seen
    with pytest.raises(ValueError, match="6 images but 5 metadata"):
        encode_pngs(images, meta[:5])

    def child(queue):
        queue.put(encode_pngs(images[:3], meta[:3]) == one_by_one[:3])

    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    proc = fork.Process(target=child, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=60) is True
    finally:
        proc.kill()  # a child whose pool would hang must not outlive the test
        proc.join()


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline, caplog):
    with caplog.at_level(logging.WARNING, logger="ortdiffusion.runtime.tokenizer"):
        tiny_pipeline("red " * 100, seed=1, num_inference_steps=1)
    assert "the last 25 tokens were dropped" in caplog.text  # 100 words + BOS/EOS into 77


def test_non_finite_latents_raise_numerical_error(tiny_pipeline, monkeypatch):
    def hook(feeds, release, outputs):
        outputs["out_sample"][0, 0, 0, 0] = np.nan

    monkeypatch.setitem(tiny_pipeline.sessions, "unet", SessionSpy(tiny_pipeline.sessions["unet"], hook))
    with pytest.raises(NumericalError, match="non-finite"):
        tiny_pipeline("a red circle", seed=1, num_inference_steps=2)


BAD_INPUTS = [
    (dict(prompt=[]), "prompt", "empty list"),
    (dict(prompt=3), "prompt", "string or a list"),
    (dict(prompt=["ok", None]), r"prompt\[1\]", "must be a string"),
    (dict(width=60), "width", "multiple of 8"),
    (dict(height=4096), "height", "from 8 to 256"),
    (dict(num_inference_steps=0), "num_inference_steps", "from 1 to 150"),
    (dict(num_inference_steps=10**6), "num_inference_steps", "from 1 to 150"),
    (dict(prompt=""), "prompt", "is empty"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "finite"),
    (dict(guidance_scale=float("inf")), "guidance_scale", "finite"),
    (dict(scheduler="plms"), "scheduler", "allowed: ddim"),
    (dict(seed=-1), "seed", "from 0"),
    (dict(seed=[1, 2]), "seed", "one per image"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt", "from 1"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt", "one per prompt"),
    (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "latents", "shape"),
]


@pytest.mark.parametrize("kwargs,field,allowed", BAD_INPUTS, ids=[b[1] + ":" + b[2] for b in BAD_INPUTS])
def test_bad_input_names_field_and_what_is_allowed(tiny_pipeline, kwargs, field, allowed):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(InvalidRequestError, match=rf"^{field}: .*{allowed}") as info:
        tiny_pipeline(**kwargs)
    assert info.value.field.startswith(field.replace("\\", ""))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_images_are_written_in_each_output_format_with_their_parameters(tmp_path, fmt):
    from PIL import Image

    from ortdiffusion.runtime.png import ImageFormat, encode_image, read_png_metadata

    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    meta = {"prompt": "un cercle rouge — ✓", "seed": "3"}
    for compression in (None, 0, 100):
        data = encode_image(image, meta, ImageFormat.parse(fmt), compression)
        path = tmp_path / f"x{ImageFormat(fmt).suffix}"
        path.write_bytes(data)
        with Image.open(path) as back:
            assert back.format == fmt.upper()
        assert read_png_metadata(path) == meta


def test_output_format_and_compression_are_checked():
    from ortdiffusion.runtime.png import ImageFormat, check_compression

    assert ImageFormat.from_suffix("a/b.JPG") is ImageFormat.JPEG and ImageFormat.from_suffix("b") is ImageFormat.PNG
    with pytest.raises(InvalidRequestError, match=r"^output: 'x.gif': the suffix .gif"):
        ImageFormat.from_suffix("x.gif")
    with pytest.raises(InvalidRequestError, match="^output_format: unknown image format 'bmp'"):
        ImageFormat.parse("bmp")
    for bad in (-1, 101, 5.5, True):
        with pytest.raises(InvalidRequestError, match="^output_compression: must be an integer from 0 to 100"):
            check_compression(bad)
