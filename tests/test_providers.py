"""Provider policy: an ordered preference; what the session really got is reported and checked."""

from __future__ import annotations

import pytest

from ortdiffusion import Pipeline
from ortdiffusion.runtime.errors import InvalidRequestError, ProviderError
from ortdiffusion.runtime.manifest import load_manifest
from ortdiffusion.runtime.providers import (
    ComponentSettings,
    CudaOptions,
    ProviderKind,
    ProviderPreference,
    TensorRTOptions,
    available_providers,
    check_placement,
    check_providers,
)
from ortdiffusion.runtime.session import Session

CPU_ONLY = (ProviderKind.CPU,)


def test_preference_parses_names_and_ort_names():
    pref = ProviderPreference.parse("cuda, CPUExecutionProvider")
    assert pref.kinds == (ProviderKind.CUDA, ProviderKind.CPU)
    with pytest.raises(InvalidRequestError, match="providers: unknown provider 'rocm'; allowed: tensorrt, cuda, cpu"):
        ProviderPreference.parse("rocm")


def test_requested_provider_that_is_missing_is_an_error_not_a_fallback():
    # cuda is first but missing while tensorrt (listed after it) is there: not the caller's order
    pref = ProviderPreference(kinds=(ProviderKind.CUDA, ProviderKind.TENSORRT))
    with pytest.raises(ProviderError, match="cuda requested but not available"):
        pref.ort_providers((ProviderKind.TENSORRT, ProviderKind.CPU))


def test_nothing_available_names_what_is():
    with pytest.raises(ProviderError, match="none of cuda is available; this onnxruntime offers cpu"):
        ProviderPreference.parse("cuda").ort_providers(CPU_ONLY)


def test_listed_fallback_and_allowed_fallback():
    assert ProviderPreference.parse("cpu").ort_providers(CPU_ONLY) == [("CPUExecutionProvider", {})]
    allowed = ProviderPreference(kinds=(ProviderKind.CUDA, ProviderKind.CPU), allow_fallback=True)
    assert [n for n, _ in allowed.ort_providers(CPU_ONLY)] == ["CPUExecutionProvider"]


def test_session_that_lands_elsewhere_is_refused():
    pref = ProviderPreference(kinds=(ProviderKind.CUDA,))
    with pytest.raises(ProviderError, match="silent fallback"):
        check_providers(pref, ["CPUExecutionProvider"], "unet")
    assert check_providers(pref, ["CUDAExecutionProvider", "CPUExecutionProvider"], "unet")[0] is ProviderKind.CUDA
    allowed = ProviderPreference(kinds=(ProviderKind.CUDA,), allow_fallback=True)
    assert check_providers(allowed, ["CPUExecutionProvider"], "unet") == (ProviderKind.CPU,)


def test_nodes_off_the_gpu_provider_are_refused_except_shape_arithmetic():
    cuda = ProviderPreference(kinds=(ProviderKind.CUDA,))
    nodes = [("CUDAExecutionProvider", "/conv_in/Conv", "Conv"), ("CUDAExecutionProvider", "/mid/MatMul", "MatMul"),
             ("CPUExecutionProvider", "/attn/Shape", "Shape"), ("CPUExecutionProvider", "/attn/Gather", "Gather"),
             ("CPUExecutionProvider", "/attn/Sqrt", "Sqrt"),
             # CLIP's end-of-text position over the host's token ids: no int64 ArgMax on CUDA (H100 run)
             ("CPUExecutionProvider", "/model/ArgMax", "ArgMax")]
    ok = check_placement(cuda, nodes, "unet")
    assert ok.nodes == {"cuda": 2, "cpu": 4} and ok.shape_arithmetic == 4 and ok.off_provider == ()
    fell_back = nodes + [("CPUExecutionProvider", "/up/Resize", "Resize")]
    with pytest.raises(ProviderError, match=r"unet: 1 node\(s\) did not land on cuda \(Resize /up/Resize\); "
                                            r"this is a silent fallback, refused \(allow_fallback=True"):
        check_placement(cuda, fell_back, "unet")
    allowed = check_placement(ProviderPreference(kinds=(ProviderKind.CUDA,), allow_fallback=True), fell_back, "unet")
    assert allowed.off_provider == ("Resize /up/Resize",)
    listed = check_placement(ProviderPreference.parse("cuda,cpu"), fell_back, "unet")  # the CPU asked for
    assert listed.off_provider == () and listed.nodes == {"cuda": 2, "cpu": 5}


