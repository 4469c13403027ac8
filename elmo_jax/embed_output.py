"""Embeddings files of ``elmo-jax embed``: ``EmbeddingWriter``, ``open_embeddings`` and ``merge_parts``.

Sentence i (line i, 0-based) has n_i tokens; its text is the line, stripped (AllenNLP's key for it).

- "allennlp" (AllenNLP's ``elmo`` command): one dataset per sentence, named by its 0-based line index "0",
  "1", ..., each (layers, n_i, dim) (mode "all") or (n_i, dim); "sentence_to_index", a (1,) vlen-str dataset with
  the JSON {sentence text: "line index"} (a repeated sentence maps to its last line; AllenNLP's one string).
- "packed": "embeddings" holds every token's vectors in sentence order, (total_tokens, layers, dim) or
  (total_tokens, dim), chunked ~1 MiB along the token axis (resizable, uncompressed, so the file is ~the
  payload); "offsets" int64 (n_sentences + 1,): sentence i is embeddings[offsets[i]:offsets[i + 1]]
  (the first two axes swapped for (layers, n_i, dim)); "texts" uint8 holds every sentence's text, UTF-8, back
  to back (chunked 64 KiB; any text, NUL included, which HDF5's strings cannot hold) and "text_offsets" int64
  (n_sentences + 1,) where each starts: sentence i's text is texts[text_offsets[i]:text_offsets[i + 1]].
  Four datasets instead of millions of objects, each read and written in pieces: the sentence-to-index map
  (``Embeddings.sentence_to_index``) is made from the texts when asked for. (Packed files of format_version 1
  held AllenNLP's JSON "sentence_to_index" instead, one string of ~100 bytes a line that was made, written and
  read whole; they are still read.)

Root attributes (AllenNLP readers ignore them; its own files have none): format = "elmo_jax.embeddings",
format_version = 2, layout, output_dtype, n_sentences, n_tokens, and the caller's (mode, model, ...).

Merging (``embed --distributed``): each process writes a part file of consecutive lines, and
``merge_parts`` writes a small file reading exactly like a one-process run, without copying vectors:
allennlp dataset "i" is an external link to its part's dataset, packed "embeddings" a virtual dataset
concatenating the parts' and "offsets", "texts" and "text_offsets" real datasets. Links and virtual sources
hold paths relative to the merged file's directory. HDF5 (checked with 2.0 in tests/test_embed_output.py)
looks them up there before the current directory, so reading works from any directory and the folder can move
as a whole (HDF5_EXT_PREFIX / HDF5_VDS_PREFIX, when set, come first). The "parts" attribute lists the part files;
``open_embeddings`` checks they exist, since a virtual dataset silently reads fill values for a missing one.
"""

from __future__ import annotations

import array
import collections.abc
import itertools
import json
import operator
import os
import re
import tempfile
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _encode_json_str

import h5py
import numpy as np

LAYOUTS = ("allennlp", "packed")
OUTPUT_DTYPES = ("float32", "float16")
FORMAT, FORMAT_VERSION = "elmo_jax.embeddings", 2  # 2: packed files hold "texts", not the JSON index
TEXTS_CHUNK = 16384  # packed "texts": sentences a read or write
TEXT_CHUNK_BYTES = 1 << 16  # packed "texts" chunk size
CHUNK_BYTES = 1 << 20  # packed chunk size along the token axis
MAX_BUFFERS = 1024  # buffers per os.pwritev call (Linux's IOV_MAX)
BUFFER_CHUNKS = 16  # packed: chunks buffered in memory per write (one h5py call per 16 MiB)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_RESERVED = ("format", "format_version", "layout", "output_dtype", "n_sentences", "n_tokens", "parts")
_EXPECTED = ("expected datasets '0', '1', ... and 'sentence_to_index' (AllenNLP layout) or 'embeddings', "
             "'offsets', 'texts' and 'text_offsets' (packed)")


class EmbeddingsFileError(ValueError):
    """A missing, unreadable or inconsistent embeddings file; the message is one line naming the path."""


