"""Export by component spec: parity recorded at two shapes, any text encoder, a user's own module, both exporters, SD 2's shapes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
    export_component,
)
from ortdiffusion.export.onnx_export import Exporter
from ortdiffusion.export.specs import (
    ComponentSpec,
    InputSpec,
    text_encoder_component,
    unet_component,
)
from ortdiffusion.runtime.manifest import DimRange, TensorInfo, load_manifest


def test_manifest_records_parity_at_two_shapes(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    for name, comp in manifest.components.items():
        shapes = {tuple(sorted(r.shape.items())) for r in comp.parity}
        assert len(shapes) == 2, f"{name}: parity at two different shapes"
        assert all(r.rel_l2_error <= 1e-4 and r.cosine_similarity > 0.9999 for r in comp.parity)
    unet = manifest.components["unet"]
    assert [i.name for i in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ("batch", 4, "height", "width")
    assert manifest.components["text_encoder"].inputs[0].shape == ("batch", 77)  # fixed sequence length
    assert [o.name for o in manifest.components["text_encoder"].outputs] == ["last_hidden_state", "pooled_output"]
    assert manifest.pipeline.scheduler_config["beta_schedule"] == "scaled_linear"
    assert manifest.source.weights_sha256 and (tiny_bundle / "tokenizer.json").is_file()


TEXT_ENCODERS = {
    "CLIPTextModel": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, eos_token_id=2)),
    "CLIPTextModelWithProjection": lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, eos_token_id=2)),
    "T5EncoderModel": lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
    "BertModel": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16)),
    "GPT2Model": lambda: transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)),
}
POOLED = {"CLIPTextModel": 32, "CLIPTextModelWithProjection": 24, "BertModel": 32}


@pytest.mark.parametrize("family", list(TEXT_ENCODERS))
def test_text_encoder_spec_fits_any_transformers_encoder(family, tmp_path):
    torch.manual_seed(0)
    model = TEXT_ENCODERS[family]().eval()
    spec, module = text_encoder_component(model, max_length=16)
    entry = export_component(spec, module, tmp_path)
    assert [o.name for o in entry.outputs] == (["last_hidden_state", "pooled_output"] if family in POOLED else ["last_hidden_state"])
    if family in POOLED:
        assert entry.outputs[1].shape == ("batch", POOLED[family])
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4
    # the graph reproduces transformers on ids it never saw, at a batch size it was not traced at
    ids = np.random.default_rng(0).integers(0, 100, (5, 16))
    got = ort.InferenceSession(str(tmp_path / "text_encoder.onnx")).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


class ConvTransposeDecoder(torch.nn.Module):
    """A user's own image decoder: latents (b, 4, h, w) → image (b, 3, 4h, 4w)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(4, 16, 4, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1), torch.nn.Tanh(),
        )

    def forward(self, latents):
        return self.net(latents)


def test_users_own_module_exports_through_the_same_spec_machinery(tmp_path):
    spec = ComponentSpec(
        name="my_decoder",
        inputs=(InputSpec(TensorInfo("latents", "float32", ("batch", 4, "height", "width"))),),
        outputs=(TensorInfo("image", "float32", ("batch", 3, "image_height", "image_width")),),
        dims={"batch": DimRange(1, 1, 8), "height": DimRange(1, 8, 32), "width": DimRange(1, 8, 32)},
    )
    torch.manual_seed(0)
    entry = export_component(spec, ConvTransposeDecoder().eval(), tmp_path)
    assert entry.files[0].path == "my_decoder.onnx"
    assert {tuple(sorted(r.shape.items())) for r in entry.parity} == {
        (("batch", 1), ("height", 8), ("width", 8)), (("batch", 2), ("height", 9), ("width", 10))}
    out = ort.InferenceSession(str(tmp_path / "my_decoder.onnx")).run(None, {"latents": np.zeros((3, 4, 5, 7), np.float32)})[0]
    assert out.shape == (3, 3, 20, 28)


def test_dynamo_exporter_gives_the_same_unet(tiny_checkpoint, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_checkpoint / "unet")).eval()
    spec, module = unet_component(unet, text_length=77)
    entry = export_component(spec, module, tmp_path, ExportOptions(exporter=Exporter.DYNAMO))
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4


def test_sd2_style_checkpoint_v_prediction_1024_wide_per_block_heads(tmp_path):
    """SD 2.x's shape of config, scaled down but for its 1024-wide text encoder and cross-attention:
    v-prediction, linear projections, per-block head counts, "!" as the pad token."""
    from ortdiffusion.export.presets import PRESETS, Preset, build_checkpoint

    base = PRESETS["tiny"]
    sd2_like = Preset(
        name="tiny-sd2",
        text_encoder={**base.text_encoder, "hidden_size": 1024, "intermediate_size": 1024, "num_hidden_layers": 1,
                      "num_attention_heads": 16, "hidden_act": "gelu"},
        unet={**base.unet, "cross_attention_dim": 1024, "attention_head_dim": [2, 4], "use_linear_projection": True},
        vae=base.vae, scheduler={**base.scheduler, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        scheduler_class="EulerDiscreteScheduler", pad_token="!", vocab_words=base.vocab_words,
    )
    ckpt = build_checkpoint(sd2_like, tmp_path / "ckpt")
    manifest = export_checkpoint(ckpt, tmp_path / "bundle")
    assert manifest.pipeline.prediction_type == "v_prediction"
    assert manifest.pipeline.default_scheduler == "euler"
    assert manifest.components["unet"].inputs[2].shape == ("batch", "sequence", 1024)
    assert manifest.components["unet"].dims["sequence"].min == 77  # one window of tokens (to four: long prompts)
    assert Tokenizer.from_file(str(tmp_path / "bundle" / "tokenizer.json")).token_to_id("!") == manifest.pipeline.pad_token_id

    # and the image matches diffusers' own pipeline on it (v-prediction through Euler)
    from conftest import psnr
    from diffusers import StableDiffusionPipeline

    from ortdiffusion import Pipeline

    ref = StableDiffusionPipeline.from_pretrained(str(ckpt), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = ref("a red circle", latents=torch.from_numpy(latents), num_inference_steps=10).images[0]
    got = Pipeline.load(tmp_path / "bundle")("a red circle", latents=latents, num_inference_steps=10).images[0]
    assert psnr(got, expected) >= 40.0


@pytest.mark.slow
def test_sd15_sized_unet_exports_with_external_data(tmp_path):
    """An SD-1.5-sized UNet (random weights, SD 1.5's config) is past 2 GB: one external data file."""
    from diffusers import UNet2DConditionModel

    from ortdiffusion.export.presets import SD15

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD15.unet, "sample_size": 16}).eval()
    spec, module = unet_component(unet, text_length=77, batch=DimRange(1, 1, 2))
    entry = export_component(spec, module, tmp_path)
    assert [f.path for f in entry.files] == ["unet.onnx", "unet.onnx.data"]
    assert entry.files[1].size > 3_000_000_000
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
