"""A slow float64 numpy biLM written the obvious way (loops over tokens and time), for tests only.

It shares nothing with the package except the char ids of a token, which tests/test_characters.py
checks on its own.
"""

import numpy as np

from elmo_jax.characters import BOS_TOKEN, EOS_TOKEN, token_to_char_ids


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def token_vector(params, options, token: str) -> np.ndarray:
    """(projection_dim,) for one token."""
    p = {k: v for k, v in params.items()}
    ids = token_to_char_ids(token, options.char_cnn.max_characters_per_token)
    chars = np.asarray(p["char_embed"], np.float64)[ids]  # (max_chars, char_dim)
    pooled = []
    for conv in p["convolutions"]:
        kernel = np.asarray(conv["kernel"], np.float64)
        width = kernel.shape[0]
        best = None
        for start in range(len(ids) - width + 1):
            value = np.einsum("wc,wcn->n", chars[start : start + width], kernel)
            best = value if best is None else np.maximum(best, value)
        best = best + np.asarray(conv["bias"], np.float64)
        pooled.append(np.maximum(best, 0) if options.char_cnn.activation == "relu" else np.tanh(best))
    x = np.concatenate(pooled)
    for layer in p["highway"]:
        gate = sigmoid(x @ np.asarray(layer["carry"]["kernel"], np.float64) + layer["carry"]["bias"])
        transform = np.maximum(x @ np.asarray(layer["transform"]["kernel"], np.float64) + layer["transform"]["bias"], 0)
        x = gate * transform + (1 - gate) * x
    return x @ np.asarray(p["projection"]["kernel"], np.float64) + p["projection"]["bias"]


def lstm_run(cell, xs, cell_clip, proj_clip, h=None, c=None):
    """One direction over xs (time, in_dim) in the given order -> outputs (time, proj), final (h, c)."""
    kernel, bias, projection = (np.asarray(cell[k], np.float64) for k in ("kernel", "bias", "projection"))
    dim, proj = projection.shape
    h = np.zeros(proj) if h is None else h
    c = np.zeros(dim) if c is None else c
    outputs = []
    for x in xs:
        gates = np.concatenate([x, h]) @ kernel + bias
        i, j, f, o = np.split(gates, 4)
        c = sigmoid(f + 1.0) * c + sigmoid(i) * np.tanh(j)
        if cell_clip is not None:
            c = np.clip(c, -cell_clip, cell_clip)
        h = (sigmoid(o) * np.tanh(c)) @ projection
        if proj_clip is not None:
            h = np.clip(h, -proj_clip, proj_clip)
        outputs.append(h)
    return np.stack(outputs), (h, c)


def bilm_sentence(params, options, tokens) -> np.ndarray:
    """All layers for one sentence, stateless: (n_layers + 1, len(tokens) + 2, 2 * projection_dim)."""
    lstm = options.lstm
    x = np.stack([token_vector(params, options, t) for t in [BOS_TOKEN, *tokens, EOS_TOKEN]])
    layers = [np.concatenate([x, x], axis=-1)]
    forward_in, backward_in = x, x
    for layer in range(lstm.n_layers):
        fw, _ = lstm_run(params["lstm"]["forward"][layer], forward_in, lstm.cell_clip, lstm.proj_clip)
        bw_reversed, _ = lstm_run(params["lstm"]["backward"][layer], backward_in[::-1], lstm.cell_clip, lstm.proj_clip)
        bw = bw_reversed[::-1]
        if layer > 0 and lstm.use_skip_connections:
            fw, bw = fw + forward_in, bw + backward_in
        layers.append(np.concatenate([fw, bw], axis=-1))
        forward_in, backward_in = fw, bw
    return np.stack(layers)
