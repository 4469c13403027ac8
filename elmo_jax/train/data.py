"""Training data with bilm-tf's semantics: sharded sentence files cut into stateful windows.

Each line of a shard is one tokenized sentence. A sentence becomes ``<S> w1 .. wn </S>``; every batch
row is an endless stream of such sentences cut into windows of ``unroll_steps`` tokens, so the LSTM
state of a row carries from one window to the next (bilm-tf's ``LMDataset._get_batch``). The target
of each position is the next token of the stream; a sentence's ``</S>`` is only ever a target.

The backward LM reads its own stream (bilm-tf's ``BidirectionalLMDataset``): the same sentences,
each reversed (``</S> wn .. w1 <S>``), in the same rows and positions; not the forward window flipped.

The stream is a pure function of (seed, shards): epoch ``e`` shuffles the shard order and each
shard's sentences with ``numpy.random.default_rng((seed, e))``. A position in it is one integer, the
number of batches already read, so a checkpoint holds that integer and ``batches(start=n)``
continues exactly where batch ``n`` would have come.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np

from ..characters import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, TokenError, Vocabulary, token_to_char_ids


class DataError(ValueError):
    """Training or test data that cannot be read: no shards, an empty shard, a bad vocabulary."""


def shard_files(pattern: str) -> list[str]:
    """The files matched by a glob, sorted; DataError naming the glob if there are none."""
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise DataError(f"no data files match {pattern!r} (expected a glob like 'data/*.txt' naming "
                        f"text files with one tokenized sentence per line)")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"{empty[0]}: shard file is empty (matched by {pattern!r}); every shard needs at "
                        f"least one sentence")
    return files


def load_vocabulary(path: str | os.PathLike, n_tokens_vocab: int | None = None) -> Vocabulary:
    """A bilm-tf training vocabulary: ``<S>``, ``</S>``, ``<UNK>`` present, size = options' n_tokens_vocab.

    Raises DataError naming the file (missing, no specials, size mismatch).
    """
    try:
        vocab = Vocabulary.from_file(path, require_specials=True)
    except TokenError as error:
        raise DataError(str(error)) from None
    if n_tokens_vocab is not None and len(vocab) != n_tokens_vocab:
        raise DataError(f"{os.fspath(path)}: vocabulary has {len(vocab)} tokens but the options say "
                        f"n_tokens_vocab={n_tokens_vocab}; they must be equal (the softmax has one row per token)")
    return vocab


def read_shard(path: str) -> list[list[str]]:
    """One shard's sentences as token lists (blank lines skipped); DataError if there are none."""
    try:
        with open(path, encoding="utf-8") as f:
            sentences = [line.split() for line in f]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: shard is not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: shard cannot be read ({error})") from None
    sentences = [s for s in sentences if s]
    if not sentences:
        raise DataError(f"{path}: shard has no sentences (only blank lines)")
    return sentences


class _Sentence:
    """One sentence of the stream: token ids (n + 2,) with <S>/</S>, and its tokens for char ids."""

    __slots__ = ("chars", "ids", "tokens")

    def __init__(self, ids: np.ndarray, tokens: list[str]):
        self.ids, self.tokens, self.chars = ids, tokens, None

    def char_ids(self, cache: dict, max_chars: int) -> np.ndarray:
        """(n + 2, max_chars) int32, computed once."""
        if self.chars is None:
            rows = []
            for token in [BOS_TOKEN, *self.tokens, EOS_TOKEN]:
                row = cache.get(token)
                if row is None:
                    row = cache[token] = token_to_char_ids(token, max_chars)
                rows.append(row)
            self.chars = np.stack(rows)
        return self.chars


