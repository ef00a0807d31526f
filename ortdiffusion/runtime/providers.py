"""Execution providers as data: an ordered preference with per-provider options.

ONNX Runtime's provider names and option strings live here and nowhere else. After a session is
created, `check_providers` compares what it really got with what was asked, and `check_placement`
where each node went: a silent fallback to a provider the caller did not list is a `ProviderError`
unless the caller allowed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from .errors import InvalidRequestError, ProviderError
from .manifest import resolve_dim


class ProviderKind(str, Enum):
    TENSORRT = "tensorrt"
    CUDA = "cuda"
    CPU = "cpu"

    @property
    def ort_name(self) -> str:
        return _ORT_NAMES[self]

    @classmethod
    def parse(cls, value: str | ProviderKind, field_name: str = "providers") -> ProviderKind:
        if isinstance(value, ProviderKind):
            return value
        text = str(value).strip()
        for kind in cls:
            if text.lower() == kind.value or text == kind.ort_name:
                return kind
        allowed = ", ".join(k.value for k in cls)
        raise InvalidRequestError(field_name, f"unknown provider {value!r}; allowed: {allowed}")


_ORT_NAMES = {
    ProviderKind.TENSORRT: "TensorrtExecutionProvider",
    ProviderKind.CUDA: "CUDAExecutionProvider",
    ProviderKind.CPU: "CPUExecutionProvider",
}
_FROM_ORT_NAME = {v: k for k, v in _ORT_NAMES.items()}

#: Every provider, fastest first (the order `available_providers` reports in).
ALL_KINDS = (ProviderKind.TENSORRT, ProviderKind.CUDA, ProviderKind.CPU)
#: The providers whose sessions read and write GPU memory.
GPU_KINDS = frozenset({ProviderKind.TENSORRT, ProviderKind.CUDA})


def runs_on_gpu(providers: Mapping[str, str]) -> bool:
    """Whether any component of a {component: provider} report (`Pipeline.providers`, a bench
    record's) runs on a GPU provider."""
    return any(ProviderKind.parse(p) in GPU_KINDS for p in providers.values())


#: Preference when the caller names none. TensorRT is left out: onnxruntime-gpu lists it even
#: where TensorRT's libraries are missing, and its first run builds engines for minutes; it runs
#: when asked for by name.
DEFAULT_ORDER = (ProviderKind.CUDA, ProviderKind.CPU)


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA provider's options that the engine sets (ONNX Runtime's documented names below)."""

    device_id: int = 0
    arena_extend_strategy: str = "kSameAsRequested"  # grow by what is asked, not powers of two
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    gpu_mem_limit: int | None = None
    #: Capture the session's kernels as one CUDA graph on its first runs and replay it after; needs
    #: static shapes and IO binding to fixed buffers (device_loop.GraphCache sets both up).
    enable_cuda_graph: bool = False

    def to_ort(self) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "arena_extend_strategy": self.arena_extend_strategy,
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
        }
        if self.gpu_mem_limit is not None:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit)
        if self.enable_cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile: each input's shape at min, opt and max, from the
    component's symbolic dims and their ranges in the manifest (the component spec's)."""

    min: tuple[tuple[str, tuple[int, ...]], ...]
    opt: tuple[tuple[str, tuple[int, ...]], ...]
    max: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def for_component(cls, component) -> ShapeProfile:
        def shapes(which: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
            out = []
            for tensor in component.inputs:
                sizes = {k: getattr(r, which) for k, r in component.dims.items()}
                dims = tuple(resolve_dim(d, sizes) for d in tensor.shape)  # "height/8": a ControlNet residual
                out.append((tensor.name, dims))
            return tuple(out)

        return cls(shapes("min"), shapes("opt"), shapes("max"))

    @staticmethod
    def _text(shapes) -> str:
        # ONNX Runtime's format: "name:1x4x64x64,other:2" (a scalar input has no dims: "name:").
        return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes)

    def to_ort(self) -> dict[str, str]:
        return {"trt_profile_min_shapes": self._text(self.min), "trt_profile_opt_shapes": self._text(self.opt),
                "trt_profile_max_shapes": self._text(self.max)}


