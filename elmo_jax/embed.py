"""Embedding text at speed: ``Embedder`` (AllenNLP's ``ElmoEmbedder``) over the pure biLM functions.

How a stream of sentences is embedded (packed lanes, as continuous batching in LLM serving):
1. A background thread reads windows of sentences, dedupes their tokens against the token table (the
   token vectors that live on the device, and on a CPU the input half of the first LSTM layer's gates; new
   tokens go through the char CNN + highway in a few bucketed sizes) and packs the sentences into lanes
   (``lanes.py``): each lane is a stream of sentences back to back, longest first into the lane that frees up
   first.
2. The biLSTM runs the lanes in blocks of ``block_steps`` steps, one compiled program per (lanes, steps,
   mode) whatever the corpus. A block in which few lanes are busy (a short input, the end of any input) runs
   only those, in the fewest of ``lanes.lane_subsets`` (a few more programs), where that pays for compiling
   the program (``lanes.drain_lanes``: a block on all lanes, timed once, against a compilation). A reset flag
   beside the mask sets a lane's state where a sentence starts to the state after the sentence boundary (<S>
   forward, </S> backward, from zero state: the same for every sentence, computed in the block), so every
   sentence is computed exactly as if alone from zero state (stateless) and no step runs a boundary. The
   backward LM reads each sentence reversed within its slot. State, gathers and outputs stay inside the jitted
   block.
3. Each block writes its outputs into a device ring of recent steps; a gather program reads finished
   sentences from it, whole and in input order (each token's backward half from its reversed slot), into one
   (tokens, [layers,] dim) array in the output dtype. Blocks and gathers are dispatched asynchronously; the
   host copies a gathered array back while the devices run the next blocks. A sentence longer than the ring
   (or, in input order, one finished behind it) has its steps read early as the ring comes round, by the same
   program, and put together on the host (``lanes.GatherPlan.spill``): the ring keeps its size.
4. Lanes are split across the local devices (``jax.sharding`` mesh).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from . import char_cnn
from .bilm import (COMPUTE_DTYPES, BiLM, bilstm, initial_state, sentence_start_state, split_token_ids,
                   stacked_lstm_params, token_embedding)
from .characters import TokenError
from .lanes import (BOS_ROW, EOS_ROW, GatherPlan, Slots, Timeline, TokenTable, choose_lanes, drain_lanes,
                    flat_token_ids, lane_subsets, slot_steps, vector_places, widen)
from .lstm import feature_major_kernels, token_input_gates
from .options import BiLMOptions
from .programs import Program, source_digest
from .sharding import by_batch, data_mesh, replicated, round_up

OUTPUT_MODES = ("all", "top", "average", "token")
# lanes in all on a CPU (elsewhere LANES_PER_ACCELERATOR per device): the most of these whose step's gates
# (lanes x 4 x cells float32) fit CPU_STEP_GATES_BYTES. A CPU step costs its lanes plus ~32 lanes' worth
# (STEP_OVERHEAD_LANES), so the built-in model (512 cells, 2 MB of gates at 256 lanes) runs ~10% more tokens a second
# on 256 lanes than on 128 (30.2k against 27.8k warm; 100,000 lines in 72 s against 80 s whole) and no more on 512,
# while 2x4096 (16 MB at 256) runs 15% fewer (2,500 sentences: 1,050 against 1,235 tokens/s), its step's working
# set out of the 4 MB L2 of a core; only these two sizes were measured
CPU_LANES = (256, 128)
CPU_STEP_GATES_BYTES = 4 << 20
LANES_PER_ACCELERATOR = 1024
BLOCK_STEPS = {"cpu": 32}  # elsewhere 64
TABLE_BYTES = 64 << 20  # token table on the device (rows of projection_dim), at least TABLE_MIN_ROWS rows
TABLE_MIN_ROWS = 8192
# On a CPU the token table also holds each token's input half of the first LSTM layer's gates, both directions
# (lstm.token_input_gates): a block step then multiplies only h_prev there, the built-in model's first layer ~33%
# faster (a block ~14%, measured in one process). The table then has GATE_TABLE_ROWS rows (10,000 held-out lines:
# 21,625 distinct tokens), where their gates fit GATE_TABLE_BYTES in all on the host (the built-in model: 16 KB a
# row, 512 MB), else it holds no gates (e.g. 2x4096: 128 KB a row; its blocks run feature-major).
GATE_TABLE_ROWS = 32768
GATE_TABLE_BYTES = 512 << 20
# new tokens per char-CNN call (insert_chunks): one program per size, whatever the input, so a run's programs do
# not depend on the sizes of its windows' remainders (with (64, 256, 1024) and (16, 128): 5 programs for 2,000
# held-out lines, 7 for 10,000, 6 for 100,000). At most 512: in a process with glibc's default allocator (an Embedder in
# the user's own process), a call of 1,024 short tokens holds 41 MB of temporaries, which glibc maps afresh for every
# call (over its 32 MB mmap ceiling), so each call paid its page faults again; 512 holds ~20 MB, reused. 16,384 new
# tokens took 0.55-0.64 s with (256, 1024), 0.37-0.48 s with (256, 512) (benchmarks/bench_inserts.py). `elmo-jax embed`
# keeps freed memory for reuse anyway (embed_cli.reuse_freed_memory): there the two tie (22.0-22.7 us a token).
INSERT_SIZES = {"short": (256, 512), "long": (32,)}
WINDOW_PER_LANE = 2  # sentences read and packed at a time, per lane
LOOK_AHEAD_PER_LANE = 8  # sentences read first: an input shorter than this is packed at once (choose_lanes)
TAIL_PER_LANE = 8  # sentences a lane read ahead of the window being placed: a stream's last window holds them all
STEP_OVERHEAD_LANES = {"cpu": 32}  # a step's fixed cost in lanes (choose_lanes); elsewhere all lanes (not measured)
# a feature-major step's (below): a whole 2x4096 block step by lanes 1, 4, 8, 16, 32, 64, 128 took 4.6, 8.5 (hoisted),
# 10.8, 13.6, 18.1, 33.6, 68.4 ms, about lanes + 8 at ~0.5 ms a lane; with 32, 900 held-out sentences got 128 lanes,
# where 64 ran ~13% faster (simulated from those step times)
FEATURE_MAJOR_STEP_OVERHEAD_LANES = 8
FUSE_MIN_LANES = 128  # on a CPU, fewer lanes per device run faster unfused when the kernel outgrows the cache:
# at 2x4096 (64 MB a kernel) a (32, 1024) x (1024, 16384) matmul runs at 83 GFLOP/s against 201 for 64 rows, so 200
# sentences on 32 lanes took 13.8 s fused and 7.0 s unfused, 300 on 64 lanes 8.3 and 7.4 s; 128 lanes: the same
FUSE_ALWAYS_BYTES = 16 << 20  # a kernel this small always runs fused on a CPU (the built-in's 1 MB: ~2x faster)
# On a CPU, a recurrent kernel (both directions) this large runs each step of a block of at least
# FEATURE_MAJOR_MIN_LANES lanes a device feature-major (lstm.bidirectional_layer): a (2, 16384, 1024) x (2, 1024, L)
# matmul runs far faster than (2, L, 1024) x (2, 1024, 16384) for few rows. One 2x4096 layer's step: 32 lanes
# 9.0 ms against 16.6 ms (hoisted, the faster batch-major step there), 64 16.6 vs 24.5, 128 33.9 vs 41.0; a whole
# 2x4096 block a step: 8 lanes 11.3-11.7 ms vs 12.4-14.3, but 4 lanes 10.3-11.3 vs 8.1-8.9 (hoisted); 2x2048_256 at
# 32 lanes 2.2 vs 3.2 ms a layer, at 256 the same; the built-in's 2 MB at 256 lanes 0.9x.
FEATURE_MAJOR_MIN_BYTES = 8 << 20
FEATURE_MAJOR_MIN_LANES = 8
# a CPU's batch-major blocks of this many lanes per device or more run each direction's step as its own ops
# (lstm.bidirectional_layer's split_directions); the built-in model's layer, 32 steps: 10-18% faster at 32-128 lanes,
# ~8% at 256, about even at 8; feature-major blocks stay batched (2x4096 at 32 lanes: 10% slower split)
SPLIT_MIN_LANES = 16
# the rows the sentence start state is computed in (embed_block): one for a batch-major block, whose matmul kernels then
# give each row's numbers bit for bit as in a block of 256 lanes on the CPU here; 8 feature-major (bit for bit too)
START_ROWS = {False: 1, True: 8}
RING_STEPS = 256  # steps of each lane's outputs kept on the device (a longer sentence is read in pieces: spill)
IN_FLIGHT = 2  # gathers dispatched ahead of the one being copied back
# in input order, the vectors that may wait on the host behind a long sentence still running (beside a window's)
WAITING_BYTES = 256 << 20
# gathered batches waiting for the writer thread (each 24 MB with the built-in model, all layers): the writer keeps up
# on average (~0.5 GB/s against ~0.1 GB/s made), so a short queue only bounds memory; with 8, peak RSS at 10,000 lines
# was ~50 MB higher, memory that costs the run again wherever fresh pages are dear (~2.3 ms a MB on this VM when the
# host has reclaimed them, 0.13 when just freed)
WRITER_QUEUE = 2
# a block program's compilation is taken as at least this long: one found in the persistent compilation cache
# loads in a fraction of it, and what an input's end compiles should not depend on the cache's state
DRAIN_MIN_COMPILE_SECONDS = 0.5


def default_lanes(platform: str, n_devices: int, lstm_cells: int) -> int:
    """Lanes for a device kind and an LSTM of ``lstm_cells`` cells: a CPU wants 128-256 in all (``CPU_LANES``),
    an accelerator thousands."""
    if platform != "cpu":
        return round_up(LANES_PER_ACCELERATOR * n_devices, n_devices)
    fits = [lanes for lanes in CPU_LANES if lanes * 4 * lstm_cells * 4 <= CPU_STEP_GATES_BYTES]
    return round_up(max(fits, default=min(CPU_LANES)), n_devices)


def short_token_chars(options: BiLMOptions) -> int:
    """Char positions that suffice for a short token (see ``char_cnn.short_token_chars``)."""
    return char_cnn.short_token_chars([width for width, _ in options.char_cnn.filters],
                                      options.char_cnn.max_characters_per_token)


def _reduce_layers(activations: jax.Array, mode: str, weights: jax.Array | None) -> jax.Array:
    """(layers, ...) -> the requested output: all layers, the top, their average, the token layer, a weighted mix."""
    if mode == "all":
        return activations
    if mode == "top":
        return activations[-1]
    if mode == "average":
        return jnp.mean(activations, axis=0)
    if mode == "token":
        return activations[0]
    return jnp.einsum("l,l...->...", weights.astype(activations.dtype), activations)  # weighted mix


def token_layer(forward_x: jax.Array, backward_x: jax.Array, mask: jax.Array) -> jax.Array:
    """Layer 0 of a block: (lanes, steps, projection_dim) twice -> (lanes, steps, 2 * projection_dim), 0 at padding."""
    return jnp.concatenate([forward_x, backward_x], axis=-1) * mask[..., None].astype(forward_x.dtype)


def insert_chunks(n: int, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Calls that insert n new tokens: (start, count, size) each, size one of ``sizes`` (ascending), count <= size
    the tokens it takes (the rest of the call is padding). The largest size while its padding would stay under the
    smallest size, then the smallest ones: under ``sizes[0]`` padding in all, every size's program the same for any
    n that reaches it."""
    chunks, start = [], 0
    while start < n:
        left = n - start
        size = sizes[-1] if left > sizes[-1] - sizes[0] else sizes[0]
        chunks.append((start, min(left, size), size))
        start += size
    return chunks


