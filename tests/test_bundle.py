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


def test_a_file_verified_before_is_not_hashed_again_until_it_changes(bundle_copy, monkeypatch, tmp_path):
    """Loads remember what they hashed (by inode, size, mtime and ctime): the second load hashes
    nothing; a byte changed in place, even with the old mtime put back, is hashed and refused."""
    import os

    from ortdiffusion.runtime import manifest as manifest_module

    monkeypatch.setenv("ORTDIFFUSION_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    manifest = load_manifest(bundle_copy)
    manifest_module.verify_files(bundle_copy, manifest)
    assert "unet.onnx" in hashed
    hashed.clear()
    manifest_module.verify_files(bundle_copy, manifest)
    assert hashed == []
    manifest_module.verify_files(bundle_copy, manifest, remember=False)
    assert "unet.onnx" in hashed
    path = bundle_copy / "vae_decoder.onnx"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # same inode, same size
        f.write(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    hashed.clear()
    with pytest.raises(BundleError, match=r"vae_decoder\.onnx: corrupt: sha256"):
        manifest_module.verify_files(bundle_copy, manifest)
    assert hashed == ["vae_decoder.onnx"] or "vae_decoder.onnx" in hashed


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
