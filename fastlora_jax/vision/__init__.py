"""Vision-language models: a vision tower and projector feeding image embeddings into the shared
text decoder (LLaVA, Gemma 3). `fastlora_jax.FastVisionModel` (in `api.py`) loads them."""

from fastlora_jax.vision.model import VisionLM
from fastlora_jax.vision.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "VisionLM"]
