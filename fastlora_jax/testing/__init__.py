"""Helpers shared by the tests and the benchmarks: random attention inputs and error measures, and
the reference environment (torch / transformers / peft in .refenv) driven in a subprocess."""

from fastlora_jax.testing.attention import attention_inputs, max_rel_error, packed_segment_ids
from fastlora_jax.testing.refenv import REFENV_PYTHON, REPO, refenv_available, run_reference

__all__ = ["REFENV_PYTHON", "REPO", "attention_inputs", "max_rel_error", "packed_segment_ids",
           "refenv_available", "run_reference"]
