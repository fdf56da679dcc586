"""Quantized frozen weights: the `QTensor` pytree, NF4 / int8 quantization, bitsandbytes I/O."""

from fastlora_jax.quant.bnb import from_bnb_4bit, to_bnb_4bit
from fastlora_jax.quant.int8 import from_bnb_int8, quantize_int8
from fastlora_jax.quant.maps import DYNAMIC_MAP, NF4_MAP
from fastlora_jax.quant.nf4 import quantize_nf4
from fastlora_jax.quant.nf4_device import quantize_nf4_on_device
from fastlora_jax.quant.qtensor import (QTensor, QuantKind, can_tile, dequantize, nf4_block_scales,
                                        stack, tile, untile)
from fastlora_jax.quant.quantizers import QUANTIZERS, quantize

__all__ = ["DYNAMIC_MAP", "NF4_MAP", "QUANTIZERS", "QTensor", "QuantKind", "can_tile", "dequantize",
           "from_bnb_4bit", "from_bnb_int8", "nf4_block_scales", "quantize", "quantize_int8",
           "quantize_nf4", "quantize_nf4_on_device", "stack", "tile", "to_bnb_4bit", "untile"]