def check_output_options(layout: str, output_dtype: str) -> None:
    """ValueError naming the field unless layout is in LAYOUTS and output_dtype in OUTPUT_DTYPES."""
    for name, value, allowed in (("layout", layout, LAYOUTS), ("output_dtype", output_dtype, OUTPUT_DTYPES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, found {value!r}")


class EmbeddingWriter:
    """Writes sentences' arrays into an open, empty h5py.File in either layout (see the module docstring).

    Args:
      f: h5py.File open for writing; layout: "allennlp" or "packed"; output_dtype: "float32" or "float16"
      (arrays are cast on write); attrs: extra root attributes (str or numbers), e.g. {"mode": "all"}.

    AllenNLP's layout, one contiguous dataset a sentence, is bound by HDF5's cost per dataset. In a file on the POSIX
    driver (h5py's default, "sec2") each dataset is made with its space allocated at once and never filled, and the
    writer puts the raw bytes there itself (``os.pwritev`` on the file's descriptor, one call for each run of
    datasets that lie back to back; HDF5 never reads or writes raw data that is not written through it). Other
    drivers write through HDF5 (H5Dwrite). The 23 gathered batches of 10,000 held-out lines (the built-in model, all
    layers, 551 MB) took 0.43-0.47 s alone so, blocked, against 0.83-0.86 s through H5Dwrite with each sentence
    transposed. (Metadata blocks of 1 MB, so that a whole batch lies back to back, were faster alone but took ~1 s
    more system time inside ``elmo-jax embed``, in 3 runs of each.)
    """

    def __init__(self, f: h5py.File, *, layout: str = "allennlp", output_dtype: str = "float32",
                 attrs: dict | None = None):
        check_output_options(layout, output_dtype)
        clash = sorted(set(attrs or {}) & set(_RESERVED))
        if clash:
            raise ValueError(f"attrs must not set {clash}: EmbeddingWriter sets them")
        self.f, self.layout, self.dtype, self.attrs = f, layout, np.dtype(output_dtype), dict(attrs or {})
        self.n_sentences = self.n_tokens = 0
        self._offsets = array.array("q", [0])  # packed: token offset of each sentence, then the total
        self._dataset = self._buffer = None  # packed: made at the first sentence, whose shape gives (layers, dim)
        self._filled = self._written = 0  # packed: rows in the buffer, rows in the file
        # allennlp: the HDF5 type, and the dataspace of each shape, made once
        self._type = h5py.h5t.py_create(self.dtype)
        self._spaces: dict[tuple[int, ...], h5py.h5s.SpaceID] = {}
        # allennlp on the POSIX driver: the file's descriptor, raw data written by os.pwritev into space allocated
        # when each dataset is made (never filled by HDF5)
        self._fd = f.id.get_vfd_handle() if layout == "allennlp" and f.driver == "sec2" else None
        self._dcpl = None
        if self._fd is not None:
            self._dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            self._dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            self._dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)

    def write(self, arrays: Sequence[np.ndarray]) -> None:
        """Append the next sentences in input order: each (layers, n, dim) or (n, dim), n >= 0."""
        for a in arrays:
            a = np.asarray(a)
            if a.ndim not in (2, 3):
                raise ValueError(f"sentence {self.n_sentences}: expected an array (layers, n, dim) or (n, dim), "
                                 f"found shape {a.shape}")
            self.write_rows(np.moveaxis(a, -2, 0), [a.shape[-2]])  # (n, [layers,] dim): a view

    def write_rows(self, rows: np.ndarray, lengths: Sequence[int], indices: Sequence[int] | None = None,
                   blocked: bool = False) -> None:
        """Append sentences as one array: rows (tokens, [layers,] dim), the tokens of consecutive sentences back
        to back, lengths (sentences,) their token counts (``Embedder.embed_rows``). ``indices``: (sentences,) their
        indices, in any order where the layout is "allennlp" (each names its dataset); None: the next ones in input
        order. ``blocked`` (AllenNLP's layout): each sentence's rows, ``rows[start:end]`` (n, layers, dim), hold its
        (layers, n, dim) array in C order (``Embedder``'s gather lays the vectors out so for this layout, and its
        datasets are then written without a transposing copy)."""
        lengths = np.asarray(lengths, np.int64)
        if rows.ndim not in (2, 3) or len(rows) != lengths.sum():
            raise ValueError(f"sentence {self.n_sentences}: expected rows (tokens, [layers,] dim) with "
                             f"{int(lengths.sum())} tokens, found shape {rows.shape}")
        if indices is None:
            indices = range(self.n_sentences, self.n_sentences + len(lengths))
        elif len(indices) != len(lengths):
            raise ValueError(f"sentence {self.n_sentences}: {len(lengths)} lengths but {len(indices)} indices")
        if self.layout == "allennlp":
            ends = np.cumsum(lengths).tolist()
            run = _Run(self._fd)
            for index, start, end in zip(np.asarray(indices).tolist(), [0, *ends[:-1]], ends):
                sentence = rows[start:end]
                if blocked and rows.ndim == 3:
                    sentence = sentence.reshape(sentence.shape[1], end - start, sentence.shape[2])
                else:
                    sentence = np.moveaxis(sentence, 0, -2)  # a view
                self._write_dataset(str(index), sentence, run)
                self.n_sentences += 1
            run.write()
        else:
            if blocked and rows.ndim == 3:
                raise ValueError("the packed layout takes rows token by token, not blocked")
            if not np.array_equal(indices, np.arange(self.n_sentences, self.n_sentences + len(lengths))):
                raise ValueError(f"sentence {self.n_sentences}: the packed layout takes sentences in input order, "
                                 f"found indices {list(indices)[:4]}...")
            self._append(rows, lengths)
            self.n_sentences += len(lengths)
        self.n_tokens += len(rows)

    def _write_dataset(self, name: str, array: np.ndarray, run: _Run) -> None:
        """``f.create_dataset(name, data=array.astype(dtype))`` through h5py's low-level API, the type and dataspace
        made once (10,000 sentences: 0.33 s against 0.43 s); on the POSIX driver its raw data goes to ``run``."""
        array = np.ascontiguousarray(array, self.dtype)
        space = self._spaces.get(array.shape)
        if space is None:
            space = self._spaces[array.shape] = h5py.h5s.create_simple(array.shape)
        dataset = h5py.h5d.create(self.f.id, name.encode(), self._type, space, dcpl=self._dcpl)
        if not array.size:
            return
        if self._fd is None:
            dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, array)
        else:
            run.add(dataset.get_offset(), array)

    def _append(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Copy consecutive sentences' rows (tokens, ...), ``lengths`` tokens each, into the buffer, writing it out
        whenever it is full."""
        if self._buffer is None:
            self._create(rows.shape[1:])
        if rows.shape[1:] != self._buffer.shape[1:]:
            raise ValueError(f"sentence {self.n_sentences}: packed layout needs the (layers, dim) of sentence 0, "
                             f"{self._buffer.shape[1:]}, found {rows.shape[1:]}")
        self._offsets.extend((self._offsets[-1] + np.cumsum(lengths)).tolist())
        while len(rows):
            take = min(len(rows), len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = rows[:take]  # casts to output_dtype
            self._filled, rows = self._filled + take, rows[take:]
            if self._filled == len(self._buffer):
                self._flush()

    def _create(self, row_shape: tuple[int, ...]) -> None:
        """The resizable "embeddings" (0, *row_shape) in ~1 MiB chunks, and a buffer of BUFFER_CHUNKS chunks."""
        chunk_rows = max(1, CHUNK_BYTES // max(1, self.dtype.itemsize * int(np.prod(row_shape))))
        self._dataset = self.f.create_dataset("embeddings", (0, *row_shape), self.dtype,
                                              maxshape=(None, *row_shape), chunks=(chunk_rows, *row_shape))
        self._buffer = np.empty((chunk_rows * BUFFER_CHUNKS, *row_shape), self.dtype)

    def _flush(self) -> None:
        end = self._written + self._filled
        self._dataset.resize(end, axis=0)
        chunk = self._dataset.chunks[0]
        whole = self._filled // chunk * chunk  # whole chunks go straight to the file (5x faster than h5py's path)
        for row in range(0, whole, chunk):
            self._dataset.id.write_direct_chunk((self._written + row,) + (0,) * (self._buffer.ndim - 1),
                                                self._buffer[row : row + chunk])
        if whole < self._filled:  # the last, partial chunk (written is always a whole number of chunks)
            self._dataset[self._written + whole : end] = self._buffer[whole : self._filled]
        self._written, self._filled = end, 0

    def finish(self, texts: SentenceIndex | Sequence[str]) -> dict:
        """Write the buffered rows, "offsets" and the texts (packed) or "sentence_to_index" (AllenNLP's layout), and
        the root attributes. ``texts``: each sentence's text in line order, or a ``SentenceIndex`` of them (as
        ``Embedder.embed_file`` keeps them while it runs; its adds are lines 0, 1, ... in turn).

        Returns {"sentences": n_sentences, "tokens": n_tokens}."""
        if isinstance(texts, collections.abc.Mapping):
            raise TypeError("finish takes each sentence's text in line order, not a {text: index} map")
        if not isinstance(texts, SentenceIndex):
            with SentenceIndex() as index:
                index.update((text, i) for i, text in enumerate(texts))
                return self.finish(index)
        if self.layout == "packed":
            if self._dataset is None:  # no sentence, so no (layers, dim): an empty 1-d dataset
                self.f.create_dataset("embeddings", (0,), self.dtype)
            else:
                self._flush()
            self.f.create_dataset("offsets", data=np.frombuffer(self._offsets, np.int64))
            _write_texts(self.f, texts, self.n_sentences)
        else:
            _write_index(self.f, texts)
        self.f.attrs.update(_root_attrs(self.attrs, self.layout, self.dtype, self.n_sentences, self.n_tokens))
        return {"sentences": self.n_sentences, "tokens": self.n_tokens}


class _Run:
    """Raw data for consecutive places of a file: buffers gathered while they lie back to back, each run written by
    one ``os.pwritev``."""

    def __init__(self, fd: int | None):
        self.fd, self.offset, self.end, self.buffers = fd, 0, 0, []

    def add(self, offset: int, array: np.ndarray) -> None:
        """Write a C-contiguous ``array``'s bytes at ``offset`` (now or with the run it extends)."""
        if self.buffers and (offset != self.end or len(self.buffers) == MAX_BUFFERS):
            self.write()
        if not self.buffers:
            self.offset = self.end = offset
        self.buffers.append(memoryview(array).cast("B"))
        self.end += array.nbytes

    def write(self) -> None:
        """Write the run gathered so far (a short write is continued)."""
        buffers, offset, self.buffers = self.buffers, self.offset, []
        while buffers:
            written = os.pwritev(self.fd, buffers, offset)
            if written <= 0:
                raise OSError(f"wrote {written} bytes at offset {offset} of the embeddings file")
            offset += written
            done = 0
            while done < len(buffers) and written >= len(buffers[done]):
                written -= len(buffers[done])
                done += 1
            buffers = buffers[done:]
            if written:
                buffers[0] = buffers[0][written:]


def _root_attrs(extra: dict, layout: str, dtype, n_sentences: int, n_tokens: int) -> dict:
    return {**extra, "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
            "output_dtype": np.dtype(dtype).name, "n_sentences": n_sentences, "n_tokens": n_tokens}


class SentenceIndex:
    """AllenNLP's "sentence_to_index", built line by line without holding the lines: ``add(text, i)`` as
    ``d[text] = str(i)`` on a dict ``d``, and ``to_json()`` gives ``json.dumps(d)`` (each text where it first came,
    with its last index), byte for byte.

    A dict of 10 million lines' texts holds ~2.6 GB (~260 bytes a line). Here each text goes, JSON-encoded, to a
    temporary file (in memory up to ``SPOOL_BYTES``, then in ``folder``), and memory keeps 16 bytes a line: the
    text's hash and its index. ``to_json`` reads the texts back; only those whose hash repeats are compared.
    ``texts()`` gives every text added, in turn (the packed layout's "texts").
    """

    SPOOL_BYTES = 32 << 20
    _hash = staticmethod(hash)  # a test swaps in one that collides

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = folder
        self._texts = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES, dir=folder)
        self._hashes = array.array("q")
        self._indices = array.array("q")
        self._pending: list[str] = []  # texts not written yet

    def __len__(self) -> int:
        """The texts added (a repeated one counts each time)."""
        return len(self._indices)

    def add(self, text: str, index: int) -> None:
        self._hashes.append(self._hash(text))
        self._indices.append(index)
        self._pending.append(_encode_json_str(text))  # escaped: no newline inside
        if len(self._pending) == 4096:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._texts.write(("\n".join(self._pending) + "\n").encode("ascii"))
            self._pending = []

    def update(self, items) -> None:
        """``add`` each (text, index) in turn."""
        for text, index in items:
            self.add(text, index)

    def close(self) -> None:
        """Remove the temporary file."""
        self._texts.close()

    def __enter__(self) -> SentenceIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def to_json(self) -> bytes:
        """``json.dumps`` of the dict the adds make (ASCII, so bytes), written out and read back whole once."""
        with tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES, dir=self.folder) as out:
            out.write(b"{")
            separator = b""
            for text, index in self.items():
                out.write(separator + text + b': "%d"' % index)
                separator = b", "
            out.write(b"}")
            out.seek(0)
            return out.read()

    def items(self):
        """(text, index) of the dict the adds make, in its order: each text where it first came, with its last
        index; the text JSON-encoded as ``json.dumps`` writes it (ASCII bytes, quotes included)."""
        self._flush()
        hashes = np.frombuffer(self._hashes, np.int64)
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        suspect = np.zeros(len(hashes), bool)  # texts whose hash another text has: perhaps repeated
        suspect[order[same]] = suspect[order[same + 1]] = True
        suspects = np.flatnonzero(suspect).tolist()
        last: dict[bytes, int] = {}  # a suspect's last index (equal texts have equal JSON)
        for line, i in zip(self._lines(suspects), suspects):
            last[line] = self._indices[i]
        following = iter([*suspects, -1])
        next_suspect = next(following)
        self._texts.seek(0)
        for i, (line, index) in enumerate(zip(self._texts, self._indices)):
            if i == next_suspect:
                next_suspect = next(following)
                index = last.pop(line, None)  # given where it first came; None: given already
                if index is None:
                    continue
            yield line[:-1], index

    def texts(self):
        """Every text added, in the order added (a repeated one each time)."""
        self._flush()
        self._texts.seek(0)
        while lines := list(itertools.islice(self._texts, 4096)):  # one JSON array a batch: ~5x faster than a line
            yield from json.loads(b"[" + b",".join(lines) + b"]")

    def in_line_order(self) -> bool:
        """Whether the adds were indices 0, 1, 2, ... in turn (one text a line)."""
        return bool(np.array_equal(np.frombuffer(self._indices, np.int64), np.arange(len(self._indices))))

    def _lines(self, positions: list[int]):
        """The stored lines (JSON text and newline) at ascending ``positions``."""
        if positions:
            self._texts.seek(0)
            wanted = iter(positions)
            target = next(wanted)
            for i, line in enumerate(self._texts):
                if i == target:
                    yield line
                    target = next(wanted, None)
                    if target is None:
                        return