@dataclass(frozen=True)
class TensorRTOptions:
    """The TensorRT provider's options that the engine sets (ONNX Runtime's documented names)."""

    device_id: int = 0
    fp16: bool = False
    #: Engines and timing caches go here: the component's folder named by `tensorrt_cache_key`.
    engine_cache_path: str | None = None
    profile: ShapeProfile | None = None
    builder_optimization_level: int = 3  # TensorRT's default; 5 builds slower for faster engines
    max_workspace_size: int | None = None

    def to_ort(self) -> dict[str, str]:
        options = {"device_id": str(self.device_id), "trt_fp16_enable": str(self.fp16),
                   "trt_builder_optimization_level": str(self.builder_optimization_level)}
        if self.engine_cache_path:
            options.update(
                trt_engine_cache_enable="True", trt_engine_cache_path=self.engine_cache_path,
                trt_timing_cache_enable="True", trt_timing_cache_path=self.engine_cache_path,
            )
        if self.profile is not None:
            options.update(self.profile.to_ort())
        if self.max_workspace_size is not None:
            options["trt_max_workspace_size"] = str(self.max_workspace_size)
        return options


ARENA_EXTEND_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")


@dataclass(frozen=True)
class ComponentSettings:
    """Session settings for one component (`Pipeline.load(component_settings={"unet": ...})`), over
    the preference's: the text encoder and decoder run once per request and need not keep an arena
    the size of their peak beside the UNet's.

    `cpu_memory_arena`: the CPU provider's memory arena (ONNX Runtime's `enable_cpu_mem_arena`).
    `arena_extend_strategy`, `gpu_mem_limit` (bytes): the CUDA provider's, for this component only."""

    cpu_memory_arena: bool = True
    arena_extend_strategy: str | None = None
    gpu_mem_limit: int | None = None

    @classmethod
    def parse(cls, value, field_name: str) -> ComponentSettings:
        """From a ComponentSettings or a mapping of its fields; errors name the field."""
        if isinstance(value, ComponentSettings):
            settings = value
        elif isinstance(value, Mapping):
            known = {"cpu_memory_arena", "arena_extend_strategy", "gpu_mem_limit"}
            for key in value:
                if key not in known:
                    raise InvalidRequestError(f"{field_name}.{key}", f"unknown setting; allowed: {', '.join(sorted(known))}")
            settings = cls(**value)
        else:
            raise InvalidRequestError(field_name, f"expected ComponentSettings or a mapping, got {type(value).__name__}")
        if not isinstance(settings.cpu_memory_arena, bool):
            raise InvalidRequestError(f"{field_name}.cpu_memory_arena", "must be true or false")
        if settings.arena_extend_strategy is not None and settings.arena_extend_strategy not in ARENA_EXTEND_STRATEGIES:
            raise InvalidRequestError(f"{field_name}.arena_extend_strategy",
                                      f"{settings.arena_extend_strategy!r}; allowed: {', '.join(ARENA_EXTEND_STRATEGIES)}")
        limit = settings.gpu_mem_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise InvalidRequestError(f"{field_name}.gpu_mem_limit", f"{limit!r}; must be a positive number of bytes")
        return settings

    def apply(self, preference: ProviderPreference) -> ProviderPreference:
        """The preference with this component's CUDA options laid over the caller's (or the defaults)."""
        overrides = {k: v for k, v in (("arena_extend_strategy", self.arena_extend_strategy),
                                       ("gpu_mem_limit", self.gpu_mem_limit)) if v is not None}
        if not overrides or ProviderKind.CUDA not in preference.kinds:
            return preference
        cuda = preference.options.get(ProviderKind.CUDA) or CudaOptions()
        return replace(preference, options={**preference.options, ProviderKind.CUDA: replace(cuda, **overrides)})


def tensorrt_cache_key(bundle_sha256: str, component: str, gpu: str, tensorrt_version: str, profile: ShapeProfile,
                       fp16: bool) -> str:
    """What a TensorRT engine depends on; an engine cached under one key is never used for another.
    The same bundle, component, GPU model, TensorRT version, profile and precision give the same key,
    so a later run finds its engine and does not rebuild."""
    import hashlib
    import json

    identity = {"bundle": bundle_sha256, "component": component, "gpu": gpu, "tensorrt": tensorrt_version,
                "profile": [profile.min, profile.opt, profile.max], "fp16": fp16}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{component}-{digest}"


def nvidia_smi(*args: str) -> str | None:
    """What `nvidia-smi ARGS` prints, stripped; None where there is no nvidia-smi or it fails."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def gpu_name(device_id: int = 0) -> str:
    """The GPU's model name, or "unknown"."""
    return nvidia_smi(f"--id={device_id}", "--query-gpu=name", "--format=csv,noheader") or "unknown"


