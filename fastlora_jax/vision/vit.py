"""CLIP and SigLIP vision encoders, as pure functions over a nested dict of parameters.

Parameter tree (HF names below the tower's root, e.g. `vision_tower.`, layers stacked on L):

  embeddings.patch_embedding.weight      [D, C, p, p]   (+ .bias [D]: SigLIP)
  embeddings.class_embedding             [D]            (CLIP: the CLS token)
  embeddings.position_embedding.weight   [N, D]         N = patches (+ 1 with a CLS token)
  pre_layrnorm.{weight,bias}             [D]            (CLIP)
  layers.layer_norm{1,2}.{weight,bias}   [L, D]
  layers.self_attn.{q,k,v,out}_proj.{weight [L, D, D], bias [L, D]}
  layers.mlp.fc1.{weight [L, I, D], bias [L, I]};  layers.mlp.fc2.{weight [L, D, I], bias [L, D]}
  post_layernorm.{weight,bias}           [D]

The tower is a pre-norm transformer encoder: every token sees every token. CLIP's post-norm only
touches its pooled CLS token (which no vision-language model here reads), SigLIP's the whole last
hidden state. A model may read the output of an inner layer (LLaVA's `vision_feature_layer`):
`encode` runs only that many layers. The LoRA projection plugs in as in the text decoder, with the
HF module names q_proj, k_proj, v_proj, out_proj, fc1, fc2.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from fastlora_jax import ops
from fastlora_jax.config import _Reader
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.decoder import ParamSpec, Params, Project, frozen_project

# The LoRA-targetable projections of one encoder layer: (group, HF module name).
VISION_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                      ("self_attn", "out_proj"), ("mlp", "fc1"), ("mlp", "fc2"))


class TowerKind(enum.Enum):
    """Which encoder (its HF `model_type`)."""

    CLIP = "clip_vision_model"
    SIGLIP = "siglip_vision_model"


class VisionAct(enum.Enum):
    """The MLP activation (HF `hidden_act`)."""

    QUICK_GELU = "quick_gelu"
    GELU = "gelu"
    GELU_TANH = "gelu_pytorch_tanh"


# config.json keys of a vision tower that do not change the forward.
_HARMLESS = frozenset({"projection_dim", "initializer_factor", "dropout", "vocab_size",
                       "max_position_embeddings", "layer_norm_type", "num_image_tokens"})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP / SigLIP vision tower; every number of its forward."""

    kind: TowerKind
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    activation: VisionAct = VisionAct.QUICK_GELU
    extras: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size={self.hidden_size} must be a multiple of "
                              f"num_attention_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size={self.image_size} must be a multiple of "
                              f"patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def class_token(self) -> bool:
        return self.kind is TowerKind.CLIP

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + (1 if self.class_token else 0)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> "VisionConfig":
        """Read a `vision_config` dict strictly (unknown keys are a ConfigError)."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: vision_config must be a JSON object, found {hf!r}")
        model_type = hf.get("model_type")
        kinds = {k.value: k for k in TowerKind}
        if model_type not in kinds:
            raise ConfigError(f"{source}: vision_config model_type {model_type!r} is not "
                              f"supported; supported vision towers: {sorted(kinds)}")
        kind = kinds[model_type]
        r = _Reader(dict(hf), source)
        r.expect("attention_dropout", (0.0, 0), "attention dropout is not implemented")
        if kind is TowerKind.SIGLIP:
            # SigLIP's attention-pooling head: no vision-language model reads it, so its
            # tensors are skipped on load and the export writes vision_use_head=false.
            r.take("vision_use_head", bool, True)
        default_act = "quick_gelu" if kind is TowerKind.CLIP else "gelu_pytorch_tanh"
        act = r.expect("hidden_act", (default_act,) + tuple(
            a.value for a in VisionAct if a.value != default_act),
            "the vision MLP activation")
        fields = dict(
            kind=kind,
            hidden_size=r.take("hidden_size", int, 768),
            intermediate_size=r.take("intermediate_size", int, 3072),
            num_layers=r.take("num_hidden_layers", int, 12),
            num_heads=r.take("num_attention_heads", int, 12),
            image_size=r.take("image_size", int, 224),
            patch_size=r.take("patch_size", int, 32 if kind is TowerKind.CLIP else 16),
            num_channels=r.take("num_channels", int, 3),
            layer_norm_eps=r.take("layer_norm_eps", float,
                                  1e-5 if kind is TowerKind.CLIP else 1e-6),
            activation=VisionAct(act))
        r.finish(model_type, _HARMLESS)
        return cls(**fields, extras=r.extras())

    def to_hf(self) -> dict[str, Any]:
        """The `vision_config` dict transformers reads back into this tower."""
        import json

        out: dict[str, Any] = {k: json.loads(v) for k, v in self.extras}
        out.update(model_type=self.kind.value, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, image_size=self.image_size,
                   patch_size=self.patch_size, num_channels=self.num_channels,
                   layer_norm_eps=self.layer_norm_eps, hidden_act=self.activation.value,
                   attention_dropout=0.0)
        if self.kind is TowerKind.SIGLIP:
            out["vision_use_head"] = False
        return out


def vision_param_specs(config: VisionConfig) -> list[ParamSpec]:
    """Every parameter of the tower (stable order). Axes are left unnamed: the tower is small
    and stays replicated under a mesh."""
    c = config
    D, I, L = c.hidden_size, c.intermediate_size, c.num_layers
    specs: list[ParamSpec] = []

    def one(path: tuple[str, ...], shape: tuple[int, ...]) -> None:
        specs.append(ParamSpec(path, shape, (None,) * len(shape), False))

    def layer(path: tuple[str, ...], shape: tuple[int, ...]) -> None:
        specs.append(ParamSpec(("layers",) + path, (L,) + shape,
                               ("layers",) + (None,) * len(shape), True))

    one(("embeddings", "patch_embedding", "weight"),
        (D, c.num_channels, c.patch_size, c.patch_size))
    if c.kind is TowerKind.SIGLIP:
        one(("embeddings", "patch_embedding", "bias"), (D,))
    if c.class_token:
        one(("embeddings", "class_embedding"), (D,))
    one(("embeddings", "position_embedding", "weight"), (c.num_positions, D))
    if c.kind is TowerKind.CLIP:
        one(("pre_layrnorm", "weight"), (D,))
        one(("pre_layrnorm", "bias"), (D,))
    for norm in ("layer_norm1", "layer_norm2"):
        layer((norm, "weight"), (D,))
        layer((norm, "bias"), (D,))
    for group, name in VISION_PROJECTIONS:
        out, inp = {"fc1": (I, D), "fc2": (D, I)}.get(name, (D, D))
        layer((group, name, "weight"), (out, inp))
        layer((group, name, "bias"), (out,))
    one(("post_layernorm", "weight"), (D,))
    one(("post_layernorm", "bias"), (D,))
    return specs


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _act(kind: VisionAct) -> Callable[[jax.Array], jax.Array]:
    if kind is VisionAct.QUICK_GELU:
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=kind is VisionAct.GELU_TANH)


def patch_embed(config: VisionConfig, params: Params, pixel_values: jax.Array,
                dtype: Any) -> jax.Array:
    """pixel_values [N, C, H, W] -> tokens [N, P(+1), D] with position embeddings (and CLS)."""
    c = config
    n, ch, h, w = pixel_values.shape
    if (h, w) != (c.image_size, c.image_size) or ch != c.num_channels:
        raise ConfigError(f"pixel_values of shape {list(pixel_values.shape)} do not fit a "
                          f"{c.image_size}x{c.image_size}, {c.num_channels}-channel vision tower; "
                          f"preprocess images with the checkpoint's image processor")
    p, g = c.patch_size, c.grid
    # [N, C, g, p, g, p] -> [N, g, g, C, p, p] -> [N, g*g, C*p*p]: a stride-p convolution
    x = pixel_values.astype(dtype).reshape(n, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = x.reshape(n, g * g, ch * p * p)
    conv = params["embeddings"]["patch_embedding"]
    wt = conv["weight"].astype(dtype).reshape(c.hidden_size, ch * p * p)
    x = jnp.einsum("npk,dk->npd", x, wt)                                           # [N,P,D]
    if "bias" in conv:
        x = x + conv["bias"].astype(dtype)
    if c.class_token:
        cls = jnp.broadcast_to(params["embeddings"]["class_embedding"].astype(dtype),
                               (n, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)                                      # [N,P+1,D]
    return x + params["embeddings"]["position_embedding"]["weight"].astype(dtype)[None]


def encoder_layer(config: VisionConfig, p: Params, lp: Params | None, h: jax.Array,
                  project: Project, attention_impl: Any = None) -> jax.Array:
    """One pre-norm block, h [N, S, D] -> [N, S, D]."""
    c = config
    n, s, d = h.shape

    def proj(x: jax.Array, group: str, name: str) -> jax.Array:
        sub = None if lp is None else lp.get(group, {}).get(name)
        return project(x, name, p[group][name], sub)

    x = layer_norm(h, p["layer_norm1"], c.layer_norm_eps)
    q, k, v = (proj(x, "self_attn", name).reshape(n, s, c.num_heads, c.head_dim)
               for name in ("q_proj", "k_proj", "v_proj"))                      # [N,S,Hh,Dh]
    a = ops.attention(q, k, v, causal=False, scale=c.head_dim ** -0.5, impl=attention_impl)
    h = h + proj(a.reshape(n, s, d), "self_attn", "out_proj")
    x = layer_norm(h, p["layer_norm2"], c.layer_norm_eps)
    m = _act(c.activation)(proj(x, "mlp", "fc1"))                                 # [N,S,I]
    return h + proj(m, "mlp", "fc2")


def encode(config: VisionConfig, params: Params, pixel_values: jax.Array, *,
           num_layers: int | None = None, post_norm: bool = False, lora: Params | None = None,
           project: Project = frozen_project, attention_impl: Any = None,
           remat: Callable[[Callable], Callable] | None = None,
           dtype: Any = None) -> jax.Array:
    """Hidden states [N, S, D] after the first `num_layers` blocks (default all; S = patches,
    plus the CLS token for CLIP), SigLIP-style post-norm applied when `post_norm`.

    With `num_layers=k` this is transformers' `hidden_states[k]` (0 = the embeddings, after
    CLIP's pre-norm)."""
    c = config
    dtype = dtype or params["embeddings"]["position_embedding"]["weight"].dtype
    k = c.num_layers if num_layers is None else num_layers
    if not 0 <= k <= c.num_layers:
        raise ConfigError(f"vision feature layer {k} is outside 0..{c.num_layers}")
    h = patch_embed(c, params, pixel_values, dtype)
    if c.kind is TowerKind.CLIP:
        h = layer_norm(h, params["pre_layrnorm"], c.layer_norm_eps)
    if k:
        def body(h: jax.Array, xs: tuple[Params, Params | None]) -> tuple[jax.Array, None]:
            p, lp = xs
            return encoder_layer(c, p, lp, h, project, attention_impl), None

        if remat is not None:
            body = remat(body)
        take = (lambda a: a) if k == c.num_layers else (lambda a: a[:k])
        layers = jax.tree.map(take, params["layers"])
        lora_layers = None if lora is None else jax.tree.map(take, lora["layers"])
        h, _ = jax.lax.scan(body, h, (layers, lora_layers))
    if post_norm:
        h = layer_norm(h, params["post_layernorm"], c.layer_norm_eps)
    return h
