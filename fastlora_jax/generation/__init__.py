"""Generation: a KV-cache engine over (frozen, lora) and `model.generate` on top of it."""

from fastlora_jax.generation.config import GenerationConfig
from fastlora_jax.generation.engine import EngineSpec, GenState, decode, generate, prefill
from fastlora_jax.generation.generator import GenerateOutput, Generator
from fastlora_jax.generation.sampling import SamplingConfig
from fastlora_jax.generation.streamer import TextStreamer

__all__ = ["EngineSpec", "GenState", "GenerateOutput", "GenerationConfig", "Generator",
           "SamplingConfig", "TextStreamer", "decode", "generate", "prefill"]