def session_options(intra_op_threads: int = 0, cpu_memory_arena: bool = True,
                    fixed_dims: Mapping[str, int] | None = None, optimization: str = "all",
                    config: Mapping[str, str] | None = None, optimized_model_path: str | None = None,
                    priority_order: bool = False):
    """ONNX Runtime session options, built here for every session the engine and its export make.
    `optimization`: ONNX Runtime's graph optimization level ("disable", "basic", "extended", "all");
    `fixed_dims`: symbolic dims fixed at load (free dimension overrides); `config`: session config
    entries over the defaults (quiet logging, the per-node placement record `check_placement` reads);
    `priority_order`: run each node as soon as its inputs are ready (the fp16 range probe)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = intra_op_threads  # 0: one per physical core
    options.enable_cpu_mem_arena = cpu_memory_arena
    options.log_severity_level = 3
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    for key, value in {"session.record_ep_graph_assignment_info": "1", **(config or {})}.items():
        options.add_session_config_entry(key, value)
    for dim, value in (fixed_dims or {}).items():
        options.add_free_dimension_override_by_name(dim, int(value))
    return options


def tensorrt_version() -> str:
    """The TensorRT library's version as the provider will load it, or "unknown"."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = int(lib.getInferLibVersion())
        major, minor, patch = (v // 10000, v // 100 % 100, v % 100) if v >= 10000 else (v // 1000, v // 100 % 10, v % 100)
        return f"{major}.{minor}.{patch}"
    return "unknown"


ProviderOptions = CudaOptions | TensorRTOptions | None


@dataclass(frozen=True)
class ProviderPreference:
    """An ordered list of providers to try; a later one is a requested fallback, not a silent one."""

    kinds: tuple[ProviderKind, ...]
    options: Mapping[ProviderKind, ProviderOptions] = field(default_factory=dict)
    allow_fallback: bool = False

    @classmethod
    def parse(cls, value: str | Sequence[str | ProviderKind] | ProviderPreference | None,
              allow_fallback: bool = False) -> ProviderPreference | None:
        """From "cuda,cpu", ["cuda", "cpu"] or ORT names; None means "choose for me"."""
        if value is None or isinstance(value, ProviderPreference):
            return value
        items = value.split(",") if isinstance(value, str) else list(value)
        kinds = tuple(ProviderKind.parse(v) for v in items if str(v).strip())
        if not kinds:
            raise InvalidRequestError("providers", "empty list; allowed: tensorrt, cuda, cpu")
        return cls(kinds=tuple(dict.fromkeys(kinds)), allow_fallback=allow_fallback)

    def ort_providers(self, available: Iterable[ProviderKind]) -> list[tuple[str, dict[str, str]]]:
        """The (name, options) list `InferenceSession` takes, keeping only providers this build has."""
        have = set(available)
        usable = [k for k in self.kinds if k in have]
        if not usable:
            raise ProviderError(
                f"providers: none of {', '.join(k.value for k in self.kinds)} is available; "
                f"this onnxruntime offers {', '.join(k.value for k in have) or 'none'}"
            )
        if usable != list(self.kinds)[: len(usable)] and not self.allow_fallback:
            missing = [k.value for k in self.kinds if k not in have]
            raise ProviderError(
                f"providers: {', '.join(missing)} requested but not available in this onnxruntime "
                f"(it offers {', '.join(k.value for k in have)}); list a fallback or allow it"
            )
        out = []
        for kind in usable:
            opts = self.options.get(kind)
            out.append((kind.ort_name, opts.to_ort() if opts is not None else {}))
        return out


def available_providers() -> tuple[ProviderKind, ...]:
    """The providers this onnxruntime build offers, in the engine's preference order."""
    import onnxruntime as ort

    names = set(ort.get_available_providers())
    return tuple(k for k in ALL_KINDS if k.ort_name in names)


def default_preference(supported: Iterable[str]) -> ProviderPreference:
    """The fastest available provider the bundle supports (of DEFAULT_ORDER), then the others."""
    allowed = {ProviderKind.parse(s) for s in supported}
    kinds = tuple(k for k in DEFAULT_ORDER if k in allowed and k in available_providers())
    if not kinds:
        raise ProviderError(
            f"providers: the bundle runs on {', '.join(sorted(allowed))}, "
            f"none of which this onnxruntime offers ({', '.join(k.value for k in available_providers())})"
        )
    return ProviderPreference(kinds=kinds)


def check_providers(preference: ProviderPreference, got_ort_names: Sequence[str], what: str) -> tuple[ProviderKind, ...]:
    """What a session really runs on; a provider outside the preference is an error unless allowed.

    ONNX Runtime lists the CPU provider last in every session as the home of nodes no other
    provider takes; that is not a fallback unless it is the only one left.
    """
    got = tuple(_FROM_ORT_NAME[n] for n in got_ort_names if n in _FROM_ORT_NAME)
    primary = got[0] if got else None
    if primary not in preference.kinds and not preference.allow_fallback:
        raise ProviderError(
            f"{what}: asked for {', '.join(k.value for k in preference.kinds)} but the session runs on "
            f"{', '.join(k.value for k in got) or 'nothing'}; this is a silent fallback, refused"
        )
    return got


#: Operators that a GPU provider implements but ONNX Runtime may still run on the CPU on purpose:
#: its CUDA provider places the shape arithmetic of a graph (Shape → Gather → Concat → the shape
#: input of a Reshape, a scale computed from a head size) on the CPU, because those few int64 values
#: are read there anyway (`GetCpuPreferredNodes`). Such a node moves a handful of numbers, not
#: activations, so it is not a fallback. Everything else — Conv, MatMul, Softmax, normalizations,
#: attention, Resize, Transpose — landing on the CPU is.
SHAPE_ARITHMETIC_OPS = frozenset({
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Range",
    "ConstantOfShape", "Reshape", "Expand", "Identity", "Equal", "Greater", "Less", "Not", "And",
    "Or", "Where", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Sqrt",
    "Reciprocal", "Min", "Max", "ReduceProd",
    # The text encoder's end-of-text position (CLIP's pooled output): ArgMax over the int64 token
    # ids the host feeds. The CUDA provider has ArgMax for float types only, so ONNX Runtime runs
    # it on the host, where the ids already are (seen on an H100, onnxruntime-gpu 1.31.1).
    "ArgMax",
})


@dataclass(frozen=True)
class Placement:
    """Where ONNX Runtime put a session's nodes (its graph assignment info, recorded at load).

    `nodes`: provider → node count. `off_provider`: "OpType name" of each node on a provider the
    caller did not list, shape arithmetic aside; `shape_arithmetic`: how many such nodes were left
    aside (`SHAPE_ARITHMETIC_OPS`)."""

    nodes: Mapping[str, int]
    off_provider: tuple[str, ...] = ()
    shape_arithmetic: int = 0


def node_assignments(session) -> list[tuple[str, str, str]] | None:
    """(provider, node name, op type) for every node of an `onnxruntime.InferenceSession` created
    with `session.record_ep_graph_assignment_info` = 1, from ONNX Runtime's record of the graph
    partitioning; None where this onnxruntime keeps none (before 1.23) or the record is off."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # AttributeError before the API, onnxruntime's Fail where the record is off
        return None
    return [(sub.ep_name, node.name, node.op_type) for sub in subgraphs for node in sub.get_nodes()]


def check_placement(preference: ProviderPreference, assignments: Iterable[tuple[str, str, str]], what: str) -> Placement:
    """Per-node check after load. `assignments`: (ONNX Runtime provider name, node name, op type) of
    every node. A node on a provider outside the preference is an error unless it is shape
    arithmetic or the caller allowed a fallback; the error lists the nodes (the first 20)."""
    wanted = {k.ort_name for k in preference.kinds}
    counts: dict[str, int] = {}
    off: list[str] = []
    shape = 0
    for provider, name, op_type in assignments:
        kind = _FROM_ORT_NAME.get(provider)
        label = kind.value if kind else provider
        counts[label] = counts.get(label, 0) + 1
        if provider in wanted:
            continue
        if op_type in SHAPE_ARITHMETIC_OPS:
            shape += 1
        else:
            off.append(f"{op_type} {name}")
    placement = Placement(nodes=counts, off_provider=tuple(off), shape_arithmetic=shape)
    if off and not preference.allow_fallback:
        shown = "; ".join(off[:20]) + (f"; … {len(off) - 20} more" if len(off) > 20 else "")
        raise ProviderError(
            f"{what}: {len(off)} node(s) did not land on {', '.join(k.value for k in preference.kinds)} "
            f"({shown}); this is a silent fallback, refused (allow_fallback=True accepts it, "
            f"or list the provider they run on)"
        )
    return placement
