"""Pretraining (and fine-tuning) a biLM as bilm-tf does: state, one jitted train step, the loop, checkpoints.

Phases of ``Trainer.__init__``: mesh -> data -> run dir -> init (or fine-tuning init) -> checkpoints
(resume) -> step. ``Trainer.train`` is the loop: batch -> step -> log -> checkpoint.

Data parallelism is ``jax.jit`` over a one-axis Mesh ("data"): batches and the carried LSTM state are
split by rows (``P("data")``), params and optimiser state are replicated (but for a split softmax, below); XLA
inserts the gradient all-reduce. The same code runs on one CPU, simulated CPU devices, one GPU or several hosts.

The softmax gradient is row-sparse (``RowSparse``: the rows a step touches, see ``train_step``), so
neither its update nor its all-reduce grows with the vocabulary. By default the softmax table and its Adagrad
accumulator are replicated: 2 * n_tokens_vocab * projection_dim * 4 bytes on every device, 3.3 GB for
the published 793,471 x 512, so a 16 GB device holds the softmax of about 2.5 million words at P = 512 next
to a 2x4096_512 biLM. ``TrainConfig.shard_softmax`` (``--shard-softmax``) splits them by rows over the mesh's
devices instead (padded with zero rows to a multiple of SOFTMAX_ROW_BLOCK): each device holds 1/n of them, so n
such devices hold about n * 2.5 million words. XLA then gathers a step's rows with one all-reduce of those rows
(each device contributes the ones it holds) and updates each row where it lives: the same numbers as replicated.

Multi-host: call ``initialize_distributed()`` (``--distributed``) first in every process; it runs
``jax.distributed.initialize()``, which reads the coordinator address, process count and index from
the cluster environment (SLURM, Open MPI, Kubernetes, Cloud TPU), or from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID.
Every host follows the same deterministic stream and builds only its own rows of each global batch, the
rows that the batch sharding's index map puts on its devices (``host_rows``), so the global batch is
identical to a single-host run's. The run directory must be on shared storage.

Checkpoints hold the data stream's cursor next to the state (item "data", ``data.Batches.get_state``), so a
resume starts reading at once whatever the step. A checkpoint written before cursors existed is still
resumed exactly, by replaying the stream up to its data position (this says so in one line).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ..bilm import COMPUTE_DTYPES
from ..char_cnn import long_tokens
from ..options import BiLMOptions
from ..sharding import by_batch as batch_sharding
from ..sharding import data_mesh, put_global, round_up, varying_like
from ..sharding import replicated as replicated_sharding
from .data import Batches, LMDataset, load_vocabulary
from .loss import gather_softmax, init_train_params, initial_lm_state, softmax_candidates, train_loss


# a sharded softmax's rows: the vocabulary rounded up to a multiple of this, so that any power-of-two number of
# devices up to it splits them evenly whatever the device count a run resumes on (at P = 512: 8 MB at most)
SOFTMAX_ROW_BLOCK = 4096


class TrainError(RuntimeError):
    """A training run cannot start or continue (run dir, resume, non-finite loss, batch size)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides its run directory; saved with every checkpoint.

    ``n_steps=None`` trains bilm-tf's length: n_epochs * n_train_tokens / (batch_size * unroll_steps).
    ``clip_norm=None`` uses options.training.all_clip_norm_val. ``init_weights``: an HDF5 biLM to
    fine-tune from (the softmax starts fresh). ``compute_dtype``: "float32", or "bfloat16" for the
    forward and backward pass (params, optimiser state, carried LSTM state and the loss stay float32).
    ``shard_softmax``: the softmax and its Adagrad accumulator split by rows over the devices (see the module
    docstring), not replicated; the same numbers.
    """

    options: BiLMOptions
    train_prefix: str
    vocab_file: str
    learning_rate: float = 0.2
    initial_accumulator_value: float = 1.0
    clip_norm: float | None = None
    seed: int = 0
    n_steps: int | None = None
    log_every: int = 100
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    init_weights: str | None = None
    compute_dtype: str = "float32"
    shard_softmax: bool = False

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise TrainError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, found {self.compute_dtype!r}")

    def total_steps(self) -> int:
        """Steps of the whole run: ``n_steps``, else n_epochs * n_train_tokens // (batch_size * unroll_steps), at
        least 1; TrainError if neither is known."""
        if self.n_steps is not None:
            return self.n_steps
        t = self.options.training
        if t.n_train_tokens is None:
            raise TrainError("set n_steps (--steps) or the options' n_train_tokens to know how long to train")
        return max(1, t.n_epochs * t.n_train_tokens // (t.batch_size * t.unroll_steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field; ``options`` as an options.json dict with the training fields."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out["options"] = self.options.to_dict(include_training=True)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        """Inverse of ``to_dict``; ``source`` names the file in OptionsError messages."""
        raw = dict(raw)
        options = BiLMOptions.from_dict(raw.pop("options"), source=source)
        return cls(options=options, **raw)


class TrainState(NamedTuple):
    """The whole state of a run; a checkpoint holds all of it.

    params: biLM params plus "softmax"; opt_state: optax state; step: () int32;
    lstm_state: carried LSTM state {"forward": [LSTMState (batch, ...)], "backward": [...]};
    data_position: () int32, batches read from the stream; key: (2,) uint32 base key (step keys are fold_in(key, step)).
    """

    params: dict
    opt_state: Any
    step: jax.Array
    lstm_state: dict
    data_position: jax.Array
    key: jax.Array


def _optimizer_settings(config: TrainConfig) -> tuple[float, float, float]:
    clip = config.clip_norm if config.clip_norm is not None else config.options.training.all_clip_norm_val
    return config.learning_rate, config.initial_accumulator_value, clip


# ---------------------------------------------------------------- the optimiser, with row-sparse softmax gradients


class RowSparse(NamedTuple):
    """A gradient or update of a (V, ...) array that is zero outside some rows (TF's IndexedSlices).

    ids: (n,) int32 distinct row indices; an id >= V pads (read as zeros, dropped on write).
    rows: (n, ...) the values of those rows.
    """

    ids: jax.Array
    rows: jax.Array


def _is_sparse(x) -> bool:
    return isinstance(x, RowSparse)


def _map_values(fn, tree):
    """fn on every dense leaf and on the rows of every RowSparse leaf."""
    return jax.tree.map(lambda t: RowSparse(t.ids, fn(t.rows)) if _is_sparse(t) else fn(t), tree, is_leaf=_is_sparse)


def global_norm(tree) -> jax.Array:
    """optax.tree.norm of the dense tree that ``tree`` stands for: a RowSparse leaf's other rows are zeros."""
    return optax.tree.norm(jax.tree.map(lambda t: t.rows if _is_sparse(t) else t, tree, is_leaf=_is_sparse))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same formula and state) for trees that may hold RowSparse leaves."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        trigger = norm < max_norm
        return _map_values(lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_rss(initial_accumulator_value: float, eps: float = 0.0) -> optax.GradientTransformation:
    """optax.scale_by_rss (same formula and state) for trees that may hold RowSparse leaves.

    A RowSparse gradient reads and writes only its rows of the (V, ...) accumulator. This is exactly the
    dense update: a zero gradient row leaves its accumulator row as it is and gets a zero update.
    """

    def one(g, acc):
        if not _is_sparse(g):
            total = jnp.square(g) + acc
            return jnp.where(total > 0, jax.lax.rsqrt(total + eps), 0.0) * g, total
        total = jnp.square(g.rows) + acc.at[g.ids].get(mode="fill", fill_value=0)  # (n, ...)
        scaled = jnp.where(total > 0, jax.lax.rsqrt(total + eps), 0.0) * g.rows
        return RowSparse(g.ids, scaled), acc.at[g.ids].set(total, mode="drop")

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_sparse)
        pairs = [one(g, acc) for g, acc in zip(leaves, treedef.flatten_up_to(state.sum_of_squares))]
        return (treedef.unflatten([u for u, _ in pairs]),
                optax.ScaleByRssState(sum_of_squares=treedef.unflatten([acc for _, acc in pairs])))

    return optax.GradientTransformation(optax.scale_by_rss(initial_accumulator_value, eps).init, update)