def insert_tokens(params: dict, options: BiLMOptions, table: dict, rows: jax.Array, char_ids: jax.Array) -> dict:
    """The token table with new tokens written in.

    Args:
      params: the Embedder's, params["lstm"] in ``stacked_lstm_params``' form.
      table: {"vectors": (capacity, projection_dim)}, optionally with "forward_gates" and "backward_gates"
        (capacity, 4 * dim): the first LSTM layer's input gates (``embed_block``); rows: (tokens,) int32, a row >=
        capacity is a padding entry (dropped); char_ids: (tokens, width) token ids (``bilm.token_embedding``), the
        char ids all max_characters_per_token or a short token's first ``short_token_chars``.
    """
    vectors = token_embedding(params, options, char_ids).astype(table["vectors"].dtype)
    new = {"vectors": vectors}
    if "forward_gates" in table:
        first = params["lstm"]["stacked"][0]  # the directions stacked on a leading axis
        for direction, name in enumerate(("forward_gates", "backward_gates")):
            one = {k: first[k][direction] for k in ("input_kernel", "bias")}
            new[name] = token_input_gates(one, vectors)  # (tokens, 4 * dim)
    return {name: table[name].at[rows].set(new[name], mode="drop") for name in table}


def embed_block(params: dict, options: BiLMOptions, table: dict, state, forward: jax.Array,
                backward: jax.Array, reset: jax.Array, mask: jax.Array, mode: str = "all",
                weights: jax.Array | None = None, fuse_inputs: bool = True, feature_major: bool = False,
                split_directions: bool = False):
    """One block of the packed, stateless biLM.

    Args:
      params: the Embedder's, params["lstm"] in ``stacked_lstm_params``' form.
      table: {"vectors": (capacity, projection_dim)} token vectors, <S> and </S> at BOS_ROW and EOS_ROW, and
        optionally "forward_gates", "backward_gates" (capacity, 4 * dim), their first layer's input gates (the first
        layer then looks them up: lstm.bidirectional_layer's input_gate_tables); forward, backward:
      (lanes, steps) int32 table rows, the backward LM's reversed within each sentence's slot; reset, mask:
      (lanes, steps) bool, reset where a sentence's first token is; state: BiLMState of (lanes, ...) at the block's
      first step; fuse_inputs, feature_major, split_directions: see
      lstm.bidirectional_layer (the same numbers).
    Returns:
      (lanes, steps, layers, 2 * projection_dim) for mode "all", else (lanes, steps, 2 * projection_dim), the
      last axis [forward at step t, backward at step t of the reversed slot]; and the state after the block.
    """
    vectors = table["vectors"]
    forward_x = jnp.take(vectors, forward, axis=0)  # (lanes, steps, projection_dim)
    backward_x = jnp.take(vectors, backward, axis=0)
    layers = [token_layer(forward_x, backward_x, mask)]
    if mode != "token":  # the context-free layer needs no LSTM
        layout = {"fuse_inputs": fuse_inputs, "feature_major": feature_major, "split_directions": split_directions}
        # what a reset sets: every layer's state after <S> (forward) and </S> (backward), one row's worth of steps
        start = sentence_start_state(params["lstm"], options, vectors[BOS_ROW], vectors[EOS_ROW],
                                     rows=START_ROWS[feature_major], **layout)
        lstm_params = {"stacked": [{**layer, **s} for layer, s in zip(params["lstm"]["stacked"], start)]}
        gates = (table["forward_gates"], table["backward_gates"]) if "forward_gates" in table else None
        outputs, state = bilstm(lstm_params, options, forward_x, mask, state, backward_x=backward_x, reset=reset,
                                input_gate_tables=gates, rows=(forward, backward), **layout)
        layers += outputs
    activations = _reduce_layers(jnp.stack(layers), mode, weights)  # ([layers,] lanes, steps, 2 * projection_dim)
    return (jnp.moveaxis(activations, 0, 2) if mode == "all" else activations), state


