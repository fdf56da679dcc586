"""`GenerationConfig`: the defaults of `model.generate`, read like transformers reads them.

transformers takes generate()'s defaults from the checkpoint's generation_config.json (else the
token ids of config.json); so do we, for the options we implement. Keys of that file that we do
not implement (beam search, no_repeat_ngram_size, ...) are logged once and ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import CheckpointError
from fastlora_jax.generation.sampling import SamplingConfig

log = logging.getLogger(__name__)

FILE = "generation_config.json"
# Keys that only carry bookkeeping, or options whose neutral value is what we run.
_IGNORED = {"_from_model_config", "transformers_version", "use_cache", "output_attentions",
            "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
            "bos_token_id", "decoder_start_token_id", "cache_implementation", "max_length",
            "num_return_sequences", "trust_remote_code"}
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "no_repeat_ngram_size": 0, "typical_p": 1.0,
            "diversity_penalty": 0.0, "length_penalty": 1.0, "min_length": 0,
            "min_new_tokens": None, "early_stopping": False, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "guidance_scale": None, "renormalize_logits": False,
            "remove_invalid_values": False, "bad_words_ids": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None}


@dataclasses.dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """Defaults of `model.generate` (each argument given there wins): SamplingConfig's fields
    and, beyond them, max_new_tokens: the default length; eos_token_id: ids that end a row;
    pad_token_id: what a finished row emits (None: the first EOS id, else 0); merge_adapters:
    fold LoRA into a dense copy of the weights for generation
    (`FastLanguageModel.for_inference(model, merge_adapters=True)`) instead of applying the
    adapters unmerged.
    """

    max_new_tokens: int = 64
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    merge_adapters: bool = False

    def sampling(self) -> SamplingConfig:
        """The sampling part (the engine's static argument)."""
        return SamplingConfig(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(SamplingConfig)})

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path, config: ModelConfig) -> GenerationConfig:
        """generation_config.json of `folder` if present, else config.json's token ids."""
        path = pathlib.Path(folder) / FILE
        if path.is_file():
            try:
                values: dict[str, Any] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e}); fix or delete the "
                                      f"file") from None
        else:
            values = {k: json.loads(v) for k, v in config.extras
                      if k in ("eos_token_id", "pad_token_id")}
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str) -> GenerationConfig:
        fields = {f.name for f in dataclasses.fields(cls)} - {"merge_adapters"}
        kept = {k: v for k, v in values.items() if k in fields and v is not None}
        unsupported = sorted(k for k, v in values.items()
                             if k not in fields and k not in _IGNORED
                             and not (k in _NEUTRAL and v == _NEUTRAL[k]))
        if unsupported:
            log.warning("%s: generation options %s are not implemented and are ignored",
                        source, unsupported)
        eos = kept.get("eos_token_id", ())
        kept["eos_token_id"] = tuple([eos] if isinstance(eos, int) else eos)
        return cls(**kept)
