"""A bundle that does not match its manifest is refused with a BundleError naming the file."""

from __future__ import annotations

import json

import pytest

from ortdiffusion import Pipeline
from ortdiffusion.runtime.errors import BundleError
from ortdiffusion.runtime.manifest import file_record, load_manifest, write_manifest


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "unet.onnx").unlink()
    with pytest.raises(BundleError, match=r"unet\.onnx: missing"):
        Pipeline.load(bundle_copy)


def test_corrupt_file_is_named(bundle_copy):
    path = bundle_copy / "vae_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx: corrupt: sha256"):
        Pipeline.load(bundle_copy)


def test_truncated_file_is_named(bundle_copy):
    path = bundle_copy / "text_encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"text_encoder\.onnx: corrupt: 1000 bytes"):
        Pipeline.load(bundle_copy)


def test_corrupt_onnx_with_a_matching_manifest_is_named(bundle_copy):
    """Even when the hashes were rewritten to match, onnxruntime's refusal names the file."""
    path = bundle_copy / "unet.onnx"
    path.write_bytes(b"this is not an onnx model")
    manifest = load_manifest(bundle_copy)
    unet = manifest.components["unet"]
    fixed = type(unet)(**{**unet.__dict__, "files": (file_record(bundle_copy, path),)})
    write_manifest(bundle_copy, type(manifest)(**{**manifest.__dict__, "components": {**manifest.components, "unet": fixed}}))
    with pytest.raises(BundleError, match=r"unet\.onnx: onnxruntime cannot load it"):
        Pipeline.load(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(BundleError, match=r"manifest\.json: format_version 99 is not supported; this ortdiffusion reads format 1"):
        Pipeline.load(bundle_copy)


def test_malformed_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: unreadable JSON"):
        Pipeline.load(bundle_copy)


def test_a_checkpoint_is_not_a_bundle(tiny_checkpoint):
    with pytest.raises(BundleError, match="is a diffusers checkpoint, not a bundle"):
        Pipeline.load(tiny_checkpoint)


def test_manifest_round_trips(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert json.loads(manifest.to_json()) == json.loads((tiny_bundle / "manifest.json").read_text())