def test_placement_is_read_from_the_real_session(tiny_bundle):
    """The check reads ONNX Runtime's own record of where each node went: on the CPU provider every
    node is there; the same record held against a CUDA-only preference names the compute nodes.
    (Without the optimized-graph cache: a cached graph is already optimized, so its record counts
    the nodes of that graph, not of the bundle's as ONNX Runtime partitions it before optimizing.)"""
    pipe = Pipeline.load(tiny_bundle, providers="cpu", graph_cache=False)
    assert set(pipe.placement) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(set(counts) == {"cpu"} and counts["cpu"] > 10 for counts in pipe.placement.values())
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    real = ort.InferenceSession(str(tiny_bundle / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    assignments = [(s.ep_name, n.name, n.op_type) for s in real.get_provider_graph_assignment_info() for n in s.get_nodes()]
    assert sum(pipe.placement["unet"].values()) == len(assignments)
    with pytest.raises(ProviderError, match=r"unet: \d+ node\(s\) did not land on cuda \(.*Conv /"):
        check_placement(ProviderPreference(kinds=(ProviderKind.CUDA,)), assignments, "unet")

def test_component_settings_lay_their_cuda_options_over_the_callers():
    caller = ProviderPreference(kinds=(ProviderKind.CUDA,), options={ProviderKind.CUDA: CudaOptions(device_id=1)})
    unet = ComponentSettings.parse({"arena_extend_strategy": "kNextPowerOfTwo", "gpu_mem_limit": 2**33}, "x")
    options = unet.apply(caller).options[ProviderKind.CUDA].to_ort()
    assert options["device_id"] == "1" and options["arena_extend_strategy"] == "kNextPowerOfTwo"
    assert options["gpu_mem_limit"] == str(2**33)
    assert ComponentSettings().apply(caller) is caller
    assert unet.apply(ProviderPreference.parse("cpu")).options == {}  # nothing to lay over on the CPU


@pytest.mark.parametrize("value, field, message", [
    ({"arena": False}, "component_settings.unet.arena", "unknown setting; allowed: arena_extend_strategy, "
                                                          "cpu_memory_arena, gpu_mem_limit"),
    ({"arena_extend_strategy": "grow"}, "component_settings.unet.arena_extend_strategy",
     "'grow'; allowed: kNextPowerOfTwo, kSameAsRequested"),
    ({"gpu_mem_limit": -1}, "component_settings.unet.gpu_mem_limit", "-1; must be a positive number of bytes"),
    ({"cpu_memory_arena": "no"}, "component_settings.unet.cpu_memory_arena", "must be true or false"),
])
def test_bad_component_settings_name_the_field(tiny_bundle, value, field, message):
    with pytest.raises(InvalidRequestError) as e:
        Pipeline.load(tiny_bundle, providers="cpu", component_settings={"unet": value})
    assert e.value.field == field and str(e.value) == f"{field}: {message}"
    with pytest.raises(InvalidRequestError, match="component_settings: unknown component 'vae'; allowed: "
                                                  "text_encoder, unet, vae_decoder, vae_encoder"):
        Pipeline.load(tiny_bundle, providers="cpu", component_settings={"vae": {}})


def test_component_settings_reach_their_session_only(tiny_bundle):
    pipe = Pipeline.load(tiny_bundle, providers="cpu", component_settings={"text_encoder": {"cpu_memory_arena": False}})
    arena = {name: s._session.get_session_options().enable_cpu_mem_arena for name, s in pipe.sessions.items()}
    assert arena == {"text_encoder": False, "unet": True, "vae_decoder": True, "vae_encoder": True}
    assert pipe("a red circle", num_inference_steps=1, seed=0).images[0].size == (64, 64)


def test_option_strings_are_onnxruntimes():
    assert CudaOptions(device_id=1, gpu_mem_limit=2**30).to_ort() == {
        "device_id": "1", "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE",
        "gpu_mem_limit": str(2**30)}
    trt = TensorRTOptions(fp16=True, engine_cache_path="/c").to_ort()
    assert trt["trt_fp16_enable"] == "True" and trt["trt_engine_cache_path"] == "/c"


def test_pipeline_reports_providers_that_ran(tiny_bundle):
    assert ProviderKind.CPU in available_providers()
    pipe = Pipeline.load(tiny_bundle, providers=["cpu"])
    assert pipe.providers == {"text_encoder": "cpu", "unet": "cpu", "vae_decoder": "cpu", "vae_encoder": "cpu"}
    assert pipe("a red circle", num_inference_steps=1, seed=0).providers == pipe.providers


@pytest.mark.skipif(ProviderKind.CUDA in available_providers(), reason="this machine has CUDA")
def test_asking_for_cuda_on_a_cpu_machine_fails_loudly(tiny_bundle):
    with pytest.raises(ProviderError, match="cuda"):
        Pipeline.load(tiny_bundle, providers="cuda")


def test_component_exported_for_another_target_is_refused(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    unet = manifest.components["unet"]
    cuda_only = type(unet)(**{**unet.__dict__, "providers": ("cuda",)})
    with pytest.raises(ProviderError, match="unet: exported for cuda; it cannot run on cpu"):
        Session(tiny_bundle, cuda_only, ProviderPreference(kinds=CPU_ONLY))


# -- TensorRT: profiles, options, cache keys (the CPU-side logic; the engines need a GPU) --------


def test_tensorrt_profile_comes_from_the_manifest_dims(tiny_bundle):
    from ortdiffusion.runtime.providers import ShapeProfile

    unet = load_manifest(tiny_bundle).components["unet"]
    profile = ShapeProfile.for_component(unet)
    b, h, w, t = unet.dims["batch"], unet.dims["height"], unet.dims["width"], unet.dims["sequence"]
    assert (t.min, t.max) == (77, 4 * 77)  # one window of text tokens to four (long prompts)
    options = profile.to_ort()
    assert options["trt_profile_min_shapes"] == (
        f"sample:{b.min}x4x{h.min}x{w.min},timestep:{b.min},encoder_hidden_states:{b.min}x{t.min}x{unet.inputs[2].shape[2]}")
    assert options["trt_profile_max_shapes"] == (
        f"sample:{b.max}x4x{h.max}x{w.max},timestep:{b.max},encoder_hidden_states:{b.max}x{t.max}x{unet.inputs[2].shape[2]}")
    assert options["trt_profile_opt_shapes"].startswith(f"sample:{b.opt}x4x{h.opt}x{w.opt},")


def test_tensorrt_options_are_onnxruntimes_names(tiny_bundle):
    from ortdiffusion.runtime.providers import ShapeProfile

    profile = ShapeProfile.for_component(load_manifest(tiny_bundle).components["vae_decoder"])
    options = TensorRTOptions(fp16=True, engine_cache_path="/cache/x", profile=profile, max_workspace_size=2**32).to_ort()
    assert options == {
        "device_id": "0", "trt_fp16_enable": "True", "trt_builder_optimization_level": "3",
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/cache/x",
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": "/cache/x",
        **profile.to_ort(), "trt_max_workspace_size": str(2**32)}


def test_tensorrt_cache_key_is_stable_and_changes_with_what_the_engine_depends_on(tiny_bundle):
    from ortdiffusion.runtime.providers import ShapeProfile, tensorrt_cache_key

    manifest = load_manifest(tiny_bundle)
    unet = ShapeProfile.for_component(manifest.components["unet"])
    args = dict(bundle_sha256=manifest.bundle_sha256, component="unet", gpu="NVIDIA H100 80GB HBM3",
                tensorrt_version="10.9.0", profile=unet, fp16=True)
    key = tensorrt_cache_key(**args)
    assert key == tensorrt_cache_key(**args) and key.startswith("unet-")
    changed = [tensorrt_cache_key(**{**args, name: value}) for name, value in [
        ("bundle_sha256", "0" * 64), ("gpu", "NVIDIA H200"), ("tensorrt_version", "10.10.0"), ("fp16", False),
        ("profile", ShapeProfile.for_component(manifest.components["vae_decoder"]))]]
    assert len({key, *changed}) == 6


@pytest.mark.skipif(ProviderKind.TENSORRT in available_providers(), reason="this machine has TensorRT")
def test_asking_for_tensorrt_without_it_fails_loudly(tiny_bundle):
    with pytest.raises(ProviderError, match="tensorrt"):
        Pipeline.load(tiny_bundle, providers="tensorrt")


def test_an_unknown_export_variant_is_refused_with_the_allowed_ones():
    from ortdiffusion.models import resolve_bundle
    from ortdiffusion.runtime.errors import BundleError

    with pytest.raises(BundleError, match=r"no export variant cuda/int8; allowed: generic/fp32, cpu/fp32, cpu/int8"):
        resolve_bundle("tiny", target="cuda", precision="int8")