def scale(step_size: float) -> optax.GradientTransformation:
    """optax.scale for trees that may hold RowSparse leaves."""

    def update(updates, state, params=None):
        del params
        return _map_values(lambda t: step_size * t, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def apply_updates(params: dict, updates: dict) -> dict:
    """optax.apply_updates where a RowSparse update adds to its rows only, in place (p + u there, as dense)."""

    def one(p, u):
        if _is_sparse(u):
            return p.at[u.ids].add(u.rows.astype(p.dtype), mode="drop")
        return jnp.asarray(p + u).astype(p.dtype)

    return jax.tree.map(one, params, updates)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then Adagrad (TF's: no epsilon, accumulator starts at initial_accumulator_value).

    optax.chain(clip_by_global_norm, adagrad) in numbers and state (checkpoints hold that state), and it also
    takes RowSparse gradients: the softmax rows a step touches are all it clips, accumulates and updates.
    Apply its updates with ``apply_updates``.
    """
    return _make_optimizer(*_optimizer_settings(config))


def _make_optimizer(learning_rate: float, initial_accumulator_value: float, clip: float):
    adagrad = optax.chain(scale_by_rss(initial_accumulator_value, eps=0.0), scale(-learning_rate))  # optax.adagrad
    return optax.chain(clip_by_global_norm(clip), adagrad)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


# params that the step only gathers rows of: kept float32 in a bfloat16 step, the gathered rows cast where they
# are used. A gather's gradient is a scatter-add, and on an H200 XLA's scatter-add ran 20x slower in bfloat16
# than in float32 (3.4 against 0.17 ms for one batch's 225,280 char positions into the char embedding's 262
# rows, where they collide). Casting the tables before gathering made the bfloat16 step of 2x4096_512 at the
# published vocabulary 1,726 ms there; gathering first, 22 ms (float32: 41 ms)
GATHERED_TABLES = ("char_embed", "word_embed", "softmax")


def _compute_params(params: dict, dtype) -> dict:
    """The params as the step computes with them: ``dtype``, but GATHERED_TABLES kept as they are."""
    return {name: value if name in GATHERED_TABLES else _cast(value, dtype) for name, value in params.items()}


def dense_train_step(state: TrainState, batch: dict, vocab_char_ids: jax.Array | None, *, options: BiLMOptions,
                     settings: tuple[float, float, float], long_token_rows: int | None = None):
    """The reference for ``train_step``'s row-sparse softmax: every param differentiated, the (V, P) softmax
    included, then optax's own clip and Adagrad over all of it (the update before the row-sparse one).

    The same numbers as ``train_step`` (tests/test_train.py), at a cost that grows with the vocabulary
    (benchmarks/bench_train.py --dense). settings: (learning rate, initial accumulator, clip norm).
    Returns the new state and {"loss", "grad_norm"}.
    """
    learning_rate, accumulator, clip = settings
    optimizer = optax.chain(optax.clip_by_global_norm(clip),
                            optax.adagrad(learning_rate, initial_accumulator_value=accumulator, eps=0.0))
    key = jax.random.fold_in(state.key, state.step)

    def objective(params):
        loss, (_, lstm_state) = train_loss(params, options, batch, state.lstm_state, key=key,
                                           vocab_char_ids=vocab_char_ids, long_token_rows=long_token_rows)
        return loss * options.training.unroll_steps, (loss, lstm_state)

    grads, (loss, lstm_state) = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                               step=state.step + 1, lstm_state=lstm_state, data_position=state.data_position + 1)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def train_step(state: TrainState, batch: dict, vocab_char_ids: jax.Array | None, *, options: BiLMOptions,
               optimizer: optax.GradientTransformation, long_token_rows: int | None = None,
               compute_dtype=jnp.float32, axis_name=None, long_token_groups: int = 1) -> tuple[TrainState, dict]:
    """One window: sampled-softmax loss, gradients, clip, Adagrad; carries the LSTM state.

    The softmax's cost does not grow with the vocabulary: only the rows the step touches (its targets and
    negatives, at most directions * (batch * unroll_steps + n_negative_samples_batch)) are gathered,
    differentiated (a RowSparse gradient; under data parallelism, the all-reduce carries those rows only),
    clipped with the rest and updated with their Adagrad accumulator rows. Same numbers as the dense update.

    Args:
      batch: arrays of (batch, unroll_steps[, max_chars]) (see data.LMDataset.batches).
      vocab_char_ids: (n_tokens_vocab, max_chars) when the softmax is tied to the token embeddings, else None.
      optimizer: make_optimizer's (its updates may be RowSparse).
      long_token_rows: None, or a bound on the batch's long tokens (see ``long_token_bound``); with
        ``long_token_groups``, on those of each of that many equal blocks of rows (under jit over a mesh, its
        devices: ``long_token_bounds(..., groups)``), so that each device picks and convolves its own.
      compute_dtype: the LMs and the softmax logits run in it (a float32 copy of the params is what is
        updated, so small updates are not rounded away); the loss is reduced in float32. The tables it gathers
        rows of (GATHERED_TABLES) are gathered in float32, so their gradients add in float32.
      axis_name: None under jit (over a mesh or not). Inside a user's ``jax.pmap`` or ``jax.shard_map`` that
        splits the batch over devices, that axis's name: ``batch`` and ``state.lstm_state`` are then this
        device's rows (``long_token_rows`` bounds its tokens), the rest of the state is replicated. The step is
        then the jit step over the whole batch, within float rounding:
        - the softmax candidates are the whole batch's on every device (its targets all-gathered, the negatives
          drawn from the shared key), so the RowSparse softmax gradient has the same ids everywhere;
        - the dropout masks are this device's rows of the whole batch's (``loss.batch_dropout``);
        - gradients (dense, and the softmax rows) and metrics are averaged with ``lax.pmean``: every device has
          as many tokens (windows are full), so the mean of the devices' mean losses is the whole batch's.
        Every device applies the same update, so params and optimiser state stay replicated.
    Returns:
      the new state and metrics {"loss", "forward_loss", ["backward_loss"], "grad_norm"} (scalars).
    """
    key = jax.random.fold_in(state.key, state.step)
    if axis_name is None:
        candidates = softmax_candidates(options, batch, key)
    else:
        candidates = _whole_batch_candidates(options, batch, key, axis_name)
    dense = {name: value for name, value in state.params.items() if name != "softmax"}
    rows = gather_softmax(state.params["softmax"], candidates.ids)  # {"W": (n, P), "b": (n,)}
    if axis_name is not None:
        dense, rows = varying_like((dense, rows), batch["next_token_id"])  # each device its own gradient

    def objective(dense, rows):
        params = _compute_params({**dense, "softmax": rows}, compute_dtype)
        loss, (losses, lstm_state) = train_loss(params, options, batch, _cast(state.lstm_state, compute_dtype),
                                                key=key, vocab_char_ids=vocab_char_ids,
                                                long_token_rows=long_token_rows,
                                                long_token_groups=long_token_groups, candidates=candidates,
                                                axis_name=axis_name)
        # bilm-tf differentiates loss * unroll_steps (a per-sequence rather than per-token scale).
        return loss * options.training.unroll_steps, (loss, (losses, _cast(lstm_state, jnp.float32)))

    (grads, row_grads), (loss, (losses, lstm_state)) = jax.grad(objective, argnums=(0, 1), has_aux=True)(dense, rows)
    if axis_name is not None:  # this device's rows' gradients and losses -> the whole batch's
        grads, row_grads, loss, losses = jax.lax.pmean((grads, row_grads, loss, losses), axis_name)
    grads["softmax"] = {name: RowSparse(candidates.ids, g) for name, g in row_grads.items()}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    metrics = {"loss": loss, **{f"{d}_loss": v for d, v in losses.items()}, "grad_norm": global_norm(grads)}
    new_state = TrainState(params, opt_state, state.step + 1, lstm_state, state.data_position + 1, state.key)
    return new_state, metrics


def _whole_batch_candidates(options: BiLMOptions, batch: dict, key: jax.Array, axis_name):
    """softmax_candidates (a loss.Candidates) of the whole batch, whose rows are split over ``axis_name``, with
    this device's labels.

    Every device gets the same ids, negatives and slots as the jit step over the whole batch; labels and
    label_slots are this device's rows of them (rows in axis_index order, as the mesh orders them).
    """
    names = [name for name in ("next_token_id", "next_token_id_reverse") if name in batch]
    whole = softmax_candidates(options, {name: _whole_batch(batch[name], axis_name) for name in names}, key)
    n = batch["next_token_id"].size  # this device's tokens per direction
    start = jax.lax.axis_index(axis_name) * n
    mine = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=n, axis=1)
    return whole._replace(labels=mine(whole.labels), label_slots=mine(whole.label_slots))


def _whole_batch(x: jax.Array, axis_name) -> jax.Array:
    """This device's rows (rows, ...) -> the whole batch's (devices * rows, ...), the same on every device.

    A psum of each device's rows put in place (an all-gather that shard_map knows to be replicated, so the
    softmax ids it yields may update replicated params); exact for the integer ids it carries.
    """
    rows = x.shape[0]
    whole = jnp.zeros((rows * jax.lax.psum(1, axis_name), *x.shape[1:]), x.dtype)
    return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(whole, x, jax.lax.axis_index(axis_name) * rows, 0),
                        axis_name)


def softmax_table_rows(options: BiLMOptions, shard_softmax: bool) -> int:
    """The softmax table's rows: the vocabulary's, or for a sharded softmax those rounded up to SOFTMAX_ROW_BLOCK."""
    n_vocab = options.training.n_tokens_vocab
    if n_vocab is None:
        raise TrainError("options lack 'n_tokens_vocab': training needs the vocabulary size for the softmax")
    return round_up(n_vocab, SOFTMAX_ROW_BLOCK) if shard_softmax else n_vocab


def state_shardings(state: TrainState, mesh: Mesh, shard_softmax: bool = False) -> TrainState:
    """Where each part of a TrainState (arrays or shapes) lives on the mesh: the LSTM carry split by rows of the
    batch; the softmax tables and their Adagrad accumulators split by rows if ``shard_softmax``; the rest
    replicated."""
    replicated, by_rows = replicated_sharding(mesh), batch_sharding(mesh)

    def place(path, _):
        in_softmax = any(getattr(key, "key", None) == "softmax" for key in path)
        return by_rows if shard_softmax and in_softmax else replicated

    return TrainState(jax.tree_util.tree_map_with_path(place, state.params),
                      jax.tree_util.tree_map_with_path(place, state.opt_state), replicated,
                      jax.tree.map(lambda _: by_rows, state.lstm_state), replicated, replicated)


def _compiled(options: BiLMOptions, optimizer_settings: tuple, mesh: Mesh, compute_dtype: str = "float32",
              shard_softmax: bool = False):
    """init(key, bilm_params | None) -> TrainState placed on the mesh, and
    step(state, batch, vocab_char_ids, long_token_rows=None), the jitted train step (one compiled program per
    long_token_rows), for one (options, optimiser, mesh, compute dtype, softmax placement).
    """
    optimizer = _make_optimizer(*optimizer_settings)
    replicated, by_batch = replicated_sharding(mesh), batch_sharding(mesh)
    unplaced = _init_fn(options, optimizer_settings, softmax_table_rows(options, shard_softmax))
    shardings = state_shardings(jax.eval_shape(unplaced, jax.random.PRNGKey(0), None), mesh, shard_softmax)
    placed = jax.jit(unplaced.__wrapped__, out_shardings=shardings)

    def init(key, bilm_params):
        if jax.process_count() == 1 and not shard_softmax:  # one compiled init for every mesh; placing is a copy
            return jax.device_put(unplaced(key, bilm_params), shardings)
        # multi-host: every process computes the same replicated values; a split softmax is made where it lives,
        # never whole on one device
        return placed(key, bilm_params)

    programs = {}  # long_token_rows -> the jitted step for it

    def program(long_token_rows=None):
        """The jitted step for one long-token bound (each device bounds and convolves its own rows' long tokens)."""
        if long_token_rows not in programs:
            one = functools.partial(train_step, options=options, optimizer=optimizer, long_token_rows=long_token_rows,
                                    compute_dtype=COMPUTE_DTYPES[compute_dtype], long_token_groups=mesh.size)
            programs[long_token_rows] = jax.jit(one, in_shardings=(shardings, by_batch, replicated),
                                                out_shardings=(shardings, replicated), donate_argnums=0)
        return programs[long_token_rows]

    def step(state, batch, vocab_char_ids, long_token_rows=None):
        return program(long_token_rows)(state, batch, vocab_char_ids)

    step.program = program

    # {long_token_rows: times its program was compiled}: once each while the state keeps its types
    step.compilations = lambda: {rows: program._cache_size() for rows, program in programs.items()}
    return init, step


# batches whose long-token bounds the hosts agree on in one all-gather (BoundedBatches): a gloo all-gather costs
# ~1.5 ms on the CPU, as much as building a batch of 32 rows (bench_resume.py host-data); 64 batches read ahead
# are a few MB
BOUNDS_AHEAD = 64


def long_token_bounds(batches: list[dict[str, np.ndarray]], row_groups: np.ndarray | None = None,
                      groups: int = 1) -> list[int | None]:
    """The bound on long tokens that the train step of each global batch may use, or None for none.

    1/16 of each group's tokens (both streams, at least 8) when no group has more long tokens than that
    (almost always in running text), so the char CNN convolves the short ones over their first positions only
    (``char_cnn.char_cnn``); None otherwise. The groups are equal blocks of the global batch's rows, one a
    device of the step's mesh (``train_step``'s ``long_token_groups``), so each device convolves its own long
    tokens. Each of ``batches`` is this process's rows (numpy), row i in group ``row_groups[i]`` (default:
    all in one): with several processes each counts its own rows and all take the sums, in one small all-gather
    for all the batches given, so every host compiles and runs the same programs.
    """
    counts = np.zeros((len(batches), groups, 2), np.int32)  # (batches, groups, (tokens, long tokens))
    for i, batch in enumerate(batches):
        streams = [batch[name] for name in ("char_ids", "char_ids_reverse") if name in batch]  # (rows, time, chars)
        group = np.zeros(len(streams[0]), np.int64) if row_groups is None else row_groups
        per_row = sum(long_tokens(ids).sum(axis=1) for ids in streams)  # (rows,)
        counts[i, :, 0] = np.bincount(group, minlength=groups) * sum(ids.shape[1] for ids in streams)
        counts[i, :, 1] = np.bincount(group, weights=per_row, minlength=groups)
    if jax.process_count() > 1 and len(batches):
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)  # (processes, batches, ...)
    bounds = [max(8, int(per_group[:, 0].max()) // 16) for per_group in counts]
    return [bound if int(per_group[:, 1].max()) <= bound else None for bound, per_group in zip(bounds, counts)]


def row_devices(rows, batch_size: int, n_devices: int) -> np.ndarray:
    """The device (its place in the mesh) that holds each of the global batch ``rows`` when the batch is split by
    rows over ``n_devices`` (``sharding.by_batch``: equal blocks in mesh order): ``long_token_bounds``' groups."""
    return np.asarray(rows) // (batch_size // n_devices)


def long_token_bound(batch: dict[str, np.ndarray], row_groups: np.ndarray | None = None,
                     groups: int = 1) -> int | None:
    """``long_token_bounds`` of one batch (one all-gather of its own with several processes)."""
    return long_token_bounds([batch], row_groups, groups)[0]


_COUNTED_HERE = object()  # Trainer.step's default: the batch's long-token bound is counted in the call


class BoundedBatches:
    """A ``Batches`` read ``ahead`` batches at a time, each with its ``long_token_bounds`` bound: with several
    processes one all-gather serves ``ahead`` steps instead of one (a host collective a step stalls dispatch).

    Yields (batch, bound). ``position`` and ``get_state()`` are those of the last batch yielded, as if
    nothing were read ahead, so a checkpoint's cursor continues exactly.
    """

    def __init__(self, batches: Batches, ahead: int | None = None, row_groups: np.ndarray | None = None,
                 groups: int = 1):
        self.batches, self.ahead = batches, ahead or BOUNDS_AHEAD
        self.row_groups, self.groups = row_groups, groups  # see long_token_bounds
        self.pending: list[tuple[dict, int | None, dict]] = []  # (batch, bound, cursor after it), oldest first
        self.position, self._state = batches.position, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], int | None]:
        if not self.pending:
            read = []
            for batch in itertools.islice(self.batches, self.ahead):  # every host reads the same count
                read.append((batch, self.batches.get_state()))
            if not read:
                raise StopIteration
            bounds = long_token_bounds([batch for batch, _ in read], self.row_groups, self.groups)
            self.pending = [(batch, bound, state) for (batch, state), bound in zip(read, bounds)]
        batch, bound, self._state = self.pending.pop(0)
        self.position += 1
        return batch, bound

    def get_state(self) -> dict:
        return self.batches.get_state() if self._state is None else self._state


