"""Packed lanes: the host side of the Embedder's biLSTM (numpy only, no JAX).

A fixed number of lanes (rows) runs in fixed blocks of time steps. Each lane is a stream of sentences
back to back, each in its own slot of ``n`` steps, one a token (``slot_steps``)::

    forward lane 0:  a1 a2 a3 d1 d2 g1 ...       reset at each slot's first step to the state after <S>
    backward lane 0: a3 a2 a1 d2 d1 g...         the same slots, each sentence reversed; reset to the state after </S>

No LM runs a boundary step. The forward LM reads <S> before the tokens and the backward LM </S> after them, but
stateless, each does so from zero state, so the state after the boundary is the same for every sentence: the
device computes it once (``bilm.sentence_start_state``) and a slot's reset sets it. Neither LM needs the other
boundary: its output there is no token's vector (stateless outputs drop <S> and </S>, as AllenNLP's
ElmoEmbedder does). So a slot is two steps shorter than the sentence with both boundaries (~10% of the biLSTM at
19 tokens a sentence).

Sentences come in windows; a window's sentences go longest first into the lane that frees up first, so
the lanes end together and padding exists only at the very end of the input. A slot's steps hold rows of
the token table (``TokenTable``: the token vectors that live on the device), so a block is four small
integer/bool arrays: forward rows, backward rows, reset and mask, each (lanes, block_steps).

The device keeps the last steps of every lane's outputs in a ring; ``GatherPlan`` says where each finished
sentence's vectors are, in input order or as they finish: the forward half of token j at its slot's step j, the
backward half at step n - 1 - j. A short input known in advance gets no more lanes than it fills (``choose_lanes``), and
blocks where few lanes are busy run only those (``lane_subsets``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .characters import BOS_TOKEN, EOS_TOKEN

BOS_ROW, EOS_ROW = 0, 1  # the token table's first rows


def slot_steps(lengths: np.ndarray) -> np.ndarray:
    """(sentences,) tokens -> (sentences,) int64 steps of their slots: one a token (no boundary step)."""
    return np.asarray(lengths, np.int64)


def within(counts: np.ndarray) -> np.ndarray:
    """(groups,) counts -> (sum(counts),) each item's position within its group: [0, 1, .., counts[0] - 1, 0, ..]."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


class Slots(NamedTuple):
    """Where a window's sentences run. index: (sentences,) their positions in the input; lane, start:
    (sentences,) their lane and first step; length: (sentences,) their tokens, without <S> and </S>."""

    index: np.ndarray
    lane: np.ndarray
    start: np.ndarray
    length: np.ndarray


class Block(NamedTuple):
    """One block of the packed biLSTM: forward, backward (table rows, int32), reset, mask (bool); each
    (lanes, block_steps), or (n, block_steps) for the n lanes ``active`` ((n,) int32, ascending) when only
    those run (see ``lane_subsets``). ``first_step``: the block's first step in the lanes' time."""

    forward: np.ndarray
    backward: np.ndarray
    reset: np.ndarray
    mask: np.ndarray
    first_step: int
    active: np.ndarray | None = None


