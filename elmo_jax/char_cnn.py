"""Character encoder: char embedding, one convolution per filter width, max over characters, activation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATION_FUNCTIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


def char_cnn(params: dict, char_ids: jax.Array, activation: str) -> jax.Array:
    """Convolve each token's character embeddings and max-pool over character positions.

    Args:
      params: {"char_embed": (n_characters, char_dim) with row 0 = zeros (padding id),
               "convolutions": [{"kernel": (width, char_dim, n_filters), "bias": (n_filters,)}, ...]}.
      char_ids: (tokens, max_chars) int32, +1 shifted ids (0 = masked).
      activation: "relu" or "tanh", applied after the max (as bilm-tf does).
    Returns:
      (tokens, sum of n_filters) float.
    """
    embedded = jnp.take(params["char_embed"], char_ids, axis=0)  # (tokens, max_chars, char_dim)
    _, max_chars, _ = embedded.shape
    act = ACTIVATION_FUNCTIONS[activation]
    pooled = []
    for conv in params["convolutions"]:
        width, char_dim, n_filters = conv["kernel"].shape
        # im2col: every window of `width` characters as one row, so the convolution is one matmul.
        windows = jnp.concatenate([embedded[:, k : max_chars - width + 1 + k] for k in range(width)], axis=-1)
        # windows: (tokens, max_chars - width + 1, width * char_dim)
        convolved = windows @ conv["kernel"].reshape(width * char_dim, n_filters)
        pooled.append(act(jnp.max(convolved, axis=1) + conv["bias"]))
    return jnp.concatenate(pooled, axis=-1)
