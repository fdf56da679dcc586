"""`TrainingArguments`: TRL/HF argument names and meanings, plus the SFT data options."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import yaml

from fastlora_jax.errors import ConfigError
from fastlora_jax.sharding import MeshConfig
from fastlora_jax.train.step import SCHEDULES


@dataclasses.dataclass
class TrainingArguments:
    """The knobs of an SFT run (names as in transformers.TrainingArguments / trl.SFTConfig).

    max_steps > 0 overrides num_train_epochs. save_steps 0 saves only at the end. A step consumes
    per_device_train_batch_size x gradient_accumulation_steps x data-parallel size rows.
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
    lr_scheduler_type: str = "linear"
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
    use_gradient_checkpointing: bool | str = True
    report_to: str = "tensorboard"
    disable_tqdm: bool = False
    mesh: MeshConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mesh, dict):
            self.mesh = MeshConfig(**self.mesh)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError(f"nothing to train: max_steps={self.max_steps}, "
                              f"num_train_epochs={self.num_train_epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ConfigError(f"lr_scheduler_type={self.lr_scheduler_type!r} must be one of "
                              f"{list(SCHEDULES)}")
        gc = self.use_gradient_checkpointing
        if gc == "unsloth":
            self.use_gradient_checkpointing = "offload"
        elif not (isinstance(gc, bool) or gc in ("offload", "dots")):
            raise ConfigError(f"use_gradient_checkpointing={gc!r} must be True, False, 'offload' "
                              f"('unsloth' is its alias) or 'dots'")
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"report_to={self.report_to!r} must be 'tensorboard' or 'none'")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "arguments") -> "TrainingArguments":
        """Build from a dict, naming any key we do not know."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{source}: unknown training argument(s) {unknown}; known: "
                              f"{cls.field_names()}")
        return cls(**values)


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """A run config file: a YAML mapping of CLI flag names to values."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of argument names to "
                          f"values, found {type(data).__name__}")
    return data
