"""LoRA files as users have them → low-rank deltas keyed by the bundle's layer names; and the
per-request feeds that put them into the sessions.

Two file layouts are read, with numpy only (`safetensors.numpy`, no torch):

- diffusers / PEFT (`save_lora_weights`, PEFT's `adapter_model.safetensors`): keys
  `unet.<module>.lora_A.weight` / `.lora_B.weight` (older: `.lora.down.weight` / `.lora.up.weight`),
  `text_encoder.text_model.<module>...`; alpha from the `lora_adapter_metadata` JSON diffusers
  writes (`unet.lora_alpha`, `unet.alpha_pattern`), or a `<module>.alpha` key, else alpha = rank.
- kohya (the popular web UIs): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, `lora_te_...` (`lora_te1_` / `lora_te2_` for SDXL's two encoders).

A layer's delta is W += scale · alpha / rank · up @ down (the convention of both). A bundle exported
with LoRA inputs (`ortdiffusion export --lora-inputs`) has, for every adaptable MatMul or 1×1 Conv,
two graph inputs `<layer>.lora_down` (in, rank) and `<layer>.lora_up` (rank, out) on a side branch
`(x @ down) @ up` added to the layer's output. Several LoRAs are blended by concatenating along the
rank axis, each one's scale and alpha/rank folded into its `up`; no LoRA is rank 0 (empty arrays),
so the branch adds zeros. Switching is new arrays in the next run's feeds: no session is rebuilt.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError
from .manifest import TEXT_ENCODER, TEXT_ENCODER_2, UNET, ComponentManifest, Manifest

logger = logging.getLogger(__name__)

#: Suffixes of a bundle's LoRA inputs: `<layer>.lora_down`, `<layer>.lora_up`.
DOWN, UP = ".lora_down", ".lora_up"
#: The symbolic dimension of the rank axis in those inputs.
RANK_DIM = "lora_rank"
#: LoRA sets (name, scale pairs) whose blended arrays are kept ready: a service switching among a
#: few sets pays the blend once per set.
CACHED_SETS = 8

#: The components LoRA files address, by the prefixes of both layouts.
_PEFT_PREFIXES = {"unet.": UNET, "text_encoder.": TEXT_ENCODER, "text_encoder_2.": TEXT_ENCODER_2}
_KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT_ENCODER, "lora_te1_": TEXT_ENCODER,
                   "lora_te2_": TEXT_ENCODER_2}
#: (down, up) key suffixes of the layouts.
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          ("_lora.down.weight", "_lora.up.weight"), (".lora_down.weight", ".lora_up.weight"))


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted layer as the file has it: torch's layout, down (rank, in[, 1, 1]) and up
    (out, rank[, 1, 1]); its delta is alpha / rank · up @ down."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """alpha / rank · up @ down as (out, in) (a 1×1 conv's kernel dims dropped)."""
        down = self.down.reshape(self.down.shape[0], -1).astype(np.float32)
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32)
        return (np.float32(self.alpha / self.rank) * (up @ down)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: component → canonical layer name → its layer."""

    path: Path
    layers: dict[str, dict[str, LoraLayer]]

    def count(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def nbytes(self) -> int:
        return sum(l.down.nbytes + l.up.nbytes for c in self.layers.values() for l in c.values())


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its scale, as the command line names it: `FILE` or `FILE:SCALE`."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """The last colon splits (a Windows drive letter survives); no number after it: scale 1."""
        path, sep, scale = text.rpartition(":")
        if sep and path:
            try:
                return cls(Path(path), float(scale))
            except ValueError:
                pass
        return cls(Path(text), 1.0)


def canonical_layer(component: str, module_path: str) -> str:
    """The one name of a layer in files and graphs: the module path inside the diffusers UNet or, for
    a text encoder, inside its `text_model` (`encoder.layers.0.self_attn.q_proj`)."""
    if component != UNET:
        for prefix in ("text_model.", "model."):
            if module_path.startswith(prefix):
                return module_path[len(prefix):]
    return module_path


def read_lora(path: Path | str) -> LoraFile:
    """Read a diffusers/PEFT or kohya LoRA safetensors file (see the module's docstring)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("lora", f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise InvalidRequestError("lora", f"{path}: not a readable safetensors file ({e})") from None
    kohya = any(k.startswith("lora_") and not k.startswith("lora_A") for k in tensors)
    layers = _kohya_layers(tensors) if kohya else _peft_layers(tensors, metadata)
    if not any(layers.values()):
        raise InvalidRequestError("lora", f"{path}: no LoRA layers found (expected diffusers/PEFT keys such as "
                                  "'unet.<module>.lora_A.weight' or kohya keys such as 'lora_unet_<module>.lora_down.weight')")
    result = LoraFile(path, {c: v for c, v in layers.items() if v})
    logger.info("read LoRA %s: %s", path, {c: len(v) for c, v in result.layers.items()})
    return result


def _split(key: str) -> tuple[str, str] | None:
    """(module key, "down"/"up"/"alpha") of a tensor key, None for anything else."""
    for down, up in _PAIRS:
        if key.endswith(down):
            return key[:-len(down)], "down"
        if key.endswith(up):
            return key[:-len(up)], "up"
    if key.endswith(".alpha"):
        return key[:-len(".alpha")], "alpha"
    return None


def _grouped(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        split = _split(key)
        if split is not None:
            groups.setdefault(split[0], {})[split[1]] = value
    return groups


def _layer(module: str, parts: Mapping[str, np.ndarray], alpha: float | None) -> LoraLayer:
    if "down" not in parts or "up" not in parts:
        raise InvalidRequestError("lora", f"layer {module}: has {sorted(parts)}; a LoRA layer needs down and up")
    # kept in the file's precision (most are fp16): a loaded LoRA costs its file size; sets are
    # blended in fp32 (`LoraRegistry._blend`)
    down, up = (np.asarray(parts[k]) if np.asarray(parts[k]).dtype == np.float16 else
                np.asarray(parts[k], dtype=np.float32) for k in ("down", "up"))
    if "alpha" in parts:
        alpha = float(np.asarray(parts["alpha"]).reshape(-1)[0])
    return LoraLayer(down, up, float(down.shape[0] if alpha is None else alpha))


def _peft_layers(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> dict[str, dict[str, LoraLayer]]:
    config = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    layers: dict[str, dict[str, LoraLayer]] = {}
    for key, parts in _grouped(tensors).items():
        key = key.removeprefix("base_model.model.")
        prefix = next((p for p in _PEFT_PREFIXES if key.startswith(p)), None)
        component = _PEFT_PREFIXES[prefix] if prefix else UNET  # a bare PEFT adapter of a UNet
        module = key[len(prefix):] if prefix else key
        module = module.replace(".processor.", ".")  # diffusers' old attention-processor keys (`to_out_lora`)
        if module.endswith(".to_out"):
            module += ".0"
        name = (prefix or "unet.").rstrip(".")
        alpha = config.get(f"{name}.alpha_pattern", {}).get(module, config.get(f"{name}.lora_alpha"))
        layers.setdefault(component, {})[canonical_layer(component, module)] = _layer(module, parts, alpha)
    return layers


def _kohya_layers(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, LoraLayer]]:
    """Kohya keys keep the module path with `_` for `.`; the names are resolved against the graph's
    layers later (`KohyaName`), as `_` is ambiguous on its own (`to_q`, `self_attn`)."""
    layers: dict[str, dict[str, LoraLayer]] = {}
    for key, parts in _grouped(tensors).items():
        prefix = next((p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
        if prefix is None:
            raise InvalidRequestError("lora", f"kohya key {key!r}: expected a prefix among {', '.join(_KOHYA_PREFIXES)}")
        component = _KOHYA_PREFIXES[prefix]
        flat = key[len(prefix):]
        if component != UNET:
            flat = flat.removeprefix("text_model_")
        layers.setdefault(component, {})[KOHYA_MARK + flat] = _layer(key, parts, None)
    return layers


#: Marks a layer name still in kohya's flattened form (resolved by `resolve_names`).
KOHYA_MARK = "kohya:"


def resolve_names(lora: LoraFile, layers: Mapping[str, Iterable[str]], what: str) -> LoraFile:
    """`lora` with every layer named as in `layers` (component → canonical names the target can
    adapt: a bundle's LoRA inputs, or a checkpoint's modules); kohya's flattened names are matched
    here. A layer the target cannot adapt is an error naming it (a LoRA must not apply in part)."""
    out: dict[str, dict[str, LoraLayer]] = {}
    for component, by_name in lora.layers.items():
        known = list(layers.get(component, ()))
        flat = {n.replace(".", "_"): n for n in known}
        resolved = {}
        for name, layer in by_name.items():
            target = flat.get(name[len(KOHYA_MARK):]) if name.startswith(KOHYA_MARK) else name
            if target not in known:
                shown = name[len(KOHYA_MARK):] if name.startswith(KOHYA_MARK) else name
                raise InvalidRequestError("lora", f"{lora.path.name}: layer {component}.{shown} is not one {what} can "
                                          f"adapt ({len(known)} {component} layers can be; e.g. "
                                          f"{', '.join(known[:3]) or 'none'})")
            resolved[target] = layer
        out[component] = resolved
    return LoraFile(lora.path, out)


@dataclass(frozen=True)
class LoraTarget:
    """One adaptable layer of a bundle: its component, name, and in/out features (the input shapes)."""

    component: str
    layer: str
    in_features: int
    out_features: int
    conv: bool  # a 1×1 Conv: down (rank, in, 1, 1), up (out, rank, 1, 1) as the inputs' shapes
    dtype: np.dtype


def bundle_targets(manifest: Manifest) -> dict[str, dict[str, LoraTarget]]:
    """component → layer → target, read from the components' `*.lora_down` inputs."""
    targets: dict[str, dict[str, LoraTarget]] = {}
    for name, component in manifest.components.items():
        found = _component_targets(component)
        if found:
            targets[name] = found
    return targets


def _component_targets(component: ComponentManifest) -> dict[str, LoraTarget]:
    inputs = {i.name: i for i in component.inputs}
    found = {}
    for info in component.inputs:
        if not info.name.endswith(DOWN):
            continue
        layer = info.name[:-len(DOWN)]
        up = inputs[layer + UP]
        conv = len(info.shape) == 4
        in_features = int(info.shape[1] if conv else info.shape[0])
        out_features = int(up.shape[0] if conv else up.shape[1])
        found[layer] = LoraTarget(component.name, layer, in_features, out_features, conv,
                                  np.dtype("float16" if info.dtype == "float16" else "float32"))
    return found


class LoraRegistry:
    """The LoRAs one loaded bundle knows by name, and the session feeds of a set of them.

    `feeds(selection)` is what an executor adds to the text encoders' and the UNet's inputs; the
    last `CACHED_SETS` selections are kept as ready arrays (a switch back costs a dict lookup)."""

    def __init__(self, manifest: Manifest):
        self.targets = bundle_targets(manifest)
        self._loras: dict[str, LoraFile] = {}
        self._cache: OrderedDict[tuple, dict[str, dict[str, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether the bundle has LoRA inputs at all."""
        return bool(self.targets)

    @property
    def names(self) -> list[str]:
        return sorted(self._loras)

    def register(self, name: str, path: Path | str) -> LoraFile:
        """Read `path` and know it as `name`; its layers must all be ones this bundle can adapt."""
        if not self.enabled:
            raise InvalidRequestError("lora", "this bundle has no LoRA inputs; export it with --lora-inputs "
                                      "(or add them: `ortdiffusion lora-inputs BUNDLE`), or fuse a LoRA at export "
                                      "with --lora FILE:SCALE")
        lora = resolve_names(read_lora(path), {c: t.keys() for c, t in self.targets.items()}, "this bundle")
        for component, layers in lora.layers.items():
            for layer_name, layer in layers.items():
                target = self.targets[component][layer_name]
                down = layer.down.reshape(layer.rank, -1)
                if down.shape[1] != target.in_features or layer.up.shape[0] != target.out_features:
                    raise InvalidRequestError("lora", f"{Path(path).name}: layer {component}.{layer_name} is "
                                              f"{layer.up.shape[0]}×{down.shape[1]}, the bundle's "
                                              f"{target.out_features}×{target.in_features}: a LoRA for another model")
        with self._lock:
            self._loras[name] = lora
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if name not in dict(k))
        return lora

    def register_dir(self, directory: Path | str) -> list[str]:
        """Every `*.safetensors` in `directory`, named by its stem."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InvalidRequestError("lora_dir", f"{directory}: not a directory")
        names = []
        for path in sorted(directory.glob("*.safetensors")):
            self.register(path.stem, path)
            names.append(path.stem)
        return names

    def selection(self, lora: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
        """A request's `lora` ({name: scale}) checked and in one canonical order (a batching key)."""
        if not lora:
            return ()
        if not self.enabled:
            raise InvalidRequestError("lora", "this model has no LoRA inputs (export it with --lora-inputs); "
                                      "it takes no LoRA per request")
        if not isinstance(lora, Mapping):
            raise InvalidRequestError("lora", f"expected a mapping of LoRA name to scale, got {type(lora).__name__}")
        picked = []
        for name, scale in lora.items():
            if name not in self._loras:
                have = ", ".join(self.names) or "none (load some: Pipeline.load_lora, or serve --lora-dir)"
                raise InvalidRequestError("lora", f"unknown LoRA {name!r}; this model has: {have}")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
                raise InvalidRequestError("lora", f"{name}: scale must be a finite number, got {scale!r}")
            if scale != 0:
                picked.append((str(name), float(scale)))
        return tuple(sorted(picked))

    def feeds(self, selection: tuple[tuple[str, float], ...]) -> dict[str, dict[str, np.ndarray]]:
        """component → {input name: array} for the blended set (empty where the bundle has no inputs)."""
        if not self.enabled:
            return {}
        with self._lock:
            ready = self._cache.get(selection)
            if ready is not None:
                self._cache.move_to_end(selection)
                return ready
            loras = [(self._loras[name], scale) for name, scale in selection]
        ready = {component: self._blend(component, targets, loras) for component, targets in self.targets.items()}
        with self._lock:
            self._cache[selection] = ready
            while len(self._cache) > CACHED_SETS:
                self._cache.popitem(last=False)
        return ready

    @staticmethod
    def _blend(component: str, targets: Mapping[str, LoraTarget],
               loras: list[tuple[LoraFile, float]]) -> dict[str, np.ndarray]:
        feeds = {}
        for layer_name, t in targets.items():
            downs, ups = [], []
            for lora, scale in loras:
                layer = lora.layers.get(component, {}).get(layer_name)
                if layer is None:
                    continue
                down = layer.down.reshape(layer.rank, -1).astype(np.float32)  # (rank, in)
                up = layer.up.reshape(layer.up.shape[0], layer.rank).astype(np.float32) \
                    * np.float32(scale * layer.alpha / layer.rank)
                downs.append(down)
                ups.append(up)
            down = np.concatenate(downs) if downs else np.zeros((0, t.in_features), np.float32)
            up = np.concatenate(ups, axis=1) if ups else np.zeros((t.out_features, 0), np.float32)
            if t.conv:
                feeds[layer_name + DOWN] = down[:, :, None, None].astype(t.dtype)
                feeds[layer_name + UP] = up[:, :, None, None].astype(t.dtype)
            else:  # the graph multiplies x @ (in, rank) @ (rank, out)
                feeds[layer_name + DOWN] = np.ascontiguousarray(down.T, dtype=t.dtype)
                feeds[layer_name + UP] = np.ascontiguousarray(up.T, dtype=t.dtype)
        return feeds

    def nbytes(self, name: str) -> int:
        return self._loras[name].nbytes()


__all__ = ["LoraFile", "LoraLayer", "LoraRegistry", "LoraSpec", "LoraTarget", "bundle_targets", "canonical_layer",
           "read_lora", "resolve_names"]
