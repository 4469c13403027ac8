"""Pretraining (and fine-tuning) a biLM as bilm-tf does: state, one jitted train step, the loop, checkpoints.

Phases of ``Trainer.__init__``: mesh -> data -> run dir -> init (or fine-tuning init) -> checkpoints
(resume) -> step. ``Trainer.train`` is the loop: batch -> step -> log -> checkpoint.

Data parallelism is ``jax.jit`` over a one-axis Mesh ("data"): batches and the carried LSTM state are
split by rows (``P("data")``), params and optimiser state are replicated; XLA inserts the gradient
all-reduce. The same code runs on one CPU, simulated CPU devices, one GPU or several hosts.

Multi-host: call ``initialize_distributed()`` (``--distributed``) first in every process; it runs
``jax.distributed.initialize()``, which reads the coordinator address, process count and index from
the cluster environment (SLURM, Open MPI, Kubernetes, Cloud TPU), or from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID.
Every host reads the same deterministic stream and feeds only its own rows of each global batch, so
the global batch is identical to a single-host run's. The run directory must be on shared storage.
"""

from __future__ import annotations

import dataclasses
import functools
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
from ..sharding import data_mesh
from ..sharding import replicated as replicated_sharding
from .data import LMDataset, load_vocabulary
from .loss import init_train_params, initial_lm_state, train_loss


class TrainError(RuntimeError):
    """A training run cannot start or continue (run dir, resume, non-finite loss, batch size)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides its run directory; saved with every checkpoint.

    ``n_steps=None`` trains bilm-tf's length: n_epochs * n_train_tokens / (batch_size * unroll_steps).
    ``clip_norm=None`` uses options.training.all_clip_norm_val. ``init_weights``: an HDF5 biLM to
    fine-tune from (the softmax starts fresh). ``compute_dtype``: "float32", or "bfloat16" for the
    forward and backward pass (params, optimiser state, carried LSTM state and the loss stay float32).
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


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then Adagrad (TF's: no epsilon, accumulator starts at initial_accumulator_value)."""
    return _make_optimizer(*_optimizer_settings(config))


def _make_optimizer(learning_rate: float, initial_accumulator_value: float, clip: float):
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value, eps=0.0))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def train_step(state: TrainState, batch: dict, vocab_char_ids: jax.Array | None, *, options: BiLMOptions,
               optimizer: optax.GradientTransformation, long_token_rows: int | None = None,
               compute_dtype=jnp.float32) -> tuple[TrainState, dict]:
    """One window: sampled-softmax loss, gradients, clip, Adagrad; carries the LSTM state.

    Args:
      batch: arrays of (batch, unroll_steps[, max_chars]) (see data.LMDataset.batches).
      vocab_char_ids: (n_tokens_vocab, max_chars) when the softmax is tied to the token embeddings, else None.
      long_token_rows: None, or a bound on the batch's long tokens (see ``long_token_bound``).
      compute_dtype: the LMs and the softmax logits run in it (a float32 copy of the params is what is
        updated, so small updates are not rounded away); the loss is reduced in float32.
    Returns:
      the new state and metrics {"loss", "forward_loss", ["backward_loss"], "grad_norm"} (scalars).
    """
    key = jax.random.fold_in(state.key, state.step)

    def objective(params):
        loss, (losses, lstm_state) = train_loss(_cast(params, compute_dtype), options, batch,
                                                _cast(state.lstm_state, compute_dtype), key=key,
                                                vocab_char_ids=vocab_char_ids, long_token_rows=long_token_rows)
        # bilm-tf differentiates loss * unroll_steps (a per-sequence rather than per-token scale).
        return loss * options.training.unroll_steps, (loss, (losses, _cast(lstm_state, jnp.float32)))

    grads, (loss, (losses, lstm_state)) = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **{f"{d}_loss": v for d, v in losses.items()}, "grad_norm": optax.tree.norm(grads)}
    new_state = TrainState(params, opt_state, state.step + 1, lstm_state, state.data_position + 1, state.key)
    return new_state, metrics


@functools.lru_cache(maxsize=16)
def _compiled(options: BiLMOptions, optimizer_settings: tuple, mesh: Mesh, compute_dtype: str = "float32"):
    """init(key, bilm_params | None) -> TrainState placed on the mesh, and
    step(state, batch, vocab_char_ids, long_token_rows=None), the jitted train step (one compiled program per
    long_token_rows), for one (options, optimiser, mesh, compute dtype).

    Cached so that several Trainers of one process (resume, evaluation, tests) share one compilation.
    """
    optimizer = _make_optimizer(*optimizer_settings)
    replicated, by_batch = replicated_sharding(mesh), batch_sharding(mesh)
    shardings = TrainState(replicated, replicated, replicated, by_batch, replicated, replicated)
    unplaced = _init_fn(options, optimizer_settings)
    placed = jax.jit(unplaced.__wrapped__, out_shardings=shardings)

    def init(key, bilm_params):
        if jax.process_count() == 1:  # one compiled init for every mesh; placing is a copy
            return jax.device_put(unplaced(key, bilm_params), shardings)
        return placed(key, bilm_params)  # multi-host: every process computes the same replicated values

    programs = {}  # long_token_rows -> the jitted step for it

    def step(state, batch, vocab_char_ids, long_token_rows=None):
        if long_token_rows not in programs:
            one = functools.partial(train_step, options=options, optimizer=optimizer, long_token_rows=long_token_rows,
                                    compute_dtype=COMPUTE_DTYPES[compute_dtype])
            programs[long_token_rows] = jax.jit(one, in_shardings=(shardings, by_batch, replicated),
                                                out_shardings=(shardings, replicated), donate_argnums=0)
        return programs[long_token_rows](state, batch, vocab_char_ids)

    # {long_token_rows: times its program was compiled}: once each while the state keeps its types
    step.compilations = lambda: {rows: program._cache_size() for rows, program in programs.items()}
    return init, step


