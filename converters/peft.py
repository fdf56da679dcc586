"""PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`, exactly as PEFT writes them.

Keys: `base_model.model.model.layers.{i}.{group}.{name}.lora_A.weight` [r_i, in],
`...lora_B.weight` [out, r_i] and, for DoRA, `...lora_magnitude_vector` [out]. A layer's arrays are
cut to its own rank (our stacked arrays are padded to the projection's max rank).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, TypeVar

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.atomic import atomic_folder
from fastlora_jax.errors import CheckpointError, ConfigError, ExportError
from fastlora_jax.lora.spec import LoraConfig, LoraSpec, hf_module_name, resolve
from fastlora_jax.models.decoder import Params, param_specs
from fastlora_jax.models.registry import family_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release whose format this writes (checked by tests)


# adapter_config.json keys we read: (accepted JSON types, what to tell the user); null = default.
CONFIG_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "a positive integer"),
    "lora_alpha": ((int, float), "a positive number"),
    "lora_dropout": ((int, float), "a number in [0, 1)"),
    "target_modules": ((str, list), "a list of module names or a regex string"),
    "use_rslora": ((bool,), "true or false"),
    "use_dora": ((bool,), "true or false"),
    "rank_pattern": ((dict,), "an object of module regex -> rank"),
    "alpha_pattern": ((dict,), "an object of module regex -> alpha"),
    "init_lora_weights": ((bool, str), "true, false or a method name"),
    "base_model_name_or_path": ((str,), "a path string"),
}


def adapter_config_dict(spec: LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT would write for `spec`."""
    cfg = spec.config
    target = cfg.target_modules
    if target is None:
        target = sorted({name for (_, name) in spec.targets})
    elif not isinstance(target, str):
        target = list(target)
    return dict(sorted({
        "alpha_pattern": dict(cfg.alpha_pattern), "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": cfg.init_lora_weights, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": cfg.lora_alpha, "lora_bias": False, "lora_dropout": cfg.lora_dropout,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "r": cfg.r,
        "rank_pattern": dict(cfg.rank_pattern), "revision": None, "target_modules": target,
        "task_type": "CAUSAL_LM", "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora,
    }.items()))


def adapter_tensors(spec: LoraSpec, lora: Params,
                    module_name: Callable[[int, str, str], str] = hf_module_name
                    ) -> dict[str, np.ndarray]:
    """Flat {PEFT key: float32 array} for every targeted (layer, projection); `module_name`
    gives the HF module name of (layer, group, name) (a vision-language model's text decoder
    and tower live under other prefixes)."""
    out: dict[str, np.ndarray] = {}
    for (group, name), ranks, _ in spec.modules:
        entry = {k: np.asarray(v, np.float32) for k, v in lora["layers"][group][name].items()}
        for layer, r in enumerate(ranks):
            if r == 0:
                continue
            key = PREFIX + module_name(layer, group, name)
            out[key + ".lora_A.weight"] = np.ascontiguousarray(entry["lora_A"][layer, :r])
            out[key + ".lora_B.weight"] = np.ascontiguousarray(entry["lora_B"][layer, :, :r])
            if "lora_magnitude" in entry:
                out[key + ".lora_magnitude_vector"] = entry["lora_magnitude"][layer]
    return out


def save_adapter(folder: str | pathlib.Path, spec: LoraSpec | None, lora: Params | None, *,
                 base_model_name_or_path: str | None, tokenizer: Any = None,
                 overwrite: bool = False) -> pathlib.Path:
    """Write a PEFT adapter folder (and the tokenizer's files, when given) atomically.

    `spec` / `lora` None (a model without adapters) is an ExportError: there is nothing to save.
    """
    if spec is None or lora is None:
        raise ExportError("the model has no adapter to save; call "
                          "FastLanguageModel.get_peft_model(model, ...) first, or "
                          "save_pretrained_merged for the full model")
    return write_adapter(folder, adapter_config_dict(spec, base_model_name_or_path),
                         adapter_tensors(spec, lora), tokenizer=tokenizer, overwrite=overwrite)


def write_adapter(folder: str | pathlib.Path, config: dict[str, Any],
                  tensors: dict[str, np.ndarray], *, tokenizer: Any = None,
                  overwrite: bool = False) -> pathlib.Path:
    """adapter_config.json + adapter_model.safetensors (+ the tokenizer's or processor's files)
    in one atomic folder write."""
    folder = pathlib.Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder


def read_adapter_config(folder: str | pathlib.Path) -> dict[str, Any]:
    """Parse and check adapter_config.json (PEFT's minimum: peft_type)."""
    path = pathlib.Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: {str(folder)!r} is not a PEFT adapter")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{str(path)!r}: peft_type must be 'LORA', found {found!r}")
    for key, (kinds, expected) in CONFIG_TYPES.items():
        value = cfg.get(key)
        if key in cfg and value is not None and (
                not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
                or (isinstance(value, list) and not all(isinstance(v, str) for v in value))):
            raise CheckpointError(f"{str(path)!r}: {key}={value!r} must be {expected}")
    unsupported = {k: cfg.get(k) for k in ("lora_bias", "fan_in_fan_out", "modules_to_save",
                                           "layers_to_transform", "layer_replication",
                                           "trainable_token_indices", "target_parameters")
                   if cfg.get(k) not in (None, False, [], {})}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise CheckpointError(f"{str(path)!r} uses PEFT options we do not load: {unsupported}")
    return cfg


