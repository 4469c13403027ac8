"""Character encoder: char embedding, one convolution per filter width, max over characters, activation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATION_FUNCTIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}
SHORT_TOKEN_POSITIONS = 16  # <bow> + up to 14 bytes + <eow>: almost every word of running text


def short_token_chars(widths, max_chars: int) -> int:
    """Char positions that suffice for a short token: one whose ids from SHORT_TOKEN_POSITIONS on are all equal.

    Exact, not an approximation: a word's ids are <bow> bytes <eow> and then only padding ids. Every
    convolution window that starts at or after SHORT_TOKEN_POSITIONS sees the same ids, so it gives the
    same value as the window starting there, which lies within the first SHORT_TOKEN_POSITIONS + widest
    positions. The max over all positions is therefore the max over those, and the char CNN of a short
    token may skip the rest (more than half of its work at 50 positions).

    Args:
      widths: the convolutions' filter widths; max_chars: char positions per token.
    """
    return min(SHORT_TOKEN_POSITIONS + max(widths), max_chars)


def _convolve_and_pool(params: dict, char_ids: jax.Array, activation: str) -> jax.Array:
    """The char CNN over every position of char_ids (tokens, chars) -> (tokens, sum of n_filters)."""
    # the convolutions' dtype (the char embedding may stay float32 in a bfloat16 train step: a gather's gradient
    # then adds in float32, see trainer.GATHERED_TABLES)
    dtype = params["convolutions"][0]["kernel"].dtype
    embedded = jnp.take(params["char_embed"], char_ids, axis=0).astype(dtype)  # (tokens, chars, char_dim)
    act = ACTIVATION_FUNCTIONS[activation]
    pooled = []
    for conv in params["convolutions"]:
        # (tokens, chars - width + 1, n_filters); XLA's convolution (its gradient is 2x faster than im2col's)
        convolved = jax.lax.conv_general_dilated(embedded, conv["kernel"].astype(dtype), (1,), "VALID",
                                                 dimension_numbers=("NWC", "WIO", "NWC"))
        pooled.append(act(jnp.max(convolved, axis=1) + conv["bias"][None, :]))
    return jnp.concatenate(pooled, axis=-1)


def long_tokens(char_ids):
    """(..., max_chars) char ids -> (...,) bool: the tokens that are not short (see ``short_token_chars``).

    Works on numpy and jax arrays alike, so a host can count a batch's long tokens before a jitted call.
    """
    tail = char_ids[..., SHORT_TOKEN_POSITIONS:]
    return (tail != tail[..., :1]).any(axis=-1)


def char_cnn(params: dict, char_ids: jax.Array, activation: str, long_token_rows: int | None = None,
             long_token_groups: int = 1) -> jax.Array:
    """Convolve each token's character embeddings and max-pool over character positions.

    Args:
      params: {"char_embed": (n_characters, char_dim) with row 0 = zeros (padding id),
               "convolutions": [{"kernel": (width, char_dim, n_filters), "bias": (n_filters,)}, ...]}.
      char_ids: (tokens, max_chars) int32, +1 shifted ids (0 = masked).
      activation: "relu" or "tanh", applied after the max (as bilm-tf does).
      long_token_rows: None: convolve every token over every position. An int: the caller guarantees that
        at most this many tokens are long (``long_tokens``; count them on the host); short tokens are then
        convolved over their first ``short_token_chars`` positions only and the long ones over all, which
        gives the same values with less than half the work (the training step uses it; its gradient is
        as fast, which a lax.cond fallback inside jit would not be on the CPU).
      long_token_groups: the tokens are this many equal groups, one after another, and ``long_token_rows`` bounds
        each group's long tokens, which are picked within their group. Under jit over a mesh that splits the
        tokens into as many blocks (the trainer's batch split by rows over its devices), each device then
        picks and convolves its own; picked from all tokens, every device would convolve every long token.
    Returns:
      (tokens, sum of n_filters) float.
    """
    tokens, max_chars = char_ids.shape
    prefix = short_token_chars([conv["kernel"].shape[0] for conv in params["convolutions"]], max_chars)
    if long_token_rows is None or prefix == max_chars or long_token_rows >= tokens // long_token_groups:
        return _convolve_and_pool(params, char_ids, activation)
    pooled = _convolve_and_pool(params, char_ids[:, :prefix], activation)

    def long_ones(pooled, char_ids):  # one group's (n, ...): its long tokens convolved over every position
        n = char_ids.shape[0]
        # the long tokens' rows; unused slots hold index n, which reads the last row and writes nothing
        rows = jnp.nonzero(long_tokens(char_ids), size=long_token_rows, fill_value=n)[0]
        long_char_ids = jnp.take(char_ids, rows, axis=0, mode="clip")
        return pooled.at[rows].set(_convolve_and_pool(params, long_char_ids, activation), mode="drop")

    if long_token_groups == 1:
        return long_ones(pooled, char_ids)
    grouped = jax.vmap(long_ones)(pooled.reshape(long_token_groups, -1, pooled.shape[-1]),
                                  char_ids.reshape(long_token_groups, -1, max_chars))
    return grouped.reshape(tokens, -1)
