"""Vision-language models: a vision tower and projector feeding image embeddings into the shared
text decoder (LLaVA, Gemma 3, Qwen2.5-VL). `fastlora_jax.FastVisionModel` (in `api.py`) loads them."""

from fastlora_jax.vision.model import VisionLM
from fastlora_jax.vision.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "VisionLM"]