def host_rows(sharding: jax.sharding.Sharding, batch_size: int) -> list[int]:
    """The global batch rows (sorted) that this process's devices hold under ``sharding``, from its index map."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return sorted(rows)


def place_rows(batch: dict[str, np.ndarray], rows: list[int], sharding: jax.sharding.Sharding,
               batch_size: int) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays, each device given the rows its index map names.

    Args:
      batch: arrays of (len(rows), ...) numpy; row i is global row rows[i] (``host_rows(sharding, batch_size)``).
    Returns:
      the same names, (batch_size, ...) jax.Arrays with ``sharding`` (split along the first axis).
    """
    local = {row: i for i, row in enumerate(rows)}

    def place(value: np.ndarray) -> jax.Array:
        def rows_of(index: tuple[slice, ...]) -> np.ndarray:  # one device's slices of the global array
            start, stop, _ = index[0].indices(batch_size)
            return value[(slice(local[start], local[start] + stop - start), *index[1:])]

        return jax.make_array_from_callback((batch_size, *value.shape[1:]), sharding, rows_of)

    return {name: place(value) for name, value in batch.items()}


@functools.lru_cache(maxsize=16)
def _init_fn(options: BiLMOptions, optimizer_settings: tuple, table_rows: int | None = None):
    """The jitted, device-agnostic init(key, bilm_params | None) -> TrainState (a softmax of ``table_rows`` rows,
    default the vocabulary's)."""
    optimizer = _make_optimizer(*optimizer_settings)

    @jax.jit
    def init(key, bilm_params):
        params = init_train_params(options, key, bilm_params, table_rows)
        lstm_state = initial_lm_state(options, options.training.batch_size)
        return TrainState(params, optimizer.init(params), jnp.int32(0), lstm_state, jnp.int32(0),
                          jax.random.fold_in(key, 1))

    return init


