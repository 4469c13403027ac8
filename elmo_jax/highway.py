"""Highway layers in bilm-tf's gate form: y = g * relu(x W_t + b_t) + (1 - g) * x, g = sigmoid(x W_c + b_c)."""

from __future__ import annotations

import jax


def highway(layers: list[dict], x: jax.Array) -> jax.Array:
    """Apply highway layers in order.

    Args:
      layers: [{"carry": {"kernel": (dim, dim), "bias": (dim,)},
                "transform": {"kernel": (dim, dim), "bias": (dim,)}}, ...].
      x: (tokens, dim).
    Returns:
      (tokens, dim).
    """
    for layer in layers:
        carry, transform = layer["carry"], layer["transform"]
        gate = jax.nn.sigmoid(x @ carry["kernel"] + carry["bias"][None, :])
        transformed = jax.nn.relu(x @ transform["kernel"] + transform["bias"][None, :])
        x = gate * transformed + (1.0 - gate) * x
    return x
