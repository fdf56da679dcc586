"""The on-device NF4 quantizer against the host (bitsandbytes-exact) quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.quant import dequantize, quantize_nf4
from fastlora_jax.quant.nf4_device import quantize_nf4_on_device


@pytest.mark.parametrize("shape", [(96, 160), (3, 64, 320), (2, 24, 40)])
def test_matches_host_quantizer(shape):
    seed = int(np.prod(shape))
    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.02
    w = w.at[..., 0, :64].set(0.0)  # an all-zero block
    dev = quantize_nf4_on_device(w.astype(jnp.bfloat16))
    host = quantize_nf4(np.asarray(w.astype(jnp.bfloat16)))
    assert dev.shape == host.shape and dev.dtype == host.dtype == "bfloat16"
    for name in ("codes", "absmax", "nested_absmax", "nested_offset"):
        assert getattr(dev, name).shape == getattr(host, name).shape, name
    np.testing.assert_array_equal(np.asarray(dev.codes), host.codes)
    same = np.mean(np.asarray(dev.absmax) == host.absmax)
    assert same >= 0.99, same
    np.testing.assert_allclose(np.asarray(dev.nested_offset), host.nested_offset, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dev.nested_absmax), host.nested_absmax, rtol=1e-5)
    a = np.asarray(dequantize(dev, jnp.float32))
    b = np.asarray(dequantize(host, jnp.float32))
    assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(b))
    # the round trip is NF4-accurate
    err = np.abs(a - np.asarray(w.astype(jnp.bfloat16), np.float32))
    assert np.mean(err) < 0.1 * np.mean(np.abs(np.asarray(w)))


def test_rejects_bad_input():
    with pytest.raises(KernelError, match="multiple of 64"):
        quantize_nf4_on_device(jnp.zeros((3, 5)))
    with pytest.raises(KernelError, match="ndim"):
        quantize_nf4_on_device(jnp.zeros((64,)))
    with pytest.raises(KernelError, match="int8"):
        quantize_nf4_on_device(jnp.zeros((8, 8), jnp.int8))