def write_block(params: dict, options: BiLMOptions, table: dict, state, ring: jax.Array, first_step: jax.Array,
                forward, backward, reset, mask, mode: str = "all", weights: jax.Array | None = None,
                active: jax.Array | None = None, fuse_inputs: bool = True, feature_major: bool = False,
                split_directions: bool = False):
    """``embed_block``, its outputs written into the ring of recent steps.

    Args:
      ring: (lanes, ring_steps, [layers,] 2 * projection_dim), ring_steps a multiple of the block's steps;
      first_step: () int32, where the block goes: its first step modulo ring_steps.
      active: None (forward, backward, reset, mask are (lanes, steps)), or (n,) int32 distinct lanes that
        alone run (the four arrays are then (n, steps)): the other lanes' state and ring stay as they are.
    Returns:
      the state after the block and the ring.
    """
    if active is None:
        out, state = embed_block(params, options, table, state, forward, backward, reset, mask, mode, weights,
                                 fuse_inputs, feature_major, split_directions)
        start = (0, first_step) + (0,) * (ring.ndim - 2)
        return state, jax.lax.dynamic_update_slice(ring, out.astype(ring.dtype), start)
    mine = jax.tree.map(lambda a: a[active], state)
    out, mine = embed_block(params, options, table, mine, forward, backward, reset, mask, mode, weights, fuse_inputs,
                            feature_major, split_directions)
    state = jax.tree.map(lambda a, b: a.at[active].set(b), state, mine)
    steps = first_step + jnp.arange(forward.shape[1])
    return state, ring.at[active[:, None], steps[None, :]].set(out.astype(ring.dtype))