def lora_config_from_peft(cfg: dict[str, Any], source: str) -> LoraConfig:
    try:
        return LoraConfig.create(
            r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8),
            lora_dropout=cfg.get("lora_dropout", 0.0), target_modules=cfg.get("target_modules"),
            use_rslora=cfg.get("use_rslora", False), use_dora=cfg.get("use_dora", False),
            rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
            init_lora_weights=cfg.get("init_lora_weights", True)
            if cfg.get("init_lora_weights", True) in (True, False, "gaussian") else True)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def load_adapter(folder: str | pathlib.Path, model_config: ModelConfig,
                 dtype: Any = jnp.float32) -> tuple[LoraSpec, Params]:
    """Read a PEFT adapter onto a model of `model_config`; every shape is checked.

    `target_modules: null` means what PEFT itself targets for the family (or, where PEFT has no
    default, our own default targets).
    """
    family = family_for(model_config.model_type)
    default_targets = family.peft_default_target_modules or family.default_target_modules
    spec, path, tensors = read_adapter(
        folder, lambda lora_cfg: resolve(lora_cfg, model_config, default_targets))
    used: set[str] = set()
    tree = adapter_tree(spec, tensors, used, path, param_specs(model_config),
                        model_config.num_layers, hf_module_name, dtype)
    check_all_used(tensors, used, path)
    return spec, tree


Spec = TypeVar("Spec")


def read_adapter(folder: str | pathlib.Path, resolve_spec: Callable[[LoraConfig], Spec]
                 ) -> tuple[Spec, pathlib.Path, dict[str, np.ndarray]]:
    """(`resolve_spec` of the folder's adapter_config.json, adapter_model.safetensors, its
    tensors as `read_adapter_tensors` gives them); a ConfigError of `resolve_spec` becomes a
    CheckpointError naming adapter_config.json."""
    folder = pathlib.Path(folder)
    source = str(folder / CONFIG_NAME)
    lora_cfg = lora_config_from_peft(read_adapter_config(folder), source)
    try:
        spec = resolve_spec(lora_cfg)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return (spec, *read_adapter_tensors(folder))


def read_adapter_tensors(folder: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(adapter_model.safetensors, {key with PEFT's `base_model.model.` prefix: array})."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing (only safetensors adapters are read; "
                              f"we never unpickle adapter_model.bin)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    return path, {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in tensors.items()}


def adapter_tree(spec: LoraSpec, tensors: dict[str, np.ndarray], used: set[str],
                 path: pathlib.Path, specs: list[Any], num_layers: int,
                 module_name: Callable[[int, str, str], str], dtype: Any) -> Params:
    """The stacked LoRA tree of `spec` from PEFT's per-layer tensors (each found and its shape
    checked against `specs`, the frozen params' ParamSpecs, before allocating); the keys read are
    added to `used`."""
    tree: Params = {"layers": {}}
    shapes = {s.path: s.layer_shape for s in specs}
    for (group, name), ranks, _ in spec.modules:
        out_dim, in_dim = shapes[("layers", group, name, "weight")]
        parts: dict[str, list[tuple[int, np.ndarray]]] = {"a": [], "b": [], "m": []}
        for layer, r in enumerate(ranks):  # every tensor is found and checked before allocating
            if r == 0:
                continue
            key = PREFIX + module_name(layer, group, name)
            parts["a"].append((layer, _take(tensors, key + ".lora_A.weight", (r, in_dim), path)))
            parts["b"].append((layer, _take(tensors, key + ".lora_B.weight", (out_dim, r), path)))
            used.update((key + ".lora_A.weight", key + ".lora_B.weight"))
            if spec.config.use_dora:
                parts["m"].append((layer, _take(tensors, key + ".lora_magnitude_vector",
                                                (out_dim,), path)))
                used.add(key + ".lora_magnitude_vector")
        rmax = max(ranks)
        a = np.zeros((num_layers, rmax, in_dim), np.float32)
        b = np.zeros((num_layers, out_dim, rmax), np.float32)
        for layer, t in parts["a"]:
            a[layer, :t.shape[0]] = t
        for layer, t in parts["b"]:
            b[layer, :, :t.shape[1]] = t
        entry = {"lora_A": jnp.asarray(a, dtype), "lora_B": jnp.asarray(b, dtype)}
        if spec.config.use_dora:
            m = np.zeros((num_layers, out_dim), np.float32)
            for layer, t in parts["m"]:
                m[layer] = t
            entry["lora_magnitude"] = jnp.asarray(m, dtype)
        tree["layers"].setdefault(group, {})[name] = entry
    return tree


def check_all_used(tensors: dict[str, np.ndarray], used: set[str], path: pathlib.Path) -> None:
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{str(path)!r} holds tensors this model has no place for: "
                              f"{extra[:5]}; the adapter was made for another architecture")


def _take(tensors: dict[str, np.ndarray], key: str, shape: tuple[int, ...],
          path: pathlib.Path) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(f"{str(path)!r} lacks {key!r}; the adapter does not match this "
                              f"base model (different layers or target modules)")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{str(path)!r}: {key!r} has shape {list(t.shape)}, expected "
                              f"{list(shape)} for this base model; the adapter was trained on a "
                              f"model of another size")
    return t.astype(np.float32)