DISTRIBUTED_ENVIRONMENT = {"JAX_NUM_PROCESSES": "num_processes", "JAX_PROCESS_ID": "process_id"}


def initialize_distributed() -> None:
    """Multi-host setup: ``jax.distributed.initialize()`` (see the module docstring); call before any JAX work.

    JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index, which it only detects
    on managed clusters (SLURM, Open MPI, Kubernetes, Cloud TPU): they are passed from JAX_NUM_PROCESSES
    and JAX_PROCESS_ID when set.
    """
    settings = {}
    for variable, argument in DISTRIBUTED_ENVIRONMENT.items():
        value = os.environ.get(variable)
        if value is not None:
            try:
                settings[argument] = int(value)
            except ValueError:
                raise TrainError(f"{variable}={value!r}: expected an integer") from None
    try:
        jax.distributed.initialize(**settings)
    except ValueError as error:
        raise TrainError(f"cannot start the multi-process runtime ({error}); outside a managed cluster set "
                         f"JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
                         f"JAX_PROCESS_ID in every process") from None


def _prepare_run_dir(run_dir: str) -> str:
    run_dir = os.path.abspath(os.fspath(run_dir))
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as error:
        raise TrainError(f"{run_dir}: cannot create or write the run directory ({error.strerror or error})") from None
    return run_dir