def _write_index(f: h5py.File, index: SentenceIndex) -> None:
    """AllenNLP's "sentence_to_index": one JSON string."""
    f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))[0] = index.to_json()


def _write_texts(f: h5py.File, index: SentenceIndex, n_sentences: int) -> None:
    """Packed "texts" and "text_offsets" of n_sentences, from an ``index`` of one add a line in line order, written
    TEXTS_CHUNK sentences at a time."""
    if len(index) != n_sentences or not index.in_line_order():
        raise ValueError(f"the packed layout needs one text a sentence in line order: {n_sentences} sentences, "
                         f"{len(index)} texts{'' if index.in_line_order() else ' not in line order'}")
    data = f.create_dataset("texts", (0,), np.uint8, maxshape=(None,), chunks=(TEXT_CHUNK_BYTES,))
    offsets = array.array("q", [0])
    texts = index.texts()
    while batch := list(itertools.islice(texts, TEXTS_CHUNK)):
        start, encoded = offsets[-1], []
        for text in batch:
            try:
                encoded.append(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError(f"sentence {len(offsets) - 1}'s text is not valid Unicode (a lone surrogate?)") \
                    from None
            offsets.append(offsets[-1] + len(encoded[-1]))
        if offsets[-1] > start:
            data.resize(offsets[-1], axis=0)
            data[start:] = np.frombuffer(b"".join(encoded), np.uint8)
    f.create_dataset("text_offsets", data=np.frombuffer(offsets, np.int64))


def _plain(value):
    """An HDF5 attribute value as a Python str, number or list."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def open_embeddings(path: str | os.PathLike) -> Embeddings:
    """Open an embeddings file of either layout (or written by AllenNLP) for lazy reading."""
    return Embeddings(path)


class Embeddings(collections.abc.Sequence):
    """The sentences of an embeddings file, read lazily: ``emb[i]`` is (layers, n_i, dim) or (n_i, dim),
    as the AllenNLP layout's dataset str(i), in the file's dtype. ``attrs``: root attributes (empty for
    AllenNLP's files); ``layout``: "allennlp" or "packed"; ``sentence_to_index``: {sentence: "index"};
    ``text(i)`` and ``texts()``: the sentences' texts (packed files, which hold every line's)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.file = _open_file(self.path)
        self._texts = None  # packed ("texts", "text_offsets"); None where the file holds AllenNLP's JSON index
        try:
            self.attrs = {key: _plain(value) for key, value in self.file.attrs.items()}
            self.layout = _detect_layout(self.file, self.path)
            _check_parts(self.file, self.path, self.attrs.get("parts", []))
            if self.layout == "packed":
                self._embeddings = self.file["embeddings"]
                self._offsets = _read_offsets(self.file, self.path)  # (n_sentences + 1,): small
                self._len = len(self._offsets) - 1
                self._texts = _text_datasets(self.file, self.path, self._len)
            else:
                self._len = _count_sentences(self.file, self.path, self.attrs.get("n_sentences"))
        except BaseException:
            self.file.close()
            raise
        self._index = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        i = operator.index(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"{self.path}: sentence {i} is out of range for {self._len} sentences")
        i %= self._len
        if self.layout == "packed":
            rows = self._embeddings[self._offsets[i] : self._offsets[i + 1]]  # (n, layers, dim) or (n, dim)
            return np.ascontiguousarray(np.moveaxis(rows, 0, -2))
        try:
            return self.file[str(i)][()]
        except KeyError:
            link = self.file.get(str(i), getlink=True)
            what = f"part file {link.filename}" if isinstance(link, h5py.ExternalLink) else "it"
            raise EmbeddingsFileError(f"{self.path}: cannot read dataset '{i}': {what} is missing") from None

    @property
    def sentence_to_index(self) -> dict[str, str]:
        """{text: "index"}, AllenNLP's map: each text where it first came, with its last line's index."""
        if self._index is None:
            if self._texts is None:
                self._index = json.loads(self._raw_index())
            else:
                self._index = {text: str(i) for i, text in enumerate(self.texts())}
        return self._index

    def text(self, i: int) -> str:
        """Sentence i's text (the line, stripped): packed files."""
        texts, offsets = self._need_texts()
        i = operator.index(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"{self.path}: sentence {i} is out of range for {self._len} sentences")
        i %= self._len
        start, end = offsets[i : i + 2].tolist()
        return self._decode(texts[start:end].tobytes() if end > start else b"", i)

    def texts(self):
        """Every sentence's text in line order, read TEXTS_CHUNK sentences at a time: packed files."""
        texts, offsets = self._need_texts()

        def read():
            for first in range(0, self._len, TEXTS_CHUNK):
                at = offsets[first : first + TEXTS_CHUNK + 1].astype(np.int64)
                if np.any(np.diff(at) < 0):
                    raise EmbeddingsFileError(f"{self.path}: 'text_offsets' decrease after sentence {first}")
                blob = texts[at[0] : at[-1]].tobytes() if at[-1] > at[0] else b""
                at -= at[0]
                for k, (start, end) in enumerate(zip(at[:-1].tolist(), at[1:].tolist())):
                    yield self._decode(blob[start:end], first + k)
        return read()

    def _decode(self, raw: bytes, i: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise EmbeddingsFileError(f"{self.path}: the text of sentence {i} is not UTF-8") from None

    def _need_texts(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._texts is None:
            raise EmbeddingsFileError(f"{self.path}: holds no text a line (the {self.layout} layout"
                                      f"{' of format_version 1' if self.layout == 'packed' else ''}), only "
                                      f"'sentence_to_index'")
        return self._texts

    def index_items(self):
        """(text, "index") of ``sentence_to_index`` in its order, one at a time (no dict of them all)."""
        if self._texts is not None:
            with SentenceIndex() as index:
                index.update((text, i) for i, text in enumerate(self.texts()))
                for text, i in index.items():
                    yield json.loads(text), str(i)
            return
        raw = self._raw_index()
        decode, space = json.JSONDecoder().raw_decode, _JSON_SPACE.match
        try:
            at = space(raw, 0).end()
            if raw[at] != "{":
                raise ValueError("not a JSON object")
            at = space(raw, at + 1).end()
            while raw[at] != "}":
                text, at = decode(raw, at)
                at = space(raw, at).end()
                if raw[at] != ":":
                    raise ValueError(f"expected ':' at {at}")
                index, at = decode(raw, space(raw, at + 1).end())
                if not isinstance(text, str) or not isinstance(index, str):
                    raise ValueError(f"expected a string of a string before {at}")
                yield text, index
                at = space(raw, at).end()
                if raw[at] == ",":
                    at = space(raw, at + 1).end()
                    if raw[at] == "}":
                        raise ValueError(f"expected a string at {at}")
                elif raw[at] != "}":
                    raise ValueError(f"expected ',' or '}}' at {at}")
            if space(raw, at + 1).end() != len(raw):
                raise ValueError(f"extra text at {at + 1}")
        except (ValueError, IndexError) as error:
            raise EmbeddingsFileError(f"{self.path}: 'sentence_to_index' is not a JSON object of strings "
                                      f"({error})") from None

    def _raw_index(self) -> str:
        raw = self.file["sentence_to_index"][0]
        return raw.decode("utf-8") if isinstance(raw, bytes) else raw

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_file(path: str) -> h5py.File:
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise EmbeddingsFileError(f"{path}: {what}; expected an HDF5 embeddings file")
    if not h5py.is_hdf5(path):
        raise EmbeddingsFileError(f"{path}: not an HDF5 file; expected an HDF5 embeddings file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise EmbeddingsFileError(f"{path}: cannot open as HDF5 ({error}); expected an HDF5 embeddings file") from None


def _detect_layout(f: h5py.File, path: str) -> str:
    if ("texts" in f or "sentence_to_index" in f) and "embeddings" in f and "offsets" in f:
        return "packed"
    if "sentence_to_index" in f and "embeddings" not in f and "offsets" not in f:
        return "allennlp"
    raise EmbeddingsFileError(f"{path}: {_EXPECTED}; found {list(itertools.islice(f.keys(), 6))}")


def _check_parts(f: h5py.File, path: str, parts: list[str]) -> None:
    """A merged file's part files must exist (a virtual dataset reads fill values for a missing source)."""
    names = list(parts)
    if "embeddings" in f and f["embeddings"].is_virtual:
        names += [source.file_name for source in f["embeddings"].virtual_sources()]
    folder = os.path.dirname(os.path.abspath(path))
    for name in dict.fromkeys(names):
        if name != "." and not os.path.isfile(os.path.join(folder, name)):
            raise EmbeddingsFileError(f"{path}: part file {name} is missing; expected it relative to {folder}")


def _text_datasets(f: h5py.File, path: str, n_sentences: int) -> tuple[h5py.Dataset, h5py.Dataset] | None:
    """Packed ("texts", "text_offsets"), checked but not read; None in a file of format_version 1 (JSON index)."""
    if "texts" not in f:
        return None
    texts, offsets, problem = f["texts"], f.get("text_offsets"), None
    if not isinstance(texts, h5py.Dataset) or texts.dtype != np.uint8 or texts.ndim != 1:
        problem = "found 'texts' " + (f"{texts.dtype}, {texts.shape}" if isinstance(texts, h5py.Dataset) else "a group")
    elif not isinstance(offsets, h5py.Dataset) or offsets.shape != (n_sentences + 1,) or offsets.dtype.kind not in "iu":
        problem = ("no 'text_offsets'" if offsets is None else "found 'text_offsets' " +
                   (f"{offsets.dtype}, {offsets.shape}" if isinstance(offsets, h5py.Dataset) else "a group"))
    else:
        ends = [int(offsets[0]), int(offsets[-1])]
        if ends != [0, texts.shape[0]]:
            problem = f"found 'text_offsets' {ends[0]} ... {ends[1]}"
    if problem:
        raise EmbeddingsFileError(f"{path}: expected 'texts' uint8 and 'text_offsets' int ({n_sentences + 1},) "
                                  f"from 0 to the {texts.shape[0] if isinstance(texts, h5py.Dataset) else '?'} bytes "
                                  f"of 'texts', {problem}")
    return texts, offsets


def _read_offsets(f: h5py.File, path: str) -> np.ndarray:
    """Packed "offsets", checked against "embeddings": (n_sentences + 1,) int64, 0 ... total_tokens."""
    offsets, embeddings = f["offsets"], f["embeddings"]
    rows, problem = embeddings.shape[0], None
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or offsets.shape[0] == 0:
        problem = f"found dtype {offsets.dtype}, shape {offsets.shape}"
    else:
        values = offsets[()].astype(np.int64)
        if values[0] != 0 or values[-1] != rows:
            problem = f"found {values[0]} ... {values[-1]}"
        elif np.any(np.diff(values) < 0):
            problem = "found decreasing offsets"
        elif embeddings.ndim not in (2, 3) and len(values) > 1:
            problem = f"found 'embeddings' of shape {embeddings.shape}"
    if problem:
        raise EmbeddingsFileError(f"{path}: expected 'offsets' int (n_sentences + 1,) non-decreasing from 0 to "
                                  f"the {rows} rows of 'embeddings', {problem}")
    return values


def _count_sentences(f: h5py.File, path: str, n: int | None) -> int:
    """Datasets "0" ... "n-1" of the AllenNLP layout: n from the attributes if there, else by counting names."""
    if n is None:
        numbers = [int(key) for key in f.keys() if key.isascii() and key.isdigit()]
        n, ok = len(numbers), max(numbers, default=-1) == len(numbers) - 1
    else:
        ok = (n == 0 or str(n - 1) in f) and str(n) not in f
    if not ok:
        raise EmbeddingsFileError(f"{path}: expected datasets '0' ... '{n - 1}' ({n} sentences), found others")
    return n


def merge_parts(path: str | os.PathLike, parts: Sequence[str | os.PathLike], *, layout: str) -> None:
    """Write at ``path`` a file reading like one process's output, from part files in line order.

    Part k (an EmbeddingWriter file) holds lines start_k ... start_k + n_k - 1, start_k = n_0 + ... + n_(k-1).
    Vectors stay in the parts: allennlp dataset "i" links to part k's dataset str(i - start_k); packed
    "embeddings" (total_tokens, ...) is a virtual dataset over the parts'. Paths are relative to path's folder.
    """
    check_output_options(layout, OUTPUT_DTYPES[0])
    path = os.fspath(path)
    infos = [_part_info(os.fspath(part), layout, path) for part in parts]
    starts = np.cumsum([0] + [info["n"] for info in infos]).tolist()
    dtype = infos[0]["attrs"]["output_dtype"] if infos else OUTPUT_DTYPES[0]
    for info in infos:
        if info["attrs"]["output_dtype"] != dtype:
            raise EmbeddingsFileError(f"cannot merge into {path}: part {info['rel']} is "
                                      f"{info['attrs']['output_dtype']}, expected {dtype} as the first part")
    with SentenceIndex(os.path.dirname(os.path.abspath(path))) as index:
        for part, start in zip(parts, starts):  # read before path is made: a bad part leaves no file
            with open_embeddings(part) as emb:
                try:
                    if layout == "packed":  # every line's text, in line order
                        index.update((text, start + i) for i, text in enumerate(emb.texts()))
                    else:  # AllenNLP's map: later lines win
                        index.update((text, int(i) + start) for text, i in emb.index_items())
                except (EmbeddingsFileError, ValueError) as error:
                    raise EmbeddingsFileError(f"cannot merge into {path}: {error}") from None
        with h5py.File(path, "w") as f:
            if layout == "allennlp":
                for info, start in zip(infos, starts):
                    for i in range(info["n"]):
                        f[str(start + i)] = h5py.ExternalLink(info["rel"], str(i))
                _write_index(f, index)
            else:
                _merge_packed(f, infos, path, dtype)
                _write_texts(f, index, starts[-1])
            extra = {k: v for k, v in infos[0]["attrs"].items() if k not in _RESERVED} if infos else {}
            f.attrs.update(_root_attrs(extra, layout, dtype, starts[-1], sum(info["tokens"] for info in infos)))
            f.attrs["parts"] = [info["rel"] for info in infos]


def _part_info(part: str, layout: str, path: str) -> dict:
    """Check one part file and read what merging needs: its path relative to path's folder, counts, attrs."""
    try:
        with open_embeddings(part) as emb:
            if (emb.attrs.get("format"), emb.layout) != (FORMAT, layout):
                found = "" if emb.attrs.get("format") == FORMAT else " without the format attribute"
                raise EmbeddingsFileError(f"{part}: expected a part file written by EmbeddingWriter in the {layout} "
                                          f"layout, found the {emb.layout} layout{found}")
            rel = os.path.relpath(os.path.abspath(part), os.path.dirname(os.path.abspath(path)))
            info = {"rel": rel, "n": len(emb), "attrs": emb.attrs,
                    "tokens": emb.attrs["n_tokens"]}
            if layout == "packed":
                info.update(shape=emb._embeddings.shape, offsets=emb._offsets)
            return info
    except EmbeddingsFileError as error:
        raise EmbeddingsFileError(f"cannot merge into {path}: {error}") from None


def _merge_packed(f: h5py.File, infos: list[dict], path: str, dtype: str) -> None:
    """Virtual "embeddings" concatenating the parts' along the token axis, and the shifted "offsets"."""
    row_shapes = [info["shape"][1:] for info in infos if len(info["shape"]) > 1]  # (0,) for a part with no line
    for info in infos:
        if len(info["shape"]) > 1 and info["shape"][1:] != row_shapes[0]:
            raise EmbeddingsFileError(f"cannot merge into {path}: part {info['rel']} has embeddings {info['shape']}, "
                                      f"expected (tokens, {', '.join(map(str, row_shapes[0]))}) as the first part")
    starts = np.cumsum([0] + [info["tokens"] for info in infos]).tolist()
    virtual = h5py.VirtualLayout((starts[-1], *row_shapes[0]) if row_shapes else (0,), dtype)
    for info, start in zip(infos, starts):
        if info["tokens"]:
            virtual[start : start + info["tokens"]] = h5py.VirtualSource(info["rel"], "embeddings", shape=info["shape"])
    f.create_virtual_dataset("embeddings", virtual, fillvalue=np.nan)  # NaN, not 0, should a part vanish
    shifted = [info["offsets"][1:] + start for info, start in zip(infos, starts)]
    f.create_dataset("offsets", data=np.concatenate([np.zeros(1, np.int64), *shifted]))
