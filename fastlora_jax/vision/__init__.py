"""Vision-language models: a vision tower and projector feeding image embeddings into the shared
text decoder (LLaVA, Gemma 3), with Unsloth's `FastVisionModel` entry points."""

from fastlora_jax.vision.model import FastVisionModel, VisionLM
from fastlora_jax.vision.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "FastVisionModel", "VisionLM"]
