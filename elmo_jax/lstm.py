"""LSTM with projection and clipping (TF's LSTMCell with num_proj), masked, over lax.scan.

One step:
    gates = x @ kernel[:in] + h_prev @ kernel[in:] + bias         split into i, j, f, o
    c = sigmoid(f + 1.0) * c_prev + sigmoid(i) * tanh(j)          clipped to +-cell_clip
    h = (sigmoid(o) * tanh(c)) @ projection                       clipped to +-proj_clip
A padded step (mask False) keeps (h, c) and emits zeros, so a reverse scan starts each sentence's
backward pass at its own last token. An optional reset flag sets (h, c) before its step to the layer's
"reset_h" and "reset_c" params, or to zero without them: packed lanes (``embed.py``) run many sentences back to
back in one row and reset at each sentence's first step (to the state after the boundary token, which is the
same for every sentence: ``bilm.sentence_start_state``).
The input half of the gates is computed for all time steps in one matmul before the scan, and the scan
does only the recurrent half; or, ``fuse_inputs``, each step does ``[x, h_prev] @ kernel`` as one matmul, as
TF's LSTMCell does (faster for inference on a CPU with many rows); or, ``feature_major``, the same one matmul
with states and gates laid out (features, batch): ``kernel^T @ [x; h_prev]``, the weight the left operand, which
a CPU's GEMM runs up to ~1.8x faster for a large kernel and few rows. ``split_directions`` runs the two
directions of ``bidirectional_layer`` as separate ops in each step, which a CPU runs on two threads at once. A layer
whose inputs are tokens of a table may look each token's input half up (``token_input_gates``, computed once per
token; ``bidirectional_layer``'s ``input_gate_tables``): each step then multiplies only ``h_prev``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .sharding import varying_like

FORGET_BIAS = 1.0  # TF LSTMCell's default forget_bias; not stored in the weight files.
RESET_KEYS = ("reset_h", "reset_c")  # optional layer params: the state a reset flag sets (lstm_step)


class LSTMState(NamedTuple):
    """One layer, one direction (or directions stacked on a leading axis).

    h: (batch, projection_dim); c: (batch, dim).
    """

    h: jax.Array
    c: jax.Array


def zero_state(batch: int, dim: int, projection_dim: int, dtype=jnp.float32) -> LSTMState:
    """All-zero state of one layer, one direction: h (batch, projection_dim), c (batch, dim)."""
    return LSTMState(h=jnp.zeros((batch, projection_dim), dtype), c=jnp.zeros((batch, dim), dtype))


def split_kernel(params: dict) -> dict:
    """{"kernel": (..., in_dim + projection_dim, 4 * dim), "bias", "projection"} -> the same with "kernel" split
    into "input_kernel" (..., in_dim, 4 * dim) and "recurrent_kernel" (..., projection_dim, 4 * dim).

    Call it outside jit when a layer runs many times (``embed.Embedder`` does): a slice of the kernel taken
    inside a jitted scan can be copied on every step (13 ms a step at 2x4096 on the 2-core CPU).
    """
    projection_dim = params["projection"].shape[-1]
    kernel = params["kernel"]
    rest = {k: v for k, v in params.items() if k != "kernel"}
    return {**rest, "input_kernel": kernel[..., :-projection_dim, :],
            "recurrent_kernel": kernel[..., -projection_dim:, :]}


def feature_major_kernels(params: dict) -> dict:
    """``split_kernel``'s params (e.g. ``stack_directions``') -> the same plus "kernel_t" (..., 4 * dim, in_dim +
    projection_dim) and "projection_t" (..., projection_dim, dim): the whole kernel and the projection transposed,
    for ``bidirectional_layer(feature_major=True)``. numpy in, numpy out: done once, outside jit (a transpose inside
    a jitted call copies the kernel on every call)."""
    names = ("input_kernel", "recurrent_kernel", "projection")
    xp = np if all(isinstance(params[k], np.ndarray) for k in names) else jnp
    kernel = xp.concatenate([params["input_kernel"], params["recurrent_kernel"]], axis=-2)
    return {**params, "kernel_t": xp.swapaxes(kernel, -1, -2),
            "projection_t": xp.swapaxes(params["projection"], -1, -2)}


def _input_kernel(params: dict, in_dim: int) -> jax.Array:
    return params["input_kernel"] if "input_kernel" in params else params["kernel"][..., :in_dim, :]


def input_gates(params: dict, xs: jax.Array) -> jax.Array:
    """The input half of the gates for every time step at once.

    xs (..., batch, time, in_dim) -> (..., batch, time, 4 * dim).

    params: lstm_layer params, with "kernel" or with ``split_kernel``'s "input_kernel".
    """
    in_dim = xs.shape[-1]
    gates = jnp.einsum("...bti,...ig->...btg", xs, _input_kernel(params, in_dim))
    return gates + params["bias"][..., None, None, :]


def token_input_gates(params: dict, vectors: jax.Array) -> jax.Array:
    """The input half of the gates, bias included, of tokens: what each step reading the token adds to
    ``h_prev @ recurrent_kernel``. For the first layer of packed lanes (``bidirectional_layer``'s
    ``input_gate_tables``), computed once per token instead of once per time step.

    params: one direction of one layer (lstm_layer's, or ``split_kernel``'s); vectors: (tokens, in_dim) ->
    (tokens, 4 * dim).
    """
    return vectors @ _input_kernel(params, vectors.shape[-1]) + params["bias"][None, :]


def lstm_step(params: dict, state: LSTMState, inputs: tuple, *, cell_clip, proj_clip):
    """One time step.

    inputs = (x_gates (..., batch, 4 * dim), mask (..., batch)) or (x_gates, mask, reset (..., batch)) ->
    (state, h (..., batch, projection_dim)); where reset is True the step starts from params["reset_h"] (...,
    projection_dim) and params["reset_c"] (..., dim) where given, else from zero state. When
    ``params`` holds the whole "kernel" (..., in_dim + projection_dim, 4 * dim) and "bias", inputs[0] is the
    layer input x (..., batch, in_dim) and the step computes its gates as ``[x, h_prev] @ kernel + bias``
    (``bidirectional_layer(fuse_inputs=True)``); otherwise ``params["recurrent_kernel"]`` (..., projection_dim,
    4 * dim) and the gates are ``x_gates + h_prev @ recurrent_kernel``. With "kernel_t", "bias" and
    "projection_t" (``feature_major_kernels``) everything is feature-major: x (..., in_dim, batch), state h
    (..., projection_dim, batch) and c (..., dim, batch), gates ``kernel_t @ [x; h_prev] + bias``, and h out
    (..., projection_dim, batch); mask and reset stay (..., batch).

    params["projection"]: (..., dim, projection_dim). Leading axes (e.g. two stacked directions) broadcast through.
    """
    x, mask, *reset = inputs
    feature_major = "kernel_t" in params
    per_row = (lambda a: a[..., None, :]) if feature_major else (lambda a: a[..., None])  # (..., batch) broadcast
    per_feature = (lambda a: a[..., :, None]) if feature_major else (lambda a: a[..., None, :])  # (..., features)
    if reset:
        keep_state = per_row(jnp.logical_not(reset[0]))
        start_h, start_c = (per_feature(params[k]) if k in params else 0 for k in RESET_KEYS)  # what a reset sets
        state = LSTMState(h=jnp.where(keep_state, state.h, start_h), c=jnp.where(keep_state, state.c, start_c))
    if feature_major:
        gates = params["kernel_t"] @ jnp.concatenate([x, state.h], axis=-2) + params["bias"][..., :, None]
    elif "kernel" in params:
        gates = jnp.concatenate([x, state.h], axis=-1) @ params["kernel"] + params["bias"][..., None, :]
    else:
        gates = x + state.h @ params["recurrent_kernel"]
    i, j, f, o = jnp.split(gates, 4, axis=-2 if feature_major else -1)
    c = jax.nn.sigmoid(f + FORGET_BIAS) * state.c + jax.nn.sigmoid(i) * jnp.tanh(j)
    if cell_clip is not None:
        c = jnp.clip(c, -cell_clip, cell_clip)
    cell_out = jax.nn.sigmoid(o) * jnp.tanh(c)
    h = params["projection_t"] @ cell_out if feature_major else cell_out @ params["projection"]
    if proj_clip is not None:
        h = jnp.clip(h, -proj_clip, proj_clip)
    keep = per_row(mask)
    new_state = LSTMState(h=jnp.where(keep, h, state.h), c=jnp.where(keep, c, state.c))
    return new_state, jnp.where(keep, h, jnp.zeros_like(h))


def _recurrent_params(params: dict) -> dict:
    if "recurrent_kernel" in params:
        return {"recurrent_kernel": params["recurrent_kernel"], "projection": params["projection"]}
    projection_dim = params["projection"].shape[-1]
    return {"recurrent_kernel": params["kernel"][..., -projection_dim:, :], "projection": params["projection"]}


def lstm_layer(params: dict, xs: jax.Array, mask: jax.Array, state: LSTMState, *, cell_clip=None, proj_clip=None,
               reverse: bool = False) -> tuple[jax.Array, LSTMState]:
    """One layer, one direction over a batch of sequences.

    Args:
      params: {"kernel": (in_dim + projection_dim, 4 * dim), "bias": (4 * dim,), "projection": (dim, projection_dim)}.
      xs: (batch, time, in_dim); mask: (batch, time) bool; state: LSTMState of (batch, ...).
      reverse: run from the last time step to the first (the backward LM).
    Returns:
      ys (batch, time, projection_dim) with zeros at masked steps, and the final state.
    Same as: for t in range(time) (reversed if reverse): state, ys[:, t] = lstm_step(..., (x_gates[:, t], mask[:, t]))
    """
    x_gates = input_gates(params, xs)  # (batch, time, 4 * dim)
    step = functools.partial(lstm_step, _recurrent_params(params), cell_clip=cell_clip,
                             proj_clip=proj_clip)
    state = varying_like(state, xs)  # shard_map: the carry varies by device as the inputs do
    state, ys = jax.lax.scan(step, state, (x_gates.swapaxes(0, 1), mask.T), reverse=reverse)  # time-major only here
    return ys.swapaxes(0, 1), state


def stack_directions(forward: dict, backward: dict) -> dict:
    """One layer's forward and backward lstm_layer params -> ``split_kernel``'s keys with a leading axis of 2.

    numpy in, numpy out: stacking weights read from a file before they go to the devices compiles nothing (the
    eager jnp ops took ~0.25 s of an ``Embedder``'s start)."""

    def stack(a, b):
        return np.stack([a, b]) if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp.stack([a, b])

    return split_kernel(jax.tree.map(stack, forward, backward))


def bidirectional_layer(layer: dict, xs: tuple[jax.Array, jax.Array], mask: jax.Array,
                        state: tuple[LSTMState, LSTMState], *, cell_clip=None, proj_clip=None,
                        backward_aligned: bool = False, reset: jax.Array | None = None, fuse_inputs: bool = False,
                        feature_major: bool = False, split_directions: bool = False,
                        input_gate_tables: tuple[jax.Array, jax.Array] | None = None):
    """Forward and backward directions of one layer in a single scan.

    The two directions' weights are stacked on a leading axis (``stack_directions``, done once by the
    caller, since inside a jitted call it would copy every weight on every call), so each scan step does
    one batched matmul for both directions. By default the backward inputs are flipped in time; padded steps keep
    the state, so flipping the whole padded time axis still starts each backward pass at its
    sentence's last token. With ``backward_aligned`` the caller has already reversed each sentence's
    backward inputs within its own length (left-aligned, the same mask as forward) and gets the
    backward outputs in that order: then every row is active exactly on a prefix of the time axis in
    both directions, which lets ``embed.py`` drop finished rows block by block.

    Args:
      layer: stack_directions(forward params, backward params), e.g. "recurrent_kernel" (2, projection_dim, 4 * dim).
      xs: (forward inputs, backward inputs), each (batch, time, in_dim).
      mask: (batch, time) bool.
      state: (forward LSTMState, backward LSTMState).
      reset: None, or (batch, time) bool: set both directions' state to layer["reset_h"], ["reset_c"] (2, ...)
        where given, else zero it, before these steps (with
        ``backward_aligned``, where the packed lanes of ``embed.py`` start a new sentence).
      fuse_inputs: compute the gates inside each step as ``[x, h_prev] @ kernel``, one matmul per step,
        instead of the input half for all steps before the scan. The same numbers (to float rounding); on a
        CPU faster for inference with 64 rows or more (the hoisted gates are a (2, batch, time, 4 * dim)
        buffer written, transposed and read again), slower with few.
      feature_major: the fused step with states and gates as (features, batch) inside the scan (see
        ``lstm_step``; ``layer`` may hold ``feature_major_kernels``' transposed weights, else they are transposed
        here). The same numbers (to float rounding); on a 2-core CPU, 2x4096 at 32 rows a step 1.8x faster than
        the fastest batch-major step, 1.2x at 128; 0.9x for the built-in model's small kernel at 256 rows.
      split_directions: each scan step runs the two directions as separate ops (their weights sliced once, before
        the scan) instead of batched ones. The same numbers (bit for bit on the CPU here). A CPU runs each
        elementwise fusion (the gates' sigmoids and tanhs, the state update) on one thread, and independent ops at
        once: split, the two directions' elementwise work runs on two cores (the built-in model's layer, fused:
        10-18% faster at 32-128 rows, ~8% at 256; 2x4096 feature-major at 32 rows: 10% slower).
      input_gate_tables: None, or (forward, backward) each (tokens, 4 * dim): the input half of the gates of every
        token (``token_input_gates``); ``xs`` are then the two directions' token indices, each (batch, time) int32,
        and each step looks its gates up and multiplies only ``h_prev`` (batch-major). The same numbers (to float
        rounding); on a CPU the built-in model's first layer at 256 rows ~30% faster than fused (half its kernel
        is the input's). A token's gates are computed once, not once per step that reads it.
    Returns:
      (forward ys, backward ys), each (batch, time, projection_dim), and (forward state, backward state).
    Same as: lstm_layer(forward, xs[0], ...) and lstm_layer(backward, xs[1], ..., reverse=True).
    """
    flip = (lambda a: a) if backward_aligned else (lambda a: jnp.flip(a, axis=1))
    inputs = jnp.stack([xs[0], flip(xs[1])])  # (2, batch, time, in_dim)
    masks = jnp.stack([mask, flip(mask)])  # (2, batch, time)
    state = varying_like(jax.tree.map(lambda a, b: jnp.stack([a, b]), state[0], state[1]), inputs)
    step_params = _recurrent_params(layer)
    if input_gate_tables is not None:
        if feature_major:
            raise ValueError("input_gate_tables needs batch-major steps (feature_major=False)")
        scanned = (jnp.moveaxis(inputs, 2, 0),)  # token indices, time-major: (time, 2, batch)
    elif feature_major:
        if "kernel_t" not in layer:
            layer = feature_major_kernels(layer)
        step_params = {"kernel_t": layer["kernel_t"], "bias": layer["bias"], "projection_t": layer["projection_t"]}
        scanned = (jnp.transpose(inputs, (2, 0, 3, 1)),)  # (time, 2, in_dim, batch)
        state = LSTMState(state.h.swapaxes(-1, -2), state.c.swapaxes(-1, -2))  # (2, features, batch)
    elif fuse_inputs:  # the whole kernel, put together once a call, not once a step
        kernel = jnp.concatenate([_input_kernel(layer, inputs.shape[-1]), step_params.pop("recurrent_kernel")], -2)
        step_params.update(kernel=kernel, bias=layer["bias"])
        scanned = (jnp.moveaxis(inputs, 2, 0),)  # time-major: (time, 2, batch, in_dim)
    else:
        scanned = (jnp.moveaxis(input_gates(layer, inputs), 2, 0),)  # (time, 2, batch, 4 * dim)
    scanned += (jnp.moveaxis(masks, 2, 0),)
    step_params.update({k: layer[k] for k in RESET_KEYS if k in layer})
    if reset is not None:
        scanned += (jnp.moveaxis(jnp.stack([reset, flip(reset)]), 2, 0),)
    if split_directions:
        return _split_scan(step_params, state, scanned, cell_clip, proj_clip, feature_major, flip, input_gate_tables)
    step = functools.partial(lstm_step, step_params, cell_clip=cell_clip, proj_clip=proj_clip)
    if input_gate_tables is not None:
        step = functools.partial(_looked_up_step, step, input_gate_tables)
    state, ys = jax.lax.scan(step, state, scanned)
    if feature_major:
        ys = jnp.transpose(ys, (1, 3, 0, 2))  # (time, 2, projection_dim, batch) -> (2, batch, time, projection_dim)
        state = LSTMState(state.h.swapaxes(-1, -2), state.c.swapaxes(-1, -2))
    else:
        ys = jnp.moveaxis(ys, 0, 2)  # (2, batch, time, projection_dim)
    states = (LSTMState(state.h[0], state.c[0]), LSTMState(state.h[1], state.c[1]))
    return (ys[0], flip(ys[1])), states


def _looked_up_step(step, input_gate_tables, state: LSTMState, inputs: tuple):
    """``step`` (an ``lstm_step``) whose inputs[0] are (2, batch) token indices into (forward, backward)
    ``input_gate_tables``: their gates are looked up first."""
    gates = jnp.stack([jnp.take(table, rows, axis=0) for table, rows in zip(input_gate_tables, inputs[0])])
    return step(state, (gates, *inputs[1:]))


def _split_scan(step_params: dict, state: LSTMState, scanned: tuple, cell_clip, proj_clip, feature_major: bool, flip,
                input_gate_tables=None):
    """``bidirectional_layer``'s scan with each direction's step as its own ops (``split_directions``).

    step_params, state: the stacked directions' (leading axis 2); scanned: time-major (time, 2, ...) inputs;
    input_gate_tables: as for ``bidirectional_layer``. Returns what ``bidirectional_layer`` returns."""
    params = [jax.tree.map(lambda a: a[d], step_params) for d in range(2)]  # sliced once, outside the loop

    def direction_inputs(inputs, d):
        x, *rest = (a[d] for a in inputs)
        return (x if input_gate_tables is None else jnp.take(input_gate_tables[d], x, axis=0), *rest)

    def step(states, inputs):
        new, outs = zip(*(lstm_step(params[d], states[d], direction_inputs(inputs, d),
                                    cell_clip=cell_clip, proj_clip=proj_clip) for d in range(2)))
        return new, outs

    states = tuple(LSTMState(state.h[d], state.c[d]) for d in range(2))
    states, ys = jax.lax.scan(step, states, scanned)
    if feature_major:  # (time, projection_dim, batch) -> (batch, time, projection_dim)
        ys = [jnp.transpose(y, (2, 0, 1)) for y in ys]
        states = tuple(LSTMState(s.h.T, s.c.T) for s in states)
    else:  # (time, batch, projection_dim) -> (batch, time, projection_dim)
        ys = [y.swapaxes(0, 1) for y in ys]
    return (ys[0], flip(ys[1])), states
