"""The vision step benchmark's pieces: our side runs end to end on a tiny LLaVA (written by our
exporter, no torch) and its trainable parameters are exactly those its regex names."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from fastlora_jax.testing.vision import tiny_vlm_numpy
from fastlora_jax import FastVisionModel

import vision_step  # a sibling: pytest puts benchmarks/ on the path for these tests


@pytest.mark.slow  # compiles a training step: ~80 s on 2 cores
def test_our_side_runs_and_counts_adapters(tmp_path: pathlib.Path) -> None:
    folder = tiny_vlm_numpy(tmp_path / "llava")
    _, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    inputs = vision_step.make_inputs(processor, 2)
    times, targets, count = vision_step.ours(folder, inputs, warmup=1, steps=1)
    assert len(times) == 1 and times[0] > 0
    # 2 text layers (64 wide, MLP 96, kv 32) and 2 tower layers (32 wide, MLP 48), r = 16
    text = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 96) * 3)
    tower = 2 * 16 * ((32 + 32) * 4 + (32 + 48) * 2)
    assert count == text + tower
    assert "vision_tower" in targets and "language_model" in targets
    assert np.isfinite(times[0])
