"""Run settings: `TrainingArguments` (TRL/HF names and meanings, plus the SFT data options), and the
model / launch settings of `fastlora-jax train`. Every field's declared type is the schema that
YAML files and command-line flags are converted by (`fastlora_jax/train/schema.py`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal

import yaml

from fastlora_jax.errors import ConfigError
from fastlora_jax.sharding import MeshConfig
from fastlora_jax.train.schema import coerce_instance, convert_fields, field_types
from fastlora_jax.train.step import ScheduleName

EvalMetric = Literal["eval_loss", "eval_perplexity"]


@dataclasses.dataclass
class TrainingArguments:
    """The knobs of an SFT run (names as in transformers.TrainingArguments / trl.SFTConfig).

    max_steps > 0 overrides num_train_epochs. save_steps 0 saves only at the end. A step consumes
    per_device_train_batch_size x gradient_accumulation_steps x data-parallel size rows.

    Evaluation (needs an eval_dataset): eval_strategy "steps" evaluates every eval_steps
    (default: logging_steps) optimizer steps, "epoch" at the end of every epoch; a run with an
    eval_dataset is also evaluated once at its end. Both metrics (eval_loss, the token-weighted
    mean loss, and eval_perplexity = exp(eval_loss)) are better when lower.
    load_best_model_at_end puts the adapter of the best evaluation back on the model at the end;
    early_stopping_patience stops the run after that many evaluations in a row that did not
    improve metric_for_best_model by more than early_stopping_threshold.

    A step whose loss or gradient norm is not finite is skipped (no update), counted and logged;
    max_consecutive_nonfinite_steps of them in a row stop the run with a TrainingError.

    use_gradient_checkpointing (Unsloth's name and values) says how each decoder layer is
    rematerialised in the backward: False keeps every activation, True keeps each layer's input,
    "offload" (alias "unsloth") keeps it in pinned host memory, "dots" keeps the matmul outputs
    (see `train.step.remat_wrapper`). It is a training setting, so it lives here and not on the
    model.
    """

    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: ScheduleName = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = 2
    seed: int = 3407
    packing: bool = False
    dataset_text_field: str = "text"
    max_seq_length: int | None = None
    train_on_responses_only: bool = False
    loss_chunk_size: int = 1024
    use_gradient_checkpointing: bool | Literal["offload", "unsloth", "dots"] = True
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    disable_tqdm: bool = False
    mesh: MeshConfig | None = None
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None
    per_device_eval_batch_size: int = 8
    load_best_model_at_end: bool = False
    metric_for_best_model: EvalMetric = "eval_loss"
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    max_consecutive_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        coerce_instance(self, source=type(self).__name__)
        if self.use_gradient_checkpointing == "unsloth":
            self.use_gradient_checkpointing = "offload"
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "per_device_eval_batch_size", "loss_chunk_size",
                     "max_consecutive_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainingArguments: {name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "save_steps", "weight_decay", "max_grad_norm",
                     "early_stopping_threshold", "warmup_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainingArguments: {name}={getattr(self, name)} must be >= 0")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError(f"TrainingArguments: nothing to train: max_steps={self.max_steps}, "
                              f"num_train_epochs={self.num_train_epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"TrainingArguments: learning_rate={self.learning_rate} must be > 0")
        for name in ("eval_steps", "early_stopping_patience", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"TrainingArguments: {name}={getattr(self, name)} must be >= 1 "
                                  f"or null")
        needs_eval = [name for name, on in (("load_best_model_at_end", self.load_best_model_at_end),
                                            ("early_stopping_patience",
                                             self.early_stopping_patience is not None)) if on]
        if needs_eval and self.eval_strategy == "no":
            raise ConfigError(f"TrainingArguments: {needs_eval[0]} compares evaluations, but "
                              f"eval_strategy='no'; set eval_strategy to 'steps' or 'epoch' and "
                              f"pass an eval_dataset")

    @classmethod
    def field_names(cls) -> list[str]:
        return list(field_types(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "arguments") -> "TrainingArguments":
        """Build from a dict of raw values (YAML / CLI spellings), naming any key we do not know."""
        return cls(**convert_fields(cls, values, source=source))


@dataclasses.dataclass
class ModelArguments:
    """`fastlora-jax train`'s model and LoRA settings: FastLanguageModel.from_pretrained's and
    get_peft_model's arguments. target_modules is a list of module names (one name is a list of
    one); None means the family's default (all projections)."""

    r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    random_state: int = 3407

    def __post_init__(self) -> None:
        coerce_instance(self, source="ModelArguments")


@dataclasses.dataclass
class LaunchArguments:
    """`fastlora-jax train`'s inputs and process settings (multi-process: jax.distributed)."""

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    resume_from_checkpoint: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        coerce_instance(self, source="LaunchArguments")


RUN_SECTIONS = (LaunchArguments, ModelArguments, TrainingArguments)


def run_settings(*layers: tuple[dict[str, Any], str]
                 ) -> tuple[LaunchArguments, ModelArguments, TrainingArguments]:
    """The three typed sections of one run from raw settings given as (values, source) layers,
    later layers winning (e.g. the YAML file, then the command line). Each layer is checked on
    its own, so an error names the file or the command line it came from."""
    known = {name: cls for cls in RUN_SECTIONS for name in field_types(cls)}
    merged: dict[str, Any] = {}
    for values, source in layers:
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        for cls in RUN_SECTIONS:
            merged.update(convert_fields(cls, {k: v for k, v in values.items()
                                               if known[k] is cls}, source=source))
    launch, model, training = (cls(**{k: v for k, v in merged.items() if known[k] is cls})
                               for cls in RUN_SECTIONS)
    return launch, model, training


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """A run config file: a YAML mapping of setting names (the CLI flags' names) to values."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of setting names to "
                          f"values, found {type(data).__name__}")
    return data