def gather_tokens(ring: jax.Array, forward_at: jax.Array, backward_at: jax.Array) -> jax.Array:
    """Vectors read from the ring, the backward half of each from its token's reversed slot.

    One gather straight into the output, in the order the host asks (``lanes.vector_places``: token by token, or
    each sentence's (layers, n) block for AllenNLP's layout, which a file then takes as it is). Taking the two
    halves apart and concatenating them held a temporary as large as the output (25 MB a gather of the built-in
    model's 8,192 tokens, all layers) and copied it again.

    Args:
      ring: (lanes, ring_steps, [layers,] width); forward_at, backward_at: (k,) int32 places (lane * ring_steps +
      step) * layers + layer of each vector's forward and backward halves (layers 1 where the ring has none).
    Returns:
      (k, width).
    """
    width = ring.shape[-1]
    halves = ring.reshape(-1, 2, width // 2)  # (places, direction, half)
    at = jnp.stack([forward_at, backward_at], axis=-1)  # (k, direction)
    return halves[at, jnp.arange(2)].reshape(-1, width)


class Embedder:
    """Embed tokenized sentences with a biLM: ``embed_sentence``, ``embed_sentences``, ``embed_file``.

    Outputs per sentence (n = its number of tokens, dim = 2 * projection_dim), by ``mode``:
    "all" (layers, n, dim), "top" / "average" / "token" (n, dim), or a sequence of per-layer weights
    (n, dim) = sum_k w_k * layer_k. ``sentence_vectors=True`` averages over tokens instead:
    (layers, dim) or (dim,) (TF-Hub ELMo's "default" output is the mean of the weighted mix).
    With no options and weights files (and no ``model``), the built-in English model is used.

    Args:
      options_file, weight_file: a biLM in the bilm-tf / AllenNLP layout (both or neither). A model directory or
        archive of any family alone (``Embedder(model_dir)``, as ELMoForManyLangs' ``Embedder``) loads with
        ``BiLM.from_pretrained``.
      model: an already loaded BiLM, or the path of any published model (``BiLM.from_pretrained``).
      batch_size: lanes, the sentences run side by side (default by device kind: 256 on a CPU, 128 for an LSTM of
        over 1024 cells, 1024 per accelerator); speed and memory only, the numbers do not depend on it. A short
        input uses fewer.
      dtype: "float32" or "bfloat16" compute (outputs are float32 either way).
      devices: the devices whose mesh splits the lanes (default all local devices).
      vocab: words whose token vectors are computed once and kept (AllenNLP's vocab_to_cache).
      block_steps: time steps per compiled biLSTM block (default 32 on a CPU, 64 elsewhere). On a CPU a large
        LSTM's blocks (kernels of FEATURE_MAJOR_MIN_BYTES or more) run feature-major, its transposed kernels kept
        beside the others (lstm.bidirectional_layer; +300 MB at 2x4096).
      stand_in_device: replace every device computation by zeros, to time the host side alone
        (``benchmarks/bench_embed.py --host-only``); the outputs are then meaningless.
      program_cache: a directory where each program's trace is kept (``programs.Program``), so that a later
        process with the same code, model options and devices does not trace it again (``elmo-jax embed`` keeps
        them beside its XLA compilation cache); speed only. Default: none kept.
    """

    def __init__(self, options_file: str | os.PathLike | None = None, weight_file: str | os.PathLike | None = None,
                 *, model: BiLM | None = None, batch_size: int | None = None, dtype: str = "float32", devices=None,
                 vocab: Iterable[str] | None = None, block_steps: int | None = None, stand_in_device: bool = False,
                 program_cache: str | os.PathLike | None = None):
        if isinstance(model, (str, os.PathLike)):
            model = BiLM.from_pretrained(model)
        if model is None and weight_file is None and options_file is not None and (
                os.path.isdir(options_file) or str(options_file).endswith(".zip")):
            model = BiLM.from_pretrained(options_file)
        if model is None:
            if (options_file is None) != (weight_file is None):
                raise ValueError("Embedder needs both options_file and weight_file, or neither (the built-in "
                                 "English model), or model=BiLM")
            model = BiLM.pretrained() if options_file is None else BiLM.from_hdf5(options_file, weight_file)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, found {dtype!r}")
        self.model, self.options = model, model.options
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        self.platform = self.mesh.devices.flat[0].platform
        self.lanes = (_check_positive("batch_size", batch_size)
                      or default_lanes(self.platform, self.n_devices, self.options.lstm.dim))
        self.block_steps = _check_positive("block_steps", block_steps) or BLOCK_STEPS.get(self.platform, 64)
        self.dtype, self.stand_in_device = COMPUTE_DTYPES[dtype], stand_in_device
        compute_params = jax.tree.map(lambda p: p.astype(self.dtype), model.params)
        compute_params["lstm"] = stacked_lstm_params(compute_params["lstm"])  # once, not in every block call
        lstm = self.options.lstm  # both directions' recurrent kernels:
        self._kernel_bytes = 2 * lstm.projection_dim * 4 * lstm.dim * np.dtype(self.dtype).itemsize
        self._feature_major = self.platform == "cpu" and self._kernel_bytes >= FEATURE_MAJOR_MIN_BYTES
        if self._feature_major:  # the transposed kernels too (2x4096: +300 MB), once
            compute_params["lstm"]["stacked"] = [feature_major_kernels(layer)
                                                 for layer in compute_params["lstm"]["stacked"]]
        self.params = jax.device_put(compute_params, replicated(self.mesh))
        self.short_chars = short_token_chars(self.options)
        self.compilations = 0  # programs made so far, traced or loaded (each jitted piece counts once per shape)
        # (table rows, lanes, ring steps, lanes run, mode) of each block program -> the seconds one block of it took
        # to run, timed once on its second call (_run; None until then): what an input's end weighs compiling against
        self._block_programs: dict[tuple, float | None] = {}
        self._block_compile_seconds: float | None = None  # the last block program's compilation (_run's drain)
        pinned = [] if vocab is None else list(vocab)
        itemsize = np.dtype(self.dtype).itemsize
        min_rows = max(TABLE_MIN_ROWS, 4 * len(pinned) + 4)
        capacity = max(TABLE_BYTES // (lstm.projection_dim * itemsize), min_rows)
        # each device of a CPU mesh keeps its copy in the same host memory
        gate_rows = GATE_TABLE_BYTES // (self.n_devices * 2 * 4 * lstm.dim * itemsize)
        self._token_gates = (self.platform == "cpu" and not self._feature_major
                             and min(gate_rows, GATE_TABLE_ROWS) >= min_rows)
        if self._token_gates:
            capacity = min(capacity, GATE_TABLE_ROWS)
        self._tokens = TokenTable(capacity, pinned, model.characters.boundary_tokens)  # the device table's map
        self.program_cache = None if program_cache is None else os.fspath(program_cache)
        program = functools.partial(Program, directory=self.program_cache, on_new=self._count, platform=self.platform,
                                    salt="" if program_cache is None else self._trace_salt())
        self._insert = program(self._traced_insert, name="insert", donate_argnums=(1,))
        self._block = program(self._traced_block, name="block", static_argnames=("mode",), donate_argnums=(2, 3))
        self._gather = program(self._traced_gather, name="gather")
        self._capacity, self._min_rows = capacity, min_rows  # the table's largest and smallest sizes
        self._table = None  # made by the first stream, sized to its input where that is known (_Stream._pack)
        self._table_lock = threading.Lock()  # one stream at a time uses (and extends) the shared table
        # the pinned rows (<S>, </S>, the vocabulary) reach the device with a stream's first new tokens, in the char CNN
        # calls of their sizes: filled apart, they took a program of their own (130 ms of the CLI's start)
        self._pinned_on_device = False

    def step_overhead_lanes(self, lanes: int) -> float:
        """A block step's fixed cost in lanes' worth (``choose_lanes``, ``drain_lanes``): on a CPU 32
        (STEP_OVERHEAD_LANES), 8 where the blocks run feature-major; elsewhere ``lanes`` (not measured)."""
        if self.platform not in STEP_OVERHEAD_LANES:
            return lanes
        return FEATURE_MAJOR_STEP_OVERHEAD_LANES if self._feature_major else STEP_OVERHEAD_LANES[self.platform]

    def table_rows(self, tokens: TokenTable, sentences: Sequence[Sequence[str]] | None) -> int:
        """Rows of a new device table: the largest (``TABLE_BYTES``, or ``GATE_TABLE_ROWS`` with the first layer's
        gates), or for a known input ``sentences`` the fewest power-of-two rows, at least ``TABLE_MIN_ROWS``, that
        hold its tokens beside those of ``tokens``. A short input then takes 8,192 rows, 128 MB with the built-in
        model's gates, not 528 MB; a later, longer input grows the table to the largest at once (one size more to
        compile for)."""
        if sentences is None:
            return self._capacity
        needed = len(tokens.rows.keys() | set(itertools.chain.from_iterable(sentences)))
        return min(self._capacity, max(self._min_rows, 1 << max(needed - 1, 0).bit_length()))

    # ----- jitted pieces (each traced once per shape) -----
    def _count(self) -> None:
        self.compilations += 1

    def _trace_salt(self) -> str:
        """Everything the jitted pieces' traces read beyond their arguments' shapes, dtypes and shardings (the
        program cache's key): the code, the model's options, the devices, the layout decisions and the constants
        they are made by (a test may set them)."""
        return repr((source_digest(), self.options, self.platform, self.n_devices,
                     self.mesh.devices.flat[0].device_kind, self._feature_major, self._token_gates, self._kernel_bytes,
                     FUSE_MIN_LANES, FUSE_ALWAYS_BYTES, FEATURE_MAJOR_MIN_LANES, SPLIT_MIN_LANES, START_ROWS,
                     BOS_ROW, EOS_ROW))

    def _traced_insert(self, params, table, rows, char_ids):
        return insert_tokens(params, self.options, table, rows, char_ids)

    def _traced_block(self, params, table, state, ring, first_step, forward, backward, reset, mask, weights, active,
                      *, mode):
        # a CPU runs a large model's blocks feature-major, but for one lane or few, with the input half of the
        # gates hoisted before the scan
        per_device = forward.shape[0] // self.n_devices
        feature_major = self._feature_major and per_device >= FEATURE_MAJOR_MIN_LANES
        fuse = (feature_major or self.platform != "cpu" or per_device >= FUSE_MIN_LANES
                or self._kernel_bytes <= FUSE_ALWAYS_BYTES)
        # a CPU runs the two directions' elementwise work at once, on two threads
        split = self.platform == "cpu" and not feature_major and per_device >= SPLIT_MIN_LANES
        if active is None:
            return write_block(params, self.options, table, state, ring, first_step, forward, backward, reset, mask,
                               mode, weights, None, fuse, feature_major, split)

        def local(params, table, state, ring, first_step, forward, backward, reset, mask, weights, active):
            # each device runs its own part of the active lanes (Timeline lists them device by device)
            return write_block(params, self.options, table, state, ring, first_step, forward, backward, reset, mask,
                               mode, weights, active % ring.shape[0], fuse, feature_major, split)

        lanes, same = PartitionSpec("data"), PartitionSpec()
        in_specs = (same, same, lanes, lanes, same, lanes, lanes, lanes, lanes, same, lanes)
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=(lanes, lanes))(
            params, table, state, ring, first_step, forward, backward, reset, mask, weights, active)

    def _traced_gather(self, ring, forward_at, backward_at):
        return gather_tokens(ring, forward_at, backward_at)

    # ----- device side: the token table and the blocks -----
    def _new_table(self, capacity: int) -> dict:
        """The token table (``insert_tokens``), zeros on every device of the mesh: "vectors" (capacity,
        projection_dim), and "forward_gates", "backward_gates" (capacity, 4 * dim) where it keeps the first layer's
        input gates."""
        lstm = self.options.lstm
        widths = {"vectors": lstm.projection_dim}
        if self._token_gates:
            widths.update(forward_gates=4 * lstm.dim, backward_gates=4 * lstm.dim)
        return jax.device_put({name: np.zeros((capacity, width), self.dtype) for name, width in widths.items()},
                              replicated(self.mesh))

    def _fill(self, table, rows: np.ndarray, new: list[str]):
        """Write ``new`` tokens into the device table at ``rows`` ((new,) int), in bucketed calls."""
        if self.stand_in_device or not new:
            return table
        rows = np.asarray(rows, np.int32)
        max_chars = self.options.char_cnn.max_characters_per_token
        token_ids = self.model.characters.tokens_ids(new)  # (new, token_id_width)
        chars, words = split_token_ids(self.options, token_ids)
        is_long = char_cnn.long_tokens(chars) if self.short_chars < max_chars else np.ones(len(new), bool)
        for kind, chosen, width in (("short", ~is_long, self.short_chars), ("long", is_long, max_chars)):
            ids, where = chars[chosen, :width], rows[chosen]
            if words is not None:  # the word id stays the last column
                ids = np.concatenate([ids, words[chosen, None]], axis=1)
            for start, count, size in insert_chunks(len(ids), INSERT_SIZES[kind]):
                chunk_ids = np.zeros((size, ids.shape[1]), np.int32)
                chunk_ids[:count] = ids[start : start + count]
                chunk_rows = np.full(size, len(table["vectors"]), np.int32)  # padding entries are dropped
                chunk_rows[:count] = where[start : start + count]
                table = self._insert(self.params, table, *jax.device_put((chunk_rows, chunk_ids),
                                                                         replicated(self.mesh)))
        return table

    def _mode(self, mode):
        if isinstance(mode, str):
            if mode not in OUTPUT_MODES:
                raise ValueError(f"mode must be one of {OUTPUT_MODES} or a list of layer weights, found {mode!r}")
            return mode, None
        weights = np.asarray(mode, np.float32)
        if weights.shape != (self.options.n_representation_layers,):
            raise ValueError(f"mode weights need one value per layer ({self.options.n_representation_layers}), "
                             f"found {list(mode)}")
        return "weighted", jax.device_put(weights, replicated(self.mesh))

    # ----- public API -----
    def embed_sentence(self, tokens: Sequence[str], mode: str | Sequence[float] = "all") -> np.ndarray:
        """One sentence -> (layers, n, dim) for mode "all", else (n, dim)."""
        return next(self.embed_sentences([tokens], mode=mode))

    def embed_sentences(self, sentences: Iterable[Sequence[str]], mode: str | Sequence[float] = "all",
                        batch_size: int | None = None, sentence_vectors: bool = False,
                        allow_empty: bool = False) -> Iterator[np.ndarray]:
        """Embed a stream of tokenized sentences; yields one array per sentence, in input order.

        Memory stays bounded for any corpus (a few windows of sentences at a time). An empty sentence raises
        TokenError naming its index, or with ``allow_empty`` yields an array with 0 tokens (NaN sentence vector).
        ``batch_size``: lanes for this call (default the Embedder's).
        """
        for rows, lengths in self.embed_rows(sentences, mode, batch_size, allow_empty):
            offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            for a, b in zip(offsets[:-1], offsets[1:]):
                value = np.moveaxis(rows[a:b], 0, -2)  # ([layers,] n, dim)
                yield (value.mean(axis=-2) if b > a else np.full(value.shape[:-2] + value.shape[-1:], np.nan,
                                                                   value.dtype)) if sentence_vectors else value

    def sents2elmo(self, sentences: Sequence[Sequence[str]], output_layer: int = -1) -> list[np.ndarray]:
        """ELMoForManyLangs' ``Embedder.sents2elmo``, stateless: a list of float32 arrays in input order.

        output_layer: -1 the average of the layers (n, dim); -2 all layers (layers, n, dim); 0.. one layer.
        """
        layers = self.options.n_representation_layers
        if output_layer not in (-1, -2) and not 0 <= output_layer < layers:
            raise ValueError(f"output_layer must be -1 (average), -2 (all) or 0..{layers - 1}, found {output_layer}")
        # one layer: the token layer alone needs no LSTM, the top is a mode, others a one-hot mix (exact)
        one_hot = [float(k == output_layer) for k in range(layers)]
        mode = {-1: "average", -2: "all", 0: "token", layers - 1: "top"}.get(output_layer, one_hot)
        return list(self.embed_sentences(sentences, mode=mode))

    def embed_rows(self, sentences: Iterable[Sequence[str]], mode: str | Sequence[float] = "all",
                   batch_size: int | None = None, allow_empty: bool = False, output_dtype: str = "float32",
                   validate: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embed a stream of tokenized sentences; yields their token vectors in input order, many sentences at once.

        Yields (rows, lengths): rows (tokens, [layers,] dim) in ``output_dtype``, the tokens of consecutive
        sentences back to back, and lengths (sentences,) their token counts (0 for an allowed empty sentence).
        The cheapest way to a file: the device has already put each token's vectors in place. ``validate=False``
        skips checking that every token is a non-empty str (for tokenizer output, which is).
        """
        rows_of = self._embed_rows(sentences, mode, batch_size, allow_empty, output_dtype, validate)
        try:
            for rows, lengths, _ in rows_of:
                yield rows, lengths
        finally:  # a consumer that stops early ends the stream now, not when the generator is collected
            rows_of.close()

    def _embed_rows(self, sentences: Iterable[Sequence[str]], mode: str | Sequence[float] = "all",
                    batch_size: int | None = None, allow_empty: bool = False, output_dtype: str = "float32",
                    validate: bool = True, in_order: bool = True,
                    blocked: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
        """``embed_rows`` yielding (rows, lengths, indices): indices (sentences,) the sentences' positions in the
        stream; ``in_order`` False: each as soon as it is finished (``GatherPlan``), not after all before it;
        ``blocked``: each sentence's rows hold its (layers, n, dim) array (``EmbeddingWriter.write_rows``)."""
        lanes = _check_positive("batch_size", batch_size) or self.lanes
        mode, weights = self._mode(mode)
        shared = self._table_lock.acquire(blocking=False)
        if shared:
            tokens = self._tokens
            device = _DeviceTable(self._table, [] if self._pinned_on_device else tokens.tokens[: tokens.n_pinned])
        else:  # another stream is running on this Embedder: a private table
            tokens = TokenTable(self._capacity, self._tokens.tokens[2 : self._tokens.n_pinned],
                                self.model.characters.boundary_tokens)
            device = _DeviceTable(None, tokens.tokens[: tokens.n_pinned])
        max_lead = None
        if in_order:  # what waits behind a long sentence is bounded (Timeline.place)
            layers = math.prod(self._output_lead(mode))
            step_bytes = lanes * layers * self.options.output_dim * max(np.dtype(self.dtype).itemsize,
                                                                        np.dtype(output_dtype).itemsize)
            max_lead = max(RING_STEPS, WAITING_BYTES // step_bytes)
        stream = _Stream(self, sentences, lanes, tokens, allow_empty, validate, make_table=device.table is None,
                         max_lead=max_lead)
        completed = False
        try:
            yield from self._run(stream, device, mode, weights, np.dtype(output_dtype), in_order, blocked)
            completed = True
        finally:
            stream.stop()
            if shared:
                self._table = device.table  # the last table (earlier ones were donated to the updates)
                self._pinned_on_device = not device.unfilled
                if not completed:  # the host map may name rows the device never received: keep the pinned rows
                    tokens.clear()
                self._table_lock.release()

    def _output_lead(self, mode: str) -> tuple[int, ...]:
        """A token's output dimensions before its vector: (layers,) for mode "all", else ()."""
        return (self.options.n_representation_layers,) if mode == "all" else ()

    def _drain_plan(self, counts: list[int], lanes: int, table, ring, mode: str) -> dict | None:
        """How the blocks at a stream's end run (``lanes.drain_lanes``), from what was measured: the seconds a
        block program took to compile and a block on all lanes to run (timed once per program, ``_run``). None
        (each block on its own subset) without measurements: no block on all lanes has run twice."""
        if self.stand_in_device or self._block_compile_seconds is None:
            return None
        block_seconds = self._block_programs.get(_program_key(table, ring, lanes, mode))
        if not block_seconds:
            return None
        part = lanes // self.n_devices
        subsets = lane_subsets(part)
        compiled = {n for n in subsets
                    if _program_key(table, ring, n * self.n_devices, mode) in self._block_programs}
        overhead = self.step_overhead_lanes(part)
        compile_seconds = max(self._block_compile_seconds, DRAIN_MIN_COMPILE_SECONDS)
        return drain_lanes(counts, subsets, compiled, overhead, compile_seconds / block_seconds)

    def _run(self, stream: _Stream, device: _DeviceTable, mode: str, weights, dtype: np.dtype, in_order: bool,
             blocked: bool = False):
        """Dispatch the stream's table updates, blocks and gathers; yield gathered (rows, lengths, indices), the
        sentences in input order, or (``in_order`` False) each batch's in input order among them as they finish;
        ``blocked``: rows as ``EmbeddingWriter.write_rows`` takes them blocked (each sentence's (layers, n))."""
        lead = self._output_lead(mode)
        layers, width = (lead or (1,))[0], self.options.output_dim
        by_lane, everywhere = by_batch(self.mesh), replicated(self.mesh)
        plan = GatherPlan(round_up(RING_STEPS, self.block_steps), in_order)
        in_flight: collections.deque = collections.deque()
        ring = state = rows = lanes = drain = None
        done = 0  # steps written into the ring

        # steps read early (GatherPlan.spill), by sentence: [(parts, first, count)], steps [first, first + count)
        # of those that read_steps' parts hold one after another
        spills: dict[int, list] = {}

        def read_steps(slots: Slots) -> list | None:
            """Dispatch the reading of whole ring steps (both halves) of ``slots``' step ranges, one after another."""
            if self.stand_in_device:
                return None
            places = vector_places(plan.steps_of(slots, rows), slots.length, layers)
            chunk = rows * layers
            return [self._gather(ring, *jax.device_put((places[k : k + chunk],) * 2, everywhere))
                    for k in range(0, len(places), chunk)]

        def spill(before: int) -> bool:
            """Read early the ring steps before ``before`` still to be read (``GatherPlan.spill``)."""
            slots = plan.spill(done, before)
            if not len(slots.index):
                return False
            if not self.stand_in_device:  # the last spill's reads, done by now, kept compact on the host: each
                # read is of a whole gather's rows, mostly padding for one long sentence's ~RING_STEPS steps
                for pieces in spills.values():
                    if not isinstance(pieces[-1][0], np.ndarray):
                        pieces[-1] = (np.concatenate(steps_read(*pieces[-1])), 0, pieces[-1][2])
            parts = read_steps(slots)
            for index, first, count in zip(slots.index.tolist(), (np.cumsum(slots.length) - slots.length).tolist(),
                                           slots.length.tolist()):
                spills.setdefault(index, []).append((parts, first, count))
            return True

        def gather(limit: float) -> bool:
            """Dispatch the reading of the next ready sentences (those finished by step ``limit``)."""
            taken = plan.take(limit, rows)
            if taken is None:
                return False
            early = [spills.pop(index, None) for index in taken.index.tolist()]
            if any(pieces is not None for pieces in early):  # some read (in part) early: the rest of every one's
                # steps, in one read_steps; each put together on the host (collect)
                early = [pieces or [] for pieces in early]
                rests = taken.length - np.array([sum(count for *_, count in pieces) for pieces in early], np.int64)
                if rests.any():
                    parts = read_steps(Slots(taken.index, taken.lane, taken.start, rests))
                    for pieces, first, rest in zip(early, (np.cumsum(rests) - rests).tolist(), rests.tolist()):
                        if rest:
                            pieces.append((parts, first, rest))
                in_flight.append((early, taken, True))
            elif not taken.length.any():  # only empty sentences
                in_flight.append(([], taken))
            elif self.stand_in_device:
                in_flight.append(([np.zeros((max(rows, int(taken.length.sum())), *lead, width), dtype)], taken))
            else:
                forward_at, backward_at = (vector_places(at, taken.length, layers, blocked)
                                           for at in plan.positions(taken, rows))
                chunk = rows * layers
                parts = [self._gather(ring, *jax.device_put((forward_at[k : k + chunk], backward_at[k : k + chunk]),
                                                            everywhere))
                         for k in range(0, len(forward_at), chunk)]  # one part unless a sentence is longer than rows
                in_flight.append((parts, taken))
            return True

        def steps_read(parts: list, first: int, count: int) -> list:
            """Steps [first, first + count) of what read_steps dispatched (or their compact copy, an array):
            (count * layers, width) in pieces."""
            if isinstance(parts, np.ndarray):
                return [parts[first * layers : (first + count) * layers]]
            chunk, out = rows * layers, []
            row, end = first * layers, (first + count) * layers
            while row < end:
                k, offset = divmod(row, chunk)
                out.append(np.asarray(parts[k])[offset : offset + min(chunk - offset, end - row)])
                row += len(out[-1])
            return out

        def collect():
            parts, taken, *early = in_flight.popleft()
            n = int(taken.length.sum())
            if early:  # sentences whose ring steps were read in pieces, one list of pieces each
                if self.stand_in_device:
                    return np.zeros((n, *lead, width), dtype), taken.length, taken.index
                return np.concatenate([sentence(pieces, k) for pieces, k in zip(parts, taken.length.tolist())]), \
                    taken.length, taken.index
            out = np.asarray(parts[0]) if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])
            out = out.reshape(-1, *lead, width)[:n] if parts else np.zeros((0, *lead, width), dtype)
            return out, taken.length, taken.index

        def sentence(pieces: list, n: int) -> np.ndarray:
            """One sentence's vectors from its ring steps read in ``pieces`` (n, [layers,] width)."""
            if not n:
                return np.zeros((0, *lead, width), dtype)
            steps = np.concatenate([piece for spilled in pieces for piece in steps_read(*spilled)])
            steps = steps.reshape(n, layers, width)
            half = width // 2  # token j: the forward half of step j, the backward half of n - 1 - j (reversed)
            out = np.concatenate([steps[:, :, :half], steps[::-1, :, half:]], axis=-1)
            if blocked and lead:  # as the sentence's (layers, n) block
                out = np.ascontiguousarray(out.transpose(1, 0, 2))
            return out.reshape(-1, *lead, width)

        def fill(rows: np.ndarray, new: list[str]) -> None:
            """Write new tokens into the table at ``rows``, and the pinned rows first if they are not."""
            if device.unfilled:
                rows = np.concatenate([np.arange(len(device.unfilled)), rows])
                new, device.unfilled = device.unfilled + new, []
            device.table = self._fill(device.table, rows, new)

        for kind, item in stream:
            if device.unfilled and kind in ("block", "grow"):  # a stream with no new token
                fill(np.zeros(0, np.int32), [])
            if kind == "block":
                if drain is not None and item.active is not None:  # a stream's end: as its drain plan says
                    item = widen(item, drain[len(item.active) // self.n_devices], lanes, self.n_devices)
                end = item.first_step + self.block_steps
                while plan.oldest_start() < end - plan.steps:  # the block would overwrite steps not read yet
                    if not gather(done):
                        spill(end - plan.steps)
                if not self.stand_in_device:
                    arrays = jax.device_put((item.forward, item.backward, item.reset, item.mask), by_lane)
                    active = None if item.active is None else jax.device_put(item.active, by_lane)
                    key = _program_key(device.table, ring, len(item.forward), mode)
                    new = key not in self._block_programs
                    timed = not new and item.active is None and self._block_programs[key] is None
                    if timed:  # once per program: its second block alone, nothing else queued (a few ms idle)
                        jax.block_until_ready((device.table, state, ring))
                    started = time.perf_counter()
                    state, ring = self._block(self.params, device.table, state, ring,
                                              np.int32(item.first_step % plan.steps), *arrays, weights, active,
                                              mode=mode)
                    if new:  # the call compiled the program (on this thread; the run itself is asynchronous)
                        self._block_compile_seconds = time.perf_counter() - started
                        self._block_programs[key] = None
                    elif timed:
                        jax.block_until_ready(state)
                        self._block_programs[key] = time.perf_counter() - started
                done = end
                while plan.ready_tokens(done) >= rows and gather(done):
                    pass
            elif kind == "slots":
                plan.add(item)
            elif kind == "insert":
                fill(*item)
            elif kind == "table":  # the stream's first item where the table is not made yet
                device.table = None if self.stand_in_device else self._new_table(item)
            elif kind == "grow":
                if not self.stand_in_device:
                    grown = jax.tree.map(lambda a: jnp.pad(a, ((0, item - len(a)), (0, 0))), device.table)
                    device.table = jax.device_put(grown, everywhere)
            elif kind == "drain":
                drain = self._drain_plan(item, lanes, device.table, ring, mode)
            elif kind == "lanes":
                lanes, rows = item, item * self.block_steps  # tokens per gather: what a block takes in
                if not self.stand_in_device:
                    # numpy zeros copied in the background: jnp.zeros compiled (or loaded) a program for each shape
                    # on this thread first (~190 ms of the CLI's start on a CPU for the state and the ring)
                    shapes = jax.eval_shape(functools.partial(initial_state, self.options, item, self.dtype))
                    state = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), by_lane)
                    ring_shape = (item, plan.steps, *lead, width)
                    ring = (jax.device_put(np.zeros(ring_shape, dtype), by_lane) if self.platform == "cpu"
                            else jnp.zeros(ring_shape, dtype, device=by_lane))  # no gigabytes over an accelerator's bus
            elif kind == "end":
                while gather(float("inf")):
                    pass
            while len(in_flight) > (0 if kind == "end" else IN_FLIGHT):
                yield collect()

    def embed_file(self, input_file, output_file: str | os.PathLike, mode: str | Sequence[float] = "all",
                   batch_size: int | None = None, empty_lines: str = "error", progress: bool = True,
                   tokenizer: str = "whitespace", layout: str = "allennlp", output_dtype: str = "float32",
                   model_name: str | None = None, lines: tuple[int, int] | None = None) -> dict:
        """Embed a file of sentences (one per line) into HDF5.

        ``layout="allennlp"`` (default): the layout of AllenNLP's ``elmo`` command, datasets "0", "1", ... (line
        index) of (layers, n, dim) or (n, dim) and "sentence_to_index" (JSON {sentence: "index"}).
        ``layout="packed"``: one chunked dataset of all tokens' vectors with per-sentence offsets and texts (see
        ``embed_output``); ``open_embeddings`` reads both. The file is written under a temporary name and renamed
        when complete: an error or interruption leaves no output file. ``empty_lines``: "error" (default; the
        message names the line) or "skip" (a dataset with 0 tokens). ``tokenizer``: "whitespace" (the line is
        already tokenized) or "moses" (raw text, tokenized as the 1B Word Benchmark; needs sacremoses).
        ``input_file``: a path, "-" for stdin, or an open binary file (any iterable of lines). ``lines``: only
        lines [first, last) (0-based) are embedded, indexed from 0 (one process's share of a file).
        Returns counts and timings.
        """
        from .embed_output import EmbeddingWriter, SentenceIndex, check_output_options
        from .tokenize import get_tokenizer
        from .weights import check_output_path, write_atomic

        if empty_lines not in ("error", "skip"):
            raise ValueError(f"empty_lines must be 'error' or 'skip', found {empty_lines!r}")
        check_output_options(layout, output_dtype)
        check_output_path(output_file, inputs=(input_file,))
        tokenize = get_tokenizer(tokenizer)
        mode_name = mode if isinstance(mode, str) else "weighted " + ",".join(f"{w:g}" for w in mode)
        self._mode(mode)
        import h5py

        stats = {"sentences": 0, "tokens": 0, "seconds": 0.0}
        first, last = lines if lines is not None else (0, None)
        if last is not None:  # a share the caller counted (embed --distributed): the file is not read twice
            total = last - first
        elif isinstance(input_file, (str, os.PathLike)) and input_file != "-":
            total = count_lines(input_file) - first
        else:
            total = None

        def tokenized():
            for number, text in itertools.islice(_read_lines(input_file), first, last):
                tokens = tokenize(text)
                if not tokens and empty_lines == "error":
                    raise TokenError(f"{_name(input_file)}: line {number} is empty; remove it or use "
                                     f"empty_lines='skip' (--empty-lines skip)")
                index.add(text.strip(), number - 1 - first)  # a repeated sentence maps to its last line (AllenNLP)
                yield tokens

        def write(tmp: str) -> None:
            started = time.perf_counter()
            attrs = {"mode": mode_name, "model": model_name or "", "compute_dtype": np.dtype(self.dtype).name,
                     "tokenizer": tokenizer}
            bar = _progress_bar(total, progress)
            with h5py.File(tmp, "w") as f, _BackgroundWriter(EmbeddingWriter(f, layout=layout,
                                                                              output_dtype=output_dtype,
                                                                              attrs=attrs)) as writer:
                # the AllenNLP layout names each sentence's dataset: written as each finishes (GatherPlan), each
                # gathered as its dataset holds it
                allennlp = layout == "allennlp"
                for rows, lengths, indices in self._embed_rows(tokenized(), mode, batch_size, allow_empty=True,
                                                               output_dtype=output_dtype, validate=False,
                                                               in_order=not allennlp, blocked=allennlp):
                    writer.write_rows(rows, lengths, indices, blocked=allennlp)
                    stats["sentences"] += len(lengths)
                    stats["tokens"] += len(rows)
                    bar.update(len(lengths))
                    if not bar.disable:
                        rate = stats["tokens"] / max(bar.format_dict["elapsed"], 1e-9)
                        bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                writer.finish(index)
            bar.close()
            stats["seconds"] = time.perf_counter() - started

        # every line's text, kept on disk (a dict of 10 million lines would hold ~2.6 GB): the packed layout's
        # "texts", or AllenNLP's {sentence: line} JSON
        with SentenceIndex(os.path.dirname(os.path.abspath(output_file))) as index:
            write_atomic(output_file, write)
        return stats


class _Stream:
    """The host side in a background thread: windows of sentences -> token table updates, lane slots, blocks.

    Iterating gives (kind, item) in order: ("table", capacity) where the device table is not made yet, ("lanes", n),
    then "insert" (rows, new tokens), "grow"
    (capacity), "slots" (Slots of a window, in input order, empty sentences with length 0), "block" (Block), "drain"
    (a stream's end: the lanes per device of each block still to come, before them) and "end". An error in the
    thread (bad input, an interrupted read) is raised in the iterating thread.
    """

    def __init__(self, embedder: Embedder, sentences: Iterable[Sequence[str]], lanes: int, tokens: TokenTable,
                 allow_empty: bool, validate: bool = True, make_table: bool = False, max_lead: int | None = None):
        self.embedder, self.tokens, self.allow_empty, self.validate = embedder, tokens, allow_empty, validate
        self.make_table, self.max_lead = make_table, max_lead
        self.lanes = round_up(lanes, embedder.n_devices)
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(iter(sentences),), daemon=True,
                                       name="elmo-jax-host")
        self.thread.start()

    def __iter__(self):
        while True:
            kind, item = self.queue.get()
            if kind == "error":
                raise item
            yield kind, item
            if kind == "end":
                return

    def stop(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _put(self, kind: str, item=None) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put((kind, item), timeout=0.1)
                return
            except queue.Full:
                pass
        raise _Stopped

    def _produce(self, stream: Iterator) -> None:
        try:
            self._pack(stream)
        except _Stopped:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            try:
                self._put("error", error)
            except _Stopped:
                pass

    def _pack(self, stream: Iterator) -> None:
        window_size = WINDOW_PER_LANE * self.lanes
        ahead = list(itertools.islice(stream, LOOK_AHEAD_PER_LANE * self.lanes))
        self._check(ahead, 0)
        lanes, n_devices = self.lanes, self.embedder.n_devices
        known = len(ahead) < LOOK_AHEAD_PER_LANE * self.lanes
        if known:  # the whole input is known: no more lanes than it fills,
            steps = slot_steps(np.fromiter((len(s) for s in ahead if len(s) > 0), np.int64))
            lanes = choose_lanes(steps, self.lanes, n_devices, self.embedder.block_steps,
                                 self.embedder.step_overhead_lanes(self.lanes))
            window_size = max(1, len(ahead))  # and one window, longest first over all of it: the lanes end together
        if self.make_table:
            self.tokens.resize(self.embedder.table_rows(self.tokens, ahead if known else None))
            self._put("table", self.tokens.capacity)
        self._put("lanes", lanes)
        # blocks where few lanes are busy run only those (a short input, the end of any input)
        timeline = Timeline(lanes, self.embedder.block_steps, lane_subsets(lanes // n_devices), n_devices,
                            self.max_lead)
        # A window is placed only once TAIL_PER_LANE sentences a lane after it have been read, so the stream's last
        # sentences go into the lanes as one window, longest first: the lanes then end within a short sentence of
        # each other, not a long one (10,000 held-out lines, 256 lanes: 23 blocks, the fewest their steps fill; with
        # 4 a lane 24, 3 lanes ran 10-21 steps past the others with a long sentence placed in the window before the
        # last; read 2 a lane at a time to the end, 27 before the sentence start state).
        pending, start, exhausted = ahead, 0, known
        tail = TAIL_PER_LANE * self.lanes
        while True:
            while not exhausted and len(pending) < tail + window_size:
                more = list(itertools.islice(stream, window_size))
                self._check(more, start + len(pending))
                pending, exhausted = pending + more, len(more) < window_size
            if not pending:
                break
            cut = len(pending) if exhausted else window_size
            window, pending = pending[:cut], pending[cut:]
            self._place(timeline, window, start)
            for block in timeline.pop_blocks():
                self._put("block", block)
            start += len(window)
        blocks = timeline.pop_blocks(final=True)
        # the input's last blocks, where lanes finish (a stream's or a known input's): the consumer weighs each lane
        # subset's compilation against what it saves
        self._put("drain", [lanes // n_devices if b.active is None else len(b.active) // n_devices for b in blocks])
        for block in blocks:
            self._put("block", block)
        self._put("end")

    def _check(self, window: list, start: int) -> None:
        if self.validate:
            for offset, sentence in enumerate(window):
                _check_sentence(sentence, start + offset, self.allow_empty)

    def _place(self, timeline: Timeline, window: list, start: int) -> None:
        """Dedupe a window's tokens against the table, put its sentences into lanes, announce its slots."""
        lengths = np.fromiter(map(len, window), np.int64, len(window))
        real = lengths > 0
        slots = Slots(np.arange(start, start + len(window)), np.zeros(len(window), np.int64),
                      np.zeros(len(window), np.int64), lengths)
        if real.any():
            window = [s for s, keep in zip(window, real.tolist()) if keep] if not real.all() else window
            distinct, ids = flat_token_ids(window)
            tokens = self.tokens
            largest = self.embedder.table_rows(tokens, None)
            if tokens.capacity < largest and tokens.free() < len(distinct) and tokens.free() < sum(
                    token not in tokens.rows for token in distinct):  # a table made for a short input: grow it
                tokens.resize(largest)
                self._put("grow", largest)
            if tokens.free() < len(distinct):  # perhaps full: the live rows are worth finding
                lacking = tokens.make_room(distinct, timeline.live_rows())
                if lacking:  # rare: a huge window; a larger table (one more compilation)
                    tokens.resize(round_up(tokens.capacity + lacking, tokens.capacity))
                    self._put("grow", tokens.capacity)
            rows, new, new_rows = tokens.lookup(distinct)
            if new:
                self._put("insert", (new_rows, new))
            placed = timeline.place(slots.index[real], lengths[real], rows[ids])
            slots.lane[real], slots.start[real] = placed.lane, placed.start
        self._put("slots", slots)


class _DeviceTable:
    """The current token table of a stream (each update donates the previous one), and the pinned tokens
    (rows 0, 1, ...) whose vectors it does not hold yet."""

    def __init__(self, table: dict, unfilled: list[str]):
        self.table, self.unfilled = table, list(unfilled)


class _Stopped(Exception):
    """The consumer stopped reading: the host thread ends."""


class _BackgroundWriter:
    """Runs an EmbeddingWriter's writes in a thread, so HDF5 output overlaps the device (bounded queue)."""

    def __init__(self, writer):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=WRITER_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name="elmo-jax-writer")
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write_rows(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = error

    def write_rows(self, rows: np.ndarray, lengths: np.ndarray, indices: np.ndarray | None = None,
                   blocked: bool = False) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((rows, lengths, indices, blocked))

    def finish(self, texts) -> dict:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.writer.finish(texts)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def _program_key(table, ring, lanes_run: int, mode) -> tuple:
    """What tells block programs apart: table rows, all lanes and ring steps, the lanes run, the mode."""
    return len(table["vectors"]), *ring.shape[:2], lanes_run, mode


def _check_positive(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, found {value!r}")
    return value


def count_lines(path) -> int:
    """Lines in a file (a last line without a newline counts), read in 1 MiB chunks."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _progress_bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit=" lines", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


def _check_sentence(sentence, index: int, allow_empty: bool) -> None:
    if isinstance(sentence, str) or not isinstance(sentence, Sequence):
        raise TokenError(f"sentence {index} must be a list of str tokens, found {type(sentence).__name__}")
    if not sentence and not allow_empty:
        raise TokenError(f"sentence {index} is empty: every sentence needs at least one token")
    for j, token in enumerate(sentence):
        if not isinstance(token, str) or not token:
            raise TokenError(f"sentence {index}, token {j}: tokens must be non-empty str, found {token!r}")


def _name(source) -> str:
    return "<stdin>" if source == "-" else getattr(source, "name", str(source))


def _read_lines(source) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
    if source == "-":
        handle, close = sys.stdin.buffer, False
    elif not isinstance(source, (str, bytes, os.PathLike)):  # an open binary file or any iterable of lines
        handle, close = source, False
    else:
        handle, close = open(source, "rb"), True  # opened now, so a missing file fails before any output
    return _decode(handle, close, _name(source))


def _decode(handle, close: bool, name: str) -> Iterator[tuple[int, str]]:
    try:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as error:
                raise TokenError(f"{name}: line {number} is not UTF-8 text ({error})") from None
            yield number, text.rstrip("\r\n")
    finally:
        if close:
            handle.close()