def long_token_bound(batch: dict[str, np.ndarray]) -> int | None:
    """The bound on long tokens that the train step of this host batch (numpy) may use, or None for none.

    1/16 of the batch's tokens (both streams, at least 8) when the batch has no more long tokens than
    that (almost always in running text), so the char CNN convolves the short ones over their first
    positions only (``char_cnn.char_cnn``); None otherwise, and always with several processes, whose
    hosts see different rows but must run the same program.
    """
    if jax.process_count() > 1:
        return None
    streams = [batch[name] for name in ("char_ids", "char_ids_reverse") if name in batch]
    bound = max(8, sum(ids.size // ids.shape[-1] for ids in streams) // 16)
    return bound if sum(int(long_tokens(ids).sum()) for ids in streams) <= bound else None


@functools.lru_cache(maxsize=16)
def _init_fn(options: BiLMOptions, optimizer_settings: tuple):
    """The jitted, device-agnostic init(key, bilm_params | None) -> TrainState."""
    optimizer = _make_optimizer(*optimizer_settings)

    @jax.jit
    def init(key, bilm_params):
        params = init_train_params(options, key, bilm_params)
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
    checkpoint exactly (params, optimiser, LSTM carry, data position, key, step).

    new_data: with resume, the config's train_prefix is new data (bilm-tf's restart.py with another
    --train_prefix): params, optimiser, step and key continue, the new shards are read from their start and the
    carried LSTM state starts at zero, as the rows now hold other sentences.

    devices: the devices of the data mesh (default all); the global batch_size must divide evenly over them.
    log_stream: where the one-line log of each log step goes (default stdout); metrics.jsonl gets them too.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 new_data: bool = False, devices: list | None = None, log_stream=sys.stdout):
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
        self.mesh = data_mesh(devices)
        replicated, self.by_batch = replicated_sharding(self.mesh), batch_sharding(self.mesh)
        # ---- data
        self.vocab = load_vocabulary(config.vocab_file, t.n_tokens_vocab)
        local = t.batch_size // jax.process_count()  # this host's rows of the global batch
        self.dataset = LMDataset(config.train_prefix, self.vocab, t.batch_size, t.unroll_steps, seed=config.seed,
                                 max_chars=options.char_cnn.max_characters_per_token,
                                 rows=(jax.process_index() * local, (jax.process_index() + 1) * local))
        self.vocab_char_ids = None
        if t.share_embedding_softmax:
            self.vocab_char_ids = jax.device_put(self.vocab.char_ids(options.char_cnn.max_characters_per_token),
                                                 replicated)
        # ---- run dir
        self.run_dir = _prepare_run_dir(run_dir)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        # ---- init
        bilm_params = None
        if config.init_weights is not None:
            from ..weights import load_hdf5

            bilm_params = load_hdf5(config.init_weights, options)
        init, self._step = _compiled(options, _optimizer_settings(config), self.mesh, config.compute_dtype)
        self.optimizer = make_optimizer(config)
        self.state = init(jax.random.PRNGKey(config.seed), bilm_params)
        # ---- checkpoints
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True))
        latest = self.manager.latest_step()
        if resume:
            if latest is None:
                raise TrainError(f"{self.run_dir}: nothing to resume, no checkpoint in {self.run_dir}/checkpoints")
            fresh = self.state  # as init made it: data position 0, zero LSTM state, placed on the mesh
            self.state = self.manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(fresh)))["state"]
            if new_data:
                self.state = self.state._replace(data_position=fresh.data_position, lstm_state=fresh.lstm_state)
        elif latest is not None:
            raise TrainError(f"{self.run_dir}: holds checkpoints up to step {latest}; pass --resume to continue "
                             f"it or choose a new run directory")
        _write_json(os.path.join(self.run_dir, "config.json"), config.to_dict())
    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch (numpy) -> global arrays sharded by rows."""
        n = jax.process_count()
        return {name: jax.make_array_from_process_local_data(self.by_batch, value, (value.shape[0] * n,
                                                                                    *value.shape[1:]))
                for name, value in batch.items()}

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One train step on this process's rows of a batch (numpy); updates self.state, returns the metrics."""
        self.state, metrics = self._step(self.state, self.put_batch(batch), self.vocab_char_ids,
                                         long_token_rows=long_token_bound(batch))
        return metrics

    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train ``steps`` more steps (default: up to config.total_steps()); log, append metrics.jsonl, checkpoint.

        Returns the logged metrics (one dict per log step). Raises TrainError on a non-finite loss.
        """
        config, t = self.config, self.options.training
        start = int(jax.device_get(self.state.step))
        end = start + steps if steps is not None else config.total_steps()
        batches = self.dataset.batches(start=int(jax.device_get(self.state.data_position)))
        history, tick, last = [], time.perf_counter(), start
        for step in range(start, end):
            metrics = self.step(next(batches))
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
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                        config=ocp.args.JsonSave(self.config.to_dict())))
        self.manager.wait_until_finished()

    def _log(self, values: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        print(f"step {values['step']}  loss {values['loss']:.4f}  perplexity {values['perplexity']:.2f}  "
              f"tokens/s {values['tokens_per_s']:.0f}", file=self.log_stream, flush=True)
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