class Trainer:
    """A training run in ``run_dir``: ``Trainer(config, run_dir).train()``; ``resume=True`` continues the latest
    checkpoint exactly (params, optimiser, LSTM carry, data cursor, key, step), or, when the run stopped before
    its first checkpoint, starts it from its beginning and says so in one line.

    new_data: with resume, the config's train_prefix is new data (bilm-tf's restart.py with another
    --train_prefix): params, optimiser, step and key continue, the new shards are read from their start and the
    carried LSTM state starts at zero, as the rows now hold other sentences.

    devices: the devices of the data mesh (default all); the global batch_size must divide evenly over them.
    log_stream: where the one-line log of each log step goes (default: sys.stdout when it is written);
      metrics.jsonl gets them too.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 new_data: bool = False, devices: list | None = None, log_stream=None):
        import orbax.checkpoint as ocp

        if new_data and not resume:
            raise TrainError("new_data switches the data of a resumed run; pass resume=True")
        options, t = config.options, config.options.training
        self.config, self.options, self.log_stream = config, options, log_stream
        # ---- mesh
        devices = list(devices) if devices is not None else jax.devices()
        if t.batch_size % len(devices) or t.batch_size % jax.process_count():
            raise TrainError(f"batch_size={t.batch_size} must divide evenly over {len(devices)} devices and "
                             f"{jax.process_count()} processes")
        rows = softmax_table_rows(options, config.shard_softmax)
        if config.shard_softmax and rows % len(devices):
            raise TrainError(f"shard_softmax: the softmax's {rows} rows (n_tokens_vocab={t.n_tokens_vocab} rounded up "
                             f"to a multiple of {SOFTMAX_ROW_BLOCK}) do not split evenly over {len(devices)} devices; "
                             f"use a number of devices that divides {rows}, or a replicated softmax")
        self.mesh = data_mesh(devices)
        replicated, self.by_batch = replicated_sharding(self.mesh), batch_sharding(self.mesh)
        # ---- data
        self.vocab = load_vocabulary(config.vocab_file, t.n_tokens_vocab)
        self.rows = host_rows(self.by_batch, t.batch_size)  # this host's rows of the global batch
        # the device block each of them is in: a step bounds (and convolves) each device's long tokens apart
        self.row_groups = row_devices(self.rows, t.batch_size, len(devices))
        self.dataset = LMDataset(config.train_prefix, self.vocab, t.batch_size, t.unroll_steps, seed=config.seed,
                                 max_chars=options.char_cnn.max_characters_per_token, rows=self.rows)
        self._batches: BoundedBatches | None = None  # the batch iterator, at the state's data position between steps
        self.data_cursor: dict | None = None  # a restored cursor (Batches.get_state()) of the data stream
        self.vocab_char_ids = None
        if t.share_embedding_softmax:
            self.vocab_char_ids = put_global(self.vocab.char_ids(options.char_cnn.max_characters_per_token),
                                             replicated)  # on a mesh over every process's devices too
        # ---- run dir
        self.run_dir = _prepare_run_dir(run_dir)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        # ---- init
        bilm_params = None
        if config.init_weights is not None:
            from ..weights import load_hdf5

            bilm_params = load_hdf5(config.init_weights, options)
        init, self._step = _compiled(options, _optimizer_settings(config), self.mesh, config.compute_dtype,
                                     config.shard_softmax)
        self.optimizer = make_optimizer(config)
        self.state = init(jax.random.PRNGKey(config.seed), bilm_params)
        # ---- checkpoints
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True))
        latest = self.manager.latest_step()
        if resume and latest is None:  # killed before its first checkpoint: nothing is lost by starting over
            self._say(f"{self.run_dir}: no checkpoint to resume yet; starting the run from its beginning")
            resume = new_data = False
        if resume:
            fresh = self.state  # as init made it: data position 0, zero LSTM state, placed on the mesh
            self.state = self.manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(fresh)))["state"]
            if new_data:
                self.state = self.state._replace(data_position=fresh.data_position, lstm_state=fresh.lstm_state)
            else:
                self.data_cursor = self._restore_cursor(latest)
        elif latest is not None:
            raise TrainError(f"{self.run_dir}: holds checkpoints up to step {latest}; pass --resume to continue "
                             f"it or choose a new run directory")
        _write_json(os.path.join(self.run_dir, "config.json"), config.to_dict())

    def _restore_cursor(self, step: int) -> dict | None:
        """The data cursor saved with checkpoint ``step``; None for a checkpoint written before cursors existed."""
        import orbax.checkpoint as ocp

        try:
            return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except KeyError:  # orbax: 'Item "data" was not found in the checkpoint'
            return None

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch (numpy; row i is global row self.rows[i]) -> global arrays
        sharded by rows (``place_rows``)."""
        return place_rows(batch, self.rows, self.by_batch, self.options.training.batch_size)

    def step(self, batch: dict[str, np.ndarray], long_token_rows: int | None | object = _COUNTED_HERE
             ) -> dict[str, jax.Array]:
        """One train step on this process's rows of a batch (numpy); updates self.state, returns the metrics.

        long_token_rows: the batch's ``long_token_bounds`` bound (None: no bound) if known (``BoundedBatches``);
        by default it is counted here."""
        if long_token_rows is _COUNTED_HERE:
            long_token_rows = long_token_bound(batch, self.row_groups, self.mesh.size)
        self.state, metrics = self._step(self.state, self.put_batch(batch), self.vocab_char_ids,
                                         long_token_rows=long_token_rows)
        return metrics

    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train ``steps`` more steps (default: up to config.total_steps()); log, append metrics.jsonl, checkpoint.

        Returns the logged metrics (one dict per log step). Raises TrainError on a non-finite loss.
        """
        config, t = self.config, self.options.training
        start = int(jax.device_get(self.state.step))
        end = start + steps if steps is not None else config.total_steps()
        batches = self._data_stream()
        history, tick, last = [], time.perf_counter(), start
        for step in range(start, end):
            metrics = self.step(*next(batches))
            done = step + 1
            if done % config.log_every == 0 or done == end:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise TrainError(f"non-finite loss at step {done}: {values}")
                now = time.perf_counter()
                values.update(step=done, perplexity=math.exp(min(values["loss"], 700.0)),
                              tokens_per_s=(done - last) * t.batch_size * t.unroll_steps / max(now - tick, 1e-9))
                tick, last = now, done
                history.append(values)
                self._log(values)
            if done % config.checkpoint_every == 0 or done == end:
                self.save()
        return history

    def save(self) -> None:
        """Checkpoint the whole TrainState and the config at the current step (waits until written)."""
        import orbax.checkpoint as ocp

        step = int(jax.device_get(self.state.step))
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(self.state), "config": ocp.args.JsonSave(self.config.to_dict())}
        cursor = self._cursor()
        if cursor is not None:
            items["data"] = ocp.args.JsonSave(cursor)
        self.manager.save(step, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def _cursor(self) -> dict | None:
        """The data stream's cursor at the state's data position, or None when it is not known (batches fed by hand)."""
        position = int(jax.device_get(self.state.data_position))
        if self._batches is not None and self._batches.position == position:
            return self._batches.get_state()
        if self.data_cursor is not None and self.data_cursor.get("position") == position:
            return self.data_cursor
        return self.dataset.batches().get_state() if position == 0 else None

    def _data_stream(self) -> BoundedBatches:
        """The batches from the state's data position: the iterator the last train() left there, else one from the
        data cursor (no replay), else one that replays the stream up to it (an old checkpoint's, or fed by hand)."""
        position = int(jax.device_get(self.state.data_position))
        if self._batches is not None and self._batches.position == position:
            return self._batches
        cursor = self._cursor()
        if cursor is not None:
            self._batches = BoundedBatches(self.dataset.batches(state=cursor), row_groups=self.row_groups,
                                           groups=self.mesh.size)
        else:
            self._say(f"{self.run_dir}: no data cursor at data position {position} (a checkpoint written before "
                      f"checkpoints held one): replaying the stream's first {position} batches to reach it")
            self._batches = BoundedBatches(self.dataset.batches(start=position), row_groups=self.row_groups,
                                           groups=self.mesh.size)
        return self._batches

    def _say(self, line: str) -> None:
        if jax.process_index() == 0:
            print(line, file=self.log_stream or sys.stdout, flush=True)

    def _log(self, values: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        print(f"step {values['step']}  loss {values['loss']:.4f}  perplexity {values['perplexity']:.2f}  "
              f"tokens/s {values['tokens_per_s']:.0f}", file=self.log_stream or sys.stdout, flush=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(values) + "\n")


def _write_json(path: str, value: dict) -> None:
    if jax.process_index() != 0:
        return
    from ..weights import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of a run directory (its config.json)."""
    path = os.path.join(os.fspath(run_dir), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise TrainError(f"{path}: not a run directory's config ({error})") from None
    try:
        return TrainConfig.from_dict(raw, source=path)
    except (TypeError, KeyError, AttributeError) as error:
        raise TrainError(f"{path}: not a TrainConfig of this version ({error})") from None
