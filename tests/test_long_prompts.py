"""Long prompts (opt-in `long_prompts=True`): 75-token windows, each wrapped in BOS … EOS, encoded
one by one and concatenated, as the well-known web UIs do. The first window is the plain path's,
to the token and to the hidden state; the image matches diffusers fed the same concatenated
embeddings (fp32, PSNR ≥ 40 dB); without the option the tail is dropped as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr

from ortdiffusion import Pipeline
from ortdiffusion.models import builtin_bundle
from ortdiffusion.runtime import InvalidRequestError

HEAD = "a red circle on the left above a small blue square"
BASE = " ".join([HEAD] + ["and a large green star at the bottom right"] * 8)  # 84 tokens with BOS/EOS
LONG = BASE + " and a small yellow triangle at the top left"  # the two differ past the first window only
OTHER_TAIL = BASE + " and a large purple square in the center"


def test_the_first_window_is_the_plain_path(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    ids, chunks = tok.chunked([LONG, HEAD], max_chunks=4)
    assert chunks == 2 and ids.shape == (4, 77)
    np.testing.assert_array_equal(ids[0], tok([LONG], warn_truncation=False)[0])  # LONG's first window
    np.testing.assert_array_equal(ids[2], tok([HEAD])[0])  # a prompt that fits: exactly its plain ids
    np.testing.assert_array_equal(ids[3], tok([""])[0])  # ... padded with an empty window
    session = tiny_pipeline.sessions["text_encoder"]
    windows = session.run({"input_ids": ids})["last_hidden_state"]
    plain = session.run({"input_ids": tok([LONG], warn_truncation=False)})["last_hidden_state"]
    np.testing.assert_allclose(windows[0], plain[0], rtol=0, atol=1e-6)


def test_a_prompt_that_fits_draws_the_same_image_either_way(tiny_pipeline):
    a = tiny_pipeline(HEAD, seed=3, num_inference_steps=4)
    b = tiny_pipeline(HEAD, seed=3, num_inference_steps=4, long_prompts=True)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_the_tail_counts_only_with_long_prompts(tiny_pipeline):
    kwargs = dict(seed=3, num_inference_steps=4)
    truncated = [np.asarray(tiny_pipeline(p, **kwargs).images[0]) for p in (LONG, OTHER_TAIL)]
    assert np.array_equal(*truncated), "past 77 tokens the plain path drops the tail"
    long = [np.asarray(tiny_pipeline(p, long_prompts=True, **kwargs).images[0]) for p in (LONG, OTHER_TAIL)]
    assert not np.array_equal(*long)


def _reference_embeddings(checkpoint, ids: np.ndarray, chunks: int) -> torch.Tensor:
    """transformers' CLIPTextModel on each window, the windows concatenated along the sequence."""
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(checkpoint / "text_encoder")).eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids)).last_hidden_state
    return hidden.reshape(len(ids) // chunks, chunks * hidden.shape[1], hidden.shape[2])


@pytest.mark.parametrize("io_binding", [False, True])
def test_long_prompt_matches_diffusers_fed_the_same_windows(tiny_bundle, tiny_checkpoint, reference_pipeline,
                                                            io_binding):
    from diffusers import DDIMScheduler

    pipe = Pipeline.load(tiny_bundle, providers="cpu", io_binding=io_binding)
    negative = "blurry"
    ids, chunks = pipe.tokenizer.chunked([negative, LONG], max_chunks=4)
    embeddings = _reference_embeddings(tiny_checkpoint, ids, chunks)
    latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16)).astype(np.float32)
    reference_pipeline.scheduler = DDIMScheduler.from_config(reference_pipeline.scheduler.config)
    ref = reference_pipeline(prompt_embeds=embeddings[1:], negative_prompt_embeds=embeddings[:1],
                             latents=torch.from_numpy(latents), num_inference_steps=6, guidance_scale=7.5).images[0]
    out = pipe(LONG, negative_prompt=negative, latents=latents, num_inference_steps=6, guidance_scale=7.5,
               scheduler="ddim", long_prompts=True)
    assert np.asarray(out.images[0]).std() > 5
    assert psnr(out.images[0], ref) >= 40.0, f"PSNR {psnr(out.images[0], ref):.1f} dB"
    assert out.metadata[0]["long_prompts"] == "true"


def test_limits_are_named(tiny_pipeline, tmp_path):
    import json
    import shutil

    with pytest.raises(InvalidRequestError, match=r"prompt: is \d+ tokens long; long prompts take at most 4 × 75"):
        tiny_pipeline(" ".join([HEAD] * 40), long_prompts=True)
    # A bundle exported before long prompts: its UNet's text input has a fixed length of one window.
    old = tmp_path / "bundle"
    shutil.copytree(builtin_bundle(), old)
    manifest = json.loads((old / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    text = next(i for i in unet["inputs"] if i["name"] == "encoder_hidden_states")
    text["shape"][1] = manifest["pipeline"]["tokenizer_max_length"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequestError, match=r"long_prompts: this bundle's UNet takes one window of \d+ tokens"):
        Pipeline.load(old, providers="cpu")("a red circle", long_prompts=True)
