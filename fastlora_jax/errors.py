"""The one exception family of fastlora_jax.

Every message names the file / key / value at fault, what was expected, what was found, and what to
do about it. Catch `FastLoRAError` to catch all of them.
"""


class FastLoRAError(Exception):
    """Base class of every error raised on purpose by fastlora_jax."""


class ConfigError(FastLoRAError, ValueError):
    """A model / LoRA / training configuration is invalid or not understood."""


class CheckpointError(FastLoRAError):
    """A checkpoint on disk is missing, incomplete, corrupt or does not match the model."""


class DataError(FastLoRAError, ValueError):
    """A dataset or a batch is unusable."""


class ExportError(FastLoRAError):
    """An export (PEFT adapter, merged checkpoint, GGUF) could not be written."""


class KernelError(FastLoRAError, ValueError):
    """A kernel was called with shapes, dtypes or tuning parameters it does not support."""


class GenerationError(FastLoRAError, ValueError):
    """A generation request (prompts, sampling options, stop tokens) is invalid."""


class TrainingError(FastLoRAError):
    """Training cannot go on (e.g. the loss became non-finite)."""