def lane_subsets(lanes: int) -> tuple[int, ...]:
    """The lane counts a block may run with, most first: all lanes, a quarter, an eighth, a sixteenth, one.

    At the end of an input (and all through a short one) few lanes are still busy, a long sentence alone at the
    very end; a block then runs only the fewest of these that hold its busy lanes. Each count is one compiled
    program, and one lane is a matrix-vector product per step: at 2x4096 on the 2-core CPU 6.5 ms a step
    against 125 ms for 128 lanes.
    """
    return tuple(sorted({n for n in (lanes, lanes // 4, lanes // 8, lanes // 16, 1) if n >= 1}, reverse=True))


def fewest_lanes(subsets: tuple[int, ...], busy: int) -> int:
    """The lanes a block runs with: the fewest of ``subsets`` that hold its ``busy`` lanes."""
    return min(n for n in subsets if n >= busy)


def drain_lanes(counts: Sequence[int], subsets: tuple[int, ...], compiled: set[int], step_overhead: float,
                compile_blocks: float) -> dict[int, int]:
    """The lanes each block at an input's end runs with, when compiling a program must pay for itself.

    The blocks come with the fewest of ``subsets`` that hold their busy lanes (``Timeline``); each subset not yet
    ``compiled`` costs ``compile_blocks`` (seconds to compile a block program over seconds to run a block on all
    lanes) and a block on n lanes costs (n + step_overhead) / (all + step_overhead) blocks. Of every choice of
    programs to compile, the cheapest (of equals, the fewest programs): a count left out runs with the fewest
    chosen or compiled lanes that hold it (``widen``). With the built-in model on a CPU a 32-lane block saves
    ~0.1 s against ~0.5 s to compile it, so an input's last blocks run on all lanes; at 2x4096 a block on one
    lane saves ~3.7 s of ~4 s.

    Args:
      counts: lanes per device of each block at the end (each one of ``subsets``); subsets: ``lane_subsets``, the
        first all lanes; compiled: the subsets with a compiled program.
    Returns:
      {count: lanes it runs with}.
    """
    everyone = subsets[0]
    candidates = [n for n in subsets if n not in compiled]
    best = None
    for k in range(len(candidates) + 1):
        for extra in itertools.combinations(candidates, k):
            allowed = sorted({*(n for n in compiled if n in subsets), *extra})
            if not allowed or allowed[-1] < max(counts, default=0):
                continue  # some count would have no program
            runs = {n: min(a for a in allowed if a >= n) for n in set(counts)}
            cost = sum((runs[n] + step_overhead) / (everyone + step_overhead) for n in counts) + k * compile_blocks
            if best is None or cost < best[0]:
                best = (cost, runs)
    return best[1]


def widen(block: Block, n: int, lanes: int, devices: int = 1) -> Block:
    """``block`` run with n lanes per device (at least its own): idle lanes of each device fill the rest, as in
    ``Timeline`` (mask False: they keep their state and write zeros); n = lanes // devices gives all lanes."""
    part = lanes // devices
    if block.active is None or len(block.active) == n * devices:
        return block
    have = len(block.active) // devices
    active, source = [], []
    for d, mine in enumerate(block.active.reshape(devices, have) % part):
        chosen = np.concatenate([mine, np.setdiff1d(np.arange(part), mine)[: n - have]])
        order = np.argsort(chosen, kind="stable")
        active.append(d * part + chosen[order])
        source.append(np.concatenate([d * have + np.arange(have), np.full(n - have, -1)])[order])
    source = np.concatenate(source)
    kept = source >= 0

    def take(a: np.ndarray) -> np.ndarray:
        out = np.zeros((len(source), a.shape[1]), a.dtype)
        out[kept] = a[source[kept]]
        return out

    arrays = (block.forward, block.backward, block.reset, block.mask)
    active = np.concatenate(active).astype(np.int32)
    return Block(*map(take, arrays), block.first_step, None if n == part else active)  # all lanes: their program


def assign_lanes(free: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longest first into the lane that frees up first (LPT scheduling), so lanes end together.

    Args:
      free: (lanes,) int64, the step at which each lane is free; updated in place.
      steps: (sentences,) the steps each sentence needs (``slot_steps``).
    Returns:
      lane, start: (sentences,) each sentence's lane and first step, in the order of ``steps``.
    """
    lane = np.empty(len(steps), np.int32)
    start = np.empty(len(steps), np.int64)
    heap = [(int(t), r) for r, t in enumerate(free)]
    heapq.heapify(heap)
    for s in np.argsort(-steps, kind="stable").tolist():
        t, r = heap[0]
        lane[s], start[s] = r, t
        heapq.heapreplace(heap, (t + int(steps[s]), r))
    for t, r in heap:
        free[r] = t
    return lane, start


def choose_lanes(steps: np.ndarray, max_lanes: int, multiple: int, block_steps: int,
                 step_overhead: float = 32.0) -> int:
    """Lanes for a whole input known in advance (packed longest first in one window).

    No more lanes than the input fills for one block each: the ring of outputs and each gather are as large as
    all lanes (one sentence needs one lane, not 128). Below that, the lanes whose blocks cost least, a step
    costing its lanes (``lane_subsets``: only the busy ones run) plus ``step_overhead`` lanes' worth: reading
    the weights once, and few lanes' smaller matmuls. 32 fits the 2-core CPU: with the step times measured
    at 2x4096 (1 lane 7.7 ms, 32 lanes 46 ms, 128 lanes 127 ms) it picks the fastest lanes for 30, 100, 280,
    300 and 900 sentences of ``sentences.txt``. Every sentence longer than the lanes' common end runs on past it
    in a smaller block, so fewer lanes can pay: 300 held-out sentences, one of 188 tokens, get 32 lanes. A
    model, not a measurement: no lanes-plus-a-constant cost fits a CPU's steps throughout. Feature-major steps
    cost less beside their lanes (at 2x4096, 1 to 128 lanes: 4.6, 8.5, 10.8, 13.6, 18.1, 33.6, 68.4 ms), so the
    Embedder gives those 8 (``Embedder.step_overhead_lanes``): simulated from those step times it then picks the
    fastest lanes for 300 and 900 held-out and ``sentences.txt`` sentences, and for 2,500 128 lanes within 2% of
    64's time (with 32: 128 lanes for 900, ~13% slower than 64).

    Args:
      steps: (sentences,) ``slot_steps`` of each sentence; max_lanes: the most lanes; multiple: lanes are a multiple
      of it (the device count; each device runs the same lane subset); block_steps: the blocks' length.
    """
    lanes, needed = multiple, -(-int(steps.sum()) // block_steps)
    while lanes < min(needed, max_lanes):
        lanes *= 2
    lanes, best = min(lanes, max(max_lanes, multiple)), None
    while True:
        free = np.zeros(lanes, np.int64)
        assign_lanes(free, steps)  # each lane is busy from step 0 to free[lane]
        part, subsets = lanes // multiple, lane_subsets(lanes // multiple)
        starts = np.arange(0, int(free.max(initial=0)), block_steps)
        per_device = (free.reshape(multiple, part)[None] > starts[:, None, None]).sum(axis=2).max(axis=1)
        cost = sum(fewest_lanes(subsets, b) * multiple + step_overhead for b in per_device.tolist())
        best = min(best or (cost, -lanes), (cost, -lanes))  # the cheapest; of equals, the most lanes
        if lanes <= multiple:
            return -best[1]
        lanes = max(multiple, (lanes // 2) // multiple * multiple)


def slot_rows(token_rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sentences' table rows in their slots (``slot_steps``): forward the tokens, backward the tokens reversed.

    Args:
      token_rows: (tokens,) the table rows of all sentences' tokens, back to back.
      lengths: (sentences,) tokens per sentence.
    Returns:
      forward, backward: (tokens,) int32.
    """
    token_rows = np.asarray(token_rows, np.int32)
    # token j of a sentence of n tokens: forward at its slot's step j, backward at step n - 1 - j
    lengths = np.asarray(lengths, np.int64)
    ends = np.repeat(np.cumsum(lengths), lengths)  # each token's slot end
    return token_rows, token_rows[ends - 1 - within(lengths)]


class Timeline:
    """Each lane's steps that are placed but not yet emitted as blocks: rows, reset and mask from ``base`` on."""

    def __init__(self, lanes: int, block_steps: int, subsets: tuple[int, ...] | None = None, devices: int = 1,
                 max_lead: int | None = None):
        """subsets: the lane counts per device a block may run with (``lane_subsets``; default all lanes only);
        devices: the lanes are split in this many equal, contiguous parts (a device each); max_lead: no sentence
        starts more than this many steps before the last end placed so far (``place``)."""
        self.lanes, self.block_steps, self.devices, self.max_lead = lanes, block_steps, devices, max_lead
        self.subsets = subsets or (lanes // devices,)
        self.base = 0  # the first step held (a multiple of block_steps)
        self.free = np.zeros(lanes, np.int64)  # the step at which each lane is free
        self.forward = np.zeros((lanes, 0), np.int32)
        self.backward = np.zeros((lanes, 0), np.int32)
        self.reset = np.zeros((lanes, 0), bool)
        self.mask = np.zeros((lanes, 0), bool)
        self._dropped = 0  # steps popped off the front of the arrays' memory since it was last made (pop_blocks)

    def place(self, index: np.ndarray, lengths: np.ndarray, token_rows: np.ndarray) -> Slots:
        """Put sentences into lanes (``assign_lanes``) and their rows into the timeline.

        index, lengths: (sentences,) input positions and token counts (>= 1); token_rows: (tokens,) their rows.

        With ``max_lead``, every lane is first free no earlier than ``max_lead`` steps before the last end placed.
        Read in input order, a sentence that finishes before one placed earlier waits for it: behind a sentence of
        10,000 tokens the other lanes' 255 x 10,000 tokens waited (6.9 GB of vectors on the host). Bounded, they
        wait at most ``max_lead`` steps, and the lanes idle while the long sentence runs on (a block then runs only
        the fewest lanes that hold it, ``lane_subsets``).
        """
        if self.max_lead is not None:
            np.maximum(self.free, self.free.max(initial=0) - self.max_lead, out=self.free)
        steps = slot_steps(lengths)
        lane, start = assign_lanes(self.free, steps)
        self._grow(int(self.free.max()) - self.base)
        forward, backward = slot_rows(token_rows, lengths)
        lane_of_step = np.repeat(lane, steps)
        step = np.repeat(start - self.base, steps) + within(steps)
        self.forward[lane_of_step, step] = forward
        self.backward[lane_of_step, step] = backward
        self.mask[lane_of_step, step] = True
        self.reset[lane, start - self.base] = True
        return Slots(index, lane, start, lengths)

    def _grow(self, steps: int) -> None:
        extra = steps - self.forward.shape[1]
        if extra > 0:
            extra = -(-max(extra, self.forward.shape[1]) // self.block_steps) * self.block_steps  # amortised
            for name in ("forward", "backward", "reset", "mask"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros((self.lanes, extra), old.dtype)], axis=1))
            self._dropped = 0

    def pop_blocks(self, final: bool = False) -> list[Block]:
        """The blocks whose every lane is decided (all of them with ``final``), removed from the timeline."""
        end = int(self.free.max() if final else self.free.min()) - self.base
        count = (-(-end // self.block_steps) if final else end // self.block_steps)
        T = self.block_steps
        self._grow(count * T)
        blocks = [self._block(k * T, (k + 1) * T) for k in range(count)]
        if count:  # the rest as views, copied once they are outweighed by the steps dropped before them: a copy
            # at every pop cost time quadratic in a long sentence's steps (behind one of 40,000 tokens, 3.8 s)
            self._dropped += count * T
            compact = self._dropped > self.forward.shape[1] - count * T
            for name in ("forward", "backward", "reset", "mask"):
                rest = getattr(self, name)[:, count * T :]
                setattr(self, name, rest.copy() if compact else rest)
            self._dropped = 0 if compact else self._dropped
            self.base += count * T
        return blocks

    def _block(self, first: int, end: int) -> Block:
        """Steps [first, end) of the held ones: all lanes, or on every device the same fewest of ``subsets`` that
        hold its busy lanes (idle lanes fill the rest: their mask is False, so they keep their state and write
        zeros). ``active`` then lists device 0's lanes, then device 1's, ... each part ascending."""
        part = self.lanes // self.devices
        busy = self.mask[:, first:end].any(axis=1).reshape(self.devices, part)
        n = fewest_lanes(self.subsets, int(busy.sum(axis=1).max()))
        arrays = (self.forward, self.backward, self.reset, self.mask)
        if n == part:  # copies: a view would keep the whole timeline alive while the block waits in a queue (a
            # sentence of 10,000 steps: 256 lanes x 10 bytes a step each, 500 MB for the blocks of a stream's queue)
            return Block(*(a[:, first:end].copy() for a in arrays), self.base + first)
        mine = [np.sort(np.concatenate([np.flatnonzero(b), np.flatnonzero(~b)])[:n]) for b in busy]
        active = np.concatenate([d * part + m for d, m in enumerate(mine)]).astype(np.int32)
        return Block(*(a[active, first:end] for a in arrays), self.base + first, active)

    def live_rows(self) -> np.ndarray:
        """Table rows that placed but unemitted steps still read."""
        return np.unique(np.concatenate([self.forward[self.mask], self.backward[self.mask]]))


class TokenTable:
    """Host map of the device's token table: token -> row, for ``capacity`` rows.

    Rows 0 and 1 are <S> and </S>, then an optional pinned vocabulary (AllenNLP's vocab_to_cache), then tokens as
    they come. When a window's new tokens do not fit, ``make_room`` frees the rows of the tokens read in the fewest
    windows (counts halved at each eviction, so a token that stops coming goes in time), never a pinned row, a row
    that placed steps still read or a token of that window; new tokens then take free rows. No row ever moves on the
    device: a table that renumbered its rows held two copies of itself there while it did (+544 MB with the built-in
    model's first-layer gates) and dropped every row but the live ones, common words included.
    """

    def __init__(self, capacity: int, pinned: Sequence[str] = (), boundaries: tuple[str, str] = (BOS_TOKEN, EOS_TOKEN)):
        """boundaries: the input tokens that are the model's sentence boundaries (``BiLM.characters``)."""
        words = [*boundaries, *(w for w in dict.fromkeys(pinned) if w not in boundaries)]
        if capacity < len(words):
            raise ValueError(f"token table capacity {capacity} is smaller than the pinned vocabulary ({len(words)})")
        self.capacity, self.n_pinned = capacity, len(words)
        self.tokens: list[str | None] = words  # row -> token (None: a freed row), as far as rows have been used
        self.rows: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.uses = np.zeros(capacity, np.int64)  # windows that read each row since it was filled (halved as they go)
        self._free: list[int] = []  # freed rows, below len(self.tokens)

    def lookup(self, tokens: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Rows of a window's distinct ``tokens``; new ones are added.

        Returns (rows (len(tokens),) int32, new tokens, their rows (new,) int32). The caller makes room first
        (``make_room``)."""
        get = self.rows.get
        rows = np.fromiter((get(t, -1) for t in tokens), np.int32, len(tokens))
        missing = np.flatnonzero(rows < 0)
        new = [tokens[i] for i in missing.tolist()]
        if len(new) > self.free():
            raise ValueError(f"token table overflow: {len(new)} new tokens, {self.free()} free rows of {self.capacity}")
        reused = min(len(new), len(self._free))
        fresh = np.arange(len(self.tokens), len(self.tokens) + len(new) - reused)
        new_rows = np.concatenate([np.asarray(self._free[len(self._free) - reused:], np.int64), fresh]).astype(np.int32)
        del self._free[len(self._free) - reused:]
        for token, row in zip(new[:reused], new_rows[:reused].tolist()):  # freed rows first
            self.tokens[row] = token
        self.tokens.extend(new[reused:])
        self.rows.update(zip(new, new_rows.tolist()))
        rows[missing] = new_rows
        self.uses[rows] += 1
        return rows, new, new_rows

    def free(self) -> int:
        return self.capacity - len(self.tokens) + len(self._free)

    def make_room(self, tokens: list[str], live_rows: np.ndarray) -> int:
        """Free rows for a window's distinct ``tokens`` where they do not fit; ``live_rows``: rows that placed steps
        still read. Frees at least what the window lacks and at least an eighth of the table at once (a window's
        tokens are then looked at once per eighth, not once per window). Returns the rows still lacking (0, or what
        a larger table must add)."""
        present = [row for row in map(self.rows.get, tokens) if row is not None]
        lacking = len(tokens) - len(present) - self.free()
        if lacking <= 0:
            return 0
        kept = np.zeros(self.capacity, bool)
        kept[: self.n_pinned] = True
        kept[np.asarray(live_rows, np.int64)] = True
        kept[np.asarray(present, np.int64)] = True
        kept[len(self.tokens):] = True
        kept[self._free] = True
        candidates = np.flatnonzero(~kept)
        evicted = candidates[np.argsort(self.uses[candidates], kind="stable")[: max(lacking, self.capacity // 8)]]
        for row in evicted.tolist():
            del self.rows[self.tokens[row]]
            self.tokens[row] = None
        self._free.extend(evicted.tolist())
        self.uses[evicted] = 0
        self.uses //= 2
        return max(lacking - len(evicted), 0)

    def resize(self, capacity: int) -> None:
        """Another capacity: larger (rows past the old capacity are free), or, for a table the device does not hold
        yet, smaller down to the rows in use."""
        if capacity < len(self.tokens):
            raise ValueError(f"token table capacity {capacity} is smaller than the {len(self.tokens)} rows in use")
        self.uses = np.concatenate([self.uses[:capacity], np.zeros(max(capacity - self.capacity, 0), np.int64)])
        self.capacity = capacity

    def clear(self) -> None:
        """Keep the pinned rows only (an abandoned stream: the device may lack rows that the map names)."""
        self.tokens = self.tokens[: self.n_pinned]
        self.rows = {t: i for i, t in enumerate(self.tokens)}
        self.uses[:] = 0
        self._free = []


def flat_token_ids(sentences: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Dedupe a window's tokens: (distinct tokens in first-seen order, (tokens,) int32 index into them)."""
    flat = list(itertools.chain.from_iterable(sentences))
    distinct = dict.fromkeys(flat)
    for i, token in enumerate(distinct):
        distinct[token] = i
    ids = np.fromiter(map(distinct.__getitem__, flat), np.int32, len(flat))
    return list(distinct), ids


class GatherPlan:
    """Which steps of the device's output ring to read, sentence by sentence.

    The ring holds the last ``steps`` steps of every lane (block b is written at step (b * block_steps) %
    steps), so a sentence can be read once its last step is written and until the ring comes round to its
    first. Sentences are read whole, up to ``rows`` tokens at a time: the device gathers them into one (rows, ...)
    array that the host hands on as it is. ``in_order``: in input order, each sentence after all before it (what
    ``Embedder.embed_rows`` yields); else each as soon as it is finished, in input order among those (an AllenNLP
    layout file names each sentence's dataset by its index). Packed longest first, a window's sentences finish in
    no order: read in input order, the stream's last window (8 sentences a lane) was read only after its last
    block, and the writer wrote it alone at the end while the devices idled.
    """

    FIELDS = ("index", "lane", "start", "length", "kept")

    def __init__(self, steps: int, in_order: bool = True):
        self.steps, self.in_order = steps, in_order
        self.index = np.zeros(0, np.int64)  # the sentences not read yet, in input order
        self.lane = np.zeros(0, np.int64)
        self.start = np.zeros(0, np.int64)
        self.length = np.zeros(0, np.int64)
        self.kept = np.zeros(0, np.int64)  # each one's first step still only in the ring (``spill``)

    def add(self, slots: Slots) -> None:
        """The next sentences in input order (empty ones have length 0 and are ready at once)."""
        for name in self.FIELDS:
            value = getattr(slots, "start" if name == "kept" else name)
            setattr(self, name, np.concatenate([getattr(self, name), value.astype(np.int64)]))

    def __len__(self) -> int:
        return len(self.index)

    def _unread(self) -> np.ndarray:
        """(pending,) bool: which sentences have steps still only in the ring."""
        return (self.length > 0) & (self.kept < self.start + slot_steps(self.length))

    def oldest_start(self) -> float:
        """The first step still to be read from the ring (inf when nothing is waiting)."""
        unread = self._unread()
        return float(self.kept[unread].min()) if unread.any() else float("inf")

    def spill(self, done: int, before: int) -> Slots:
        """The sentences with steps before step ``before`` still only in the ring, which the next block would
        overwrite: a long sentence still running, or finished ones waiting in input order behind it. Their steps
        written so far, [kept, min(end, done)), are to be read now (``Slots``: index, lane, and start and length
        of those steps); a running one's rest later.

        So the ring keeps its size whatever the sentences' lengths. Grown instead (as it was), one long sentence
        grew every lane's steps: 256 lanes x 32,768 steps x 3 KB, 25 GB, for a sentence of 20,000 tokens."""
        chosen = np.flatnonzero(self._unread() & (self.kept < before))
        first = self.kept[chosen]
        end = np.minimum(self.start[chosen] + slot_steps(self.length[chosen]), done)
        self.kept[chosen] = end
        return Slots(self.index[chosen], self.lane[chosen], first, end - first)

    def steps_of(self, slots: Slots, rows: int) -> np.ndarray:
        """Ring positions of the steps of ``slots`` (each [start, start + length) of its lane), one after another:
        (k,) int32, k the steps rounded up to a multiple of ``rows`` (padding reads position 0)."""
        total = int(slots.length.sum())
        positions = np.zeros(max(rows, -(-total // rows) * rows), np.int32)
        positions[:total] = (np.repeat(slots.lane * self.steps, slots.length)
                             + (np.repeat(slots.start, slots.length) + within(slots.length)) % self.steps)
        return positions

    def ready(self, done: int) -> np.ndarray:
        """(k,) positions among the sentences not read yet of those that may be read now (``done`` steps written),
        ascending: all the finished ones, or in order the finished ones before the first that is not."""
        finished = self.start + slot_steps(self.length) <= done  # an empty sentence has length 0 and start 0
        if self.in_order:
            return np.arange(len(finished) if finished.all() else int(np.argmin(finished)))
        return np.flatnonzero(finished)

    def ready_tokens(self, done: int) -> int:
        return int(self.length[self.ready(done)].sum())

    def take(self, done: int, rows: int) -> Slots | None:
        """The first ready sentences with at most ``rows`` tokens in all (or one longer sentence alone); of one with
        steps read early (``spill``), ``start`` is the first step still in the ring."""
        ready = self.ready(done)
        if len(ready) == 0:
            return None
        within = int(np.searchsorted(np.cumsum(self.length[ready]), rows, side="right"))
        taken = ready[: max(within, 1)]
        slots = Slots(self.index[taken], self.lane[taken], self.kept[taken], self.length[taken])
        left = np.ones(len(self.index), bool)
        left[taken] = False
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[left])
        return slots

    def positions(self, slots: Slots, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Ring positions (lane * steps + step % steps) of the forward and backward halves of each token.

        Token j of a sentence of n tokens in slot [a, a + n): forward at step a + j, backward at step a + n - 1 - j
        (its slot is reversed). Returns two (k,) int32 arrays, k = the tokens rounded up to a multiple
        of ``rows`` (padding reads position 0).
        """
        forward = self.steps_of(slots, rows)  # token j at its slot's step j
        total = int(slots.length.sum())
        backward = forward.copy()
        backward[:total] = slot_rows(forward[:total], slots.length)[1]  # each sentence's steps reversed
        return forward, backward


def vector_places(positions: np.ndarray, lengths: np.ndarray, layers: int, blocked: bool = False) -> np.ndarray:
    """Where each output vector lies in the ring, layers apart (``embed.gather_tokens``).

    Args:
      positions: (tokens,) ring positions of consecutive sentences' tokens (``GatherPlan.positions``), padding
        after the sum(lengths) real ones; lengths: (sentences,) their token counts; layers: vectors a position.
      blocked: the sentences' (layers, n) blocks one after another, each in C order (AllenNLP's layout stores a
        sentence as (layers, n, dim)); else token by token, each token's layers in turn.
    Returns:
      (tokens * layers,) int32 places position * layers + layer, in output order; the padding's last.
    """
    positions = np.asarray(positions, np.int64)
    if not blocked or layers == 1:
        return (positions[:, None] * layers + np.arange(layers)).astype(np.int32).ravel()
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    sizes = layers * lengths  # each sentence's vectors
    within_sentence = within(sizes)  # layer * n + j
    n = np.repeat(lengths, sizes)
    token = np.repeat(np.cumsum(lengths) - lengths, sizes) + within_sentence % n
    places = np.empty(len(positions) * layers, np.int32)
    places[: total * layers] = positions[token] * layers + within_sentence // n
    places[total * layers :] = (positions[total:, None] * layers + np.arange(layers)).ravel()
    return places