class LMDataset:
    """Batches of stateful windows over sharded sentence files (bilm-tf's (Bidirectional)LMDataset).

    Args:
      pattern: glob of shard files.
      vocab: the training Vocabulary (ids for targets; unknown words -> <UNK>).
      batch_size, unroll_steps: each batch is (batch_size, unroll_steps) tokens.
      seed: the stream is a pure function of seed (shuffle=True) and the shards.
      shuffle: shuffle shards and sentences per epoch (training); False reads them in order (test).
      loop: endless epochs (training); False stops after one pass and drops the last, partial batch
        (bilm-tf's test mode).
      max_chars: characters per token.
      rows: (first, end) of the batch rows to build (multi-host: each host builds only its own rows of the
        global batch; every host still follows all rows' positions, so the streams are the global ones).
    """

    def __init__(self, pattern: str, vocab: Vocabulary, batch_size: int, unroll_steps: int, *, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, max_chars: int = 50, rows: tuple[int, int] | None = None):
        if batch_size < 1 or unroll_steps < 1:
            raise DataError(f"batch_size and unroll_steps must be >= 1, found {batch_size} and {unroll_steps}")
        for special in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN):
            if special not in vocab.index:
                raise DataError(f"{vocab.source}: vocabulary lacks the special token {special}")
        self.pattern, self.files = pattern, shard_files(pattern)
        self.vocab, self.batch_size, self.unroll_steps = vocab, batch_size, unroll_steps
        self.seed, self.shuffle, self.loop, self.max_chars = seed, shuffle, loop, max_chars
        self.rows = (0, batch_size) if rows is None else tuple(rows)
        if not 0 <= self.rows[0] < self.rows[1] <= batch_size:
            raise DataError(f"rows {self.rows} must be a non-empty range within the batch of {batch_size} rows")
        self._char_cache: dict[str, np.ndarray] = {}

    def sentences(self) -> Iterator[_Sentence]:
        """The sentence stream: epoch after epoch (one epoch if not loop)."""
        epoch = 0
        while True:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self.files)) if self.shuffle else range(len(self.files))
            for index in order:
                sentences = read_shard(self.files[index])
                if self.shuffle:
                    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
                for tokens in sentences:
                    yield _Sentence(self.vocab.encode(tokens), tokens)
            epoch += 1
            if not self.loop:
                return

    def batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches from position ``start`` (batches already read) on.

        Each batch is a dict of numpy arrays (batch = the rows built, all by default):
          token_ids, next_token_id (batch, unroll_steps) int32; char_ids (batch, unroll_steps, max_chars) int32;
          and token_ids_reverse, next_token_id_reverse, char_ids_reverse for the backward stream.
        """
        stream = self.sentences()
        rows: list[list] = [[None, 0] for _ in range(self.batch_size)]  # per row: [sentence, offset]
        produced = 0
        while True:
            batch = self._fill(stream, rows, write=produced >= start)
            if batch is None:
                return
            if produced >= start:
                yield batch
            produced += 1

    def _fill(self, stream: Iterator[_Sentence], rows: list[list], write: bool) -> dict[str, np.ndarray] | None:
        """One batch: advance every row by unroll_steps tokens (bilm-tf's _get_batch); None at the end of data."""
        first, end = self.rows
        batch, steps = end - first, self.unroll_steps
        if write:
            out = {name: np.zeros((batch, steps), np.int32)
                   for name in ("token_ids", "next_token_id", "token_ids_reverse", "next_token_id_reverse")}
            out["char_ids"] = np.zeros((batch, steps, self.max_chars), np.int32)
            out["char_ids_reverse"] = np.zeros((batch, steps, self.max_chars), np.int32)
        for r, row in enumerate(rows):
            i, write_row = r - first, write and first <= r < end
            pos = 0
            while pos < steps:
                sentence, offset = row
                if sentence is None or len(sentence.ids) - offset <= 1:  # only </S> left: it was the last target
                    sentence = next(stream, None)
                    if sentence is None:
                        return None
                    row[0], row[1], offset = sentence, 0, 0
                n = min(len(sentence.ids) - 1 - offset, steps - pos)
                if write_row:
                    ids, chars = sentence.ids, sentence.char_ids(self._char_cache, self.max_chars)
                    rev_ids, rev_chars = ids[::-1], chars[::-1]
                    out["token_ids"][i, pos : pos + n] = ids[offset : offset + n]
                    out["next_token_id"][i, pos : pos + n] = ids[offset + 1 : offset + n + 1]
                    out["char_ids"][i, pos : pos + n] = chars[offset : offset + n]
                    out["token_ids_reverse"][i, pos : pos + n] = rev_ids[offset : offset + n]
                    out["next_token_id_reverse"][i, pos : pos + n] = rev_ids[offset + 1 : offset + n + 1]
                    out["char_ids_reverse"][i, pos : pos + n] = rev_chars[offset : offset + n]
                    if offset + n == len(ids) - 1:
                        sentence.chars = None  # the row is done with it; free the memory
                row[1] = offset + n
                pos += n
        return out if write else {}
