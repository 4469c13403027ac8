"""Scalar mix: gamma * sum_k softmax(w)_k * layer_k, with AllenNLP's optional masked layer norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_scalar_mix(n_layers: int, initial_weights=None, gamma: float = 1.0) -> dict:
    """Params of one scalar mix.

    Args:
      n_layers: number of layers mixed (the biLM's n_layers + 1).
      initial_weights: (n_layers,) pre-softmax weights (AllenNLP's ``scalar_mix_parameters``); None for zeros,
        i.e. equal weights after the softmax.
      gamma: the initial scale.
    Returns:
      {"weights": (n_layers,) float32, "gamma": () float32}.
    """
    weights = jnp.zeros((n_layers,), jnp.float32) if initial_weights is None else jnp.asarray(initial_weights,
                                                                                                jnp.float32)
    if weights.shape != (n_layers,):
        raise ValueError(f"scalar mix needs {n_layers} initial weights, found {weights.shape[0]}")
    return {"weights": weights, "gamma": jnp.asarray(gamma, jnp.float32)}


def masked_layer_norm(x: jax.Array, mask: jax.Array, epsilon: float = 1e-12) -> jax.Array:
    """Normalise with one mean and variance over all unmasked positions of the whole batch (as AllenNLP and bilm-tf).

    x: (batch, time, dim); mask: (batch, time) bool -> (batch, time, dim).
    """
    m = mask[..., None].astype(x.dtype)
    count = jnp.sum(m) * x.shape[-1]
    mean = jnp.sum(x * m) / count
    variance = jnp.sum(((x - mean) * m) ** 2) / count
    return (x - mean) / jnp.sqrt(variance + epsilon)


def scalar_mix(params: dict, layers: jax.Array, mask: jax.Array | None = None, do_layer_norm: bool = False):
    """Mix representation layers.

    Args:
      params: {"weights": (n_layers,), "gamma": ()}.
      layers: (n_layers, batch, time, dim); mask: (batch, time) bool, needed for do_layer_norm.
    Returns:
      (batch, time, dim).
    """
    if do_layer_norm:
        if mask is None:
            raise ValueError("scalar_mix with do_layer_norm needs the mask")
        layers = jax.vmap(masked_layer_norm, in_axes=(0, None))(layers, mask)
    weights = jax.nn.softmax(params["weights"]).astype(layers.dtype)
    return params["gamma"].astype(layers.dtype) * jnp.einsum("l,lbtd->btd", weights, layers)
