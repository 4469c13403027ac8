"""elmo_jax.embed_output: both layouts and dtypes round trip, AllenNLP's own files, merged part files (read
from another directory and after moving the folder), file size, and each error message."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from elmo_jax import embed_output
from elmo_jax.embed_output import (
    EmbeddingsFileError,
    EmbeddingWriter,
    SentenceIndex,
    check_output_options,
    merge_parts,
    open_embeddings,
)

ATTRS = {"mode": "all", "model": "built-in", "compute_dtype": "float32"}


def make_sentences(n: int, layers: int | None = 3, dim: int = 8, max_tokens: int = 12, seed: int = 0):
    """n float32 arrays (layers, n_i, dim) (or (n_i, dim) for layers=None), some with 0 tokens, and their texts."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_tokens + 1, n)
    lengths[:2] = (5, 0)
    lead = () if layers is None else (layers,)
    arrays = [rng.standard_normal((*lead, k, dim)).astype(np.float32) for k in lengths]
    texts = [f"sentence {i % (n // 2 + 1)}" for i in range(n)]  # repeats: the last line wins
    return arrays, texts


def index_of(texts: list[str], start: int = 0) -> dict[str, str]:
    index = {}
    for i, text in enumerate(texts):
        index[text] = str(start + i)
    return index


def write(path, arrays, texts, layout="allennlp", output_dtype="float32", writes=3) -> dict:
    """Write with EmbeddingWriter in ``writes`` calls, as embed_file does from its background thread."""
    with h5py.File(path, "w") as f:
        writer = EmbeddingWriter(f, layout=layout, output_dtype=output_dtype, attrs=ATTRS)
        for piece in np.array_split(np.arange(len(arrays)), writes):
            writer.write([arrays[i] for i in piece])
        return writer.finish(texts)


def assert_reads(path, arrays, texts, dtype="float32"):
    """open_embeddings(path) gives every array cast to dtype, exactly, and the sentence index."""
    with open_embeddings(path) as emb:
        assert len(emb) == len(arrays)
        for got, want in zip(emb, arrays):
            assert got.dtype == np.dtype(dtype) and got.shape == want.shape
            np.testing.assert_array_equal(got, want.astype(dtype))
        np.testing.assert_array_equal(emb[-1], arrays[-1].astype(dtype))
        assert emb.sentence_to_index == index_of(texts)
        assert list(emb.index_items()) == list(index_of(texts).items())  # the map's order too


@pytest.mark.parametrize("layout", ["allennlp", "packed"])
@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
@pytest.mark.parametrize("layers", [3, None])
def test_round_trip(tmp_path, layout, output_dtype, layers):
    arrays, texts = make_sentences(40, layers)
    path = tmp_path / "out.hdf5"
    counts = write(path, arrays, texts, layout, output_dtype)
    assert counts == {"sentences": 40, "tokens": sum(a.shape[-2] for a in arrays)}
    assert_reads(path, arrays, texts, output_dtype)
    with open_embeddings(path) as emb:
        assert emb.layout == layout
        assert emb.attrs == {**ATTRS, "format": "elmo_jax.embeddings", "format_version": 2, "layout": layout,
                             "output_dtype": output_dtype, "n_sentences": 40, "n_tokens": counts["tokens"]}
        assert emb[1].shape[-2] == 0  # an empty line
        assert [a.shape for a in emb[3:7]] == [a.shape for a in arrays[3:7]]
        with pytest.raises(IndexError, match="sentence 40 is out of range for 40"):
            emb[40]
        with pytest.raises(IndexError):
            emb[-41]
        if layout == "packed":  # every line's text
            assert list(emb.texts()) == texts and emb.text(5) == texts[5] and emb.text(-1) == texts[-1]
        else:
            with pytest.raises(EmbeddingsFileError, match="holds no text a line"):
                emb.text(0)
    with h5py.File(path) as f:
        if layout == "allennlp":  # AllenNLP's elmo layout: dataset per line and the JSON index
            raw = f["sentence_to_index"]
            assert raw.shape == (1,) and h5py.check_string_dtype(raw.dtype) is not None
            assert json.loads(raw[0]) == index_of(texts)
            assert sorted(f.keys(), key=lambda k: (len(k), k)) == [*map(str, range(40)), "sentence_to_index"]
            np.testing.assert_array_equal(f["7"][()], arrays[7].astype(output_dtype))
        else:
            offsets = f["offsets"][()]
            assert offsets.dtype == np.int64 and offsets[0] == 0
            np.testing.assert_array_equal(np.diff(offsets), [a.shape[-2] for a in arrays])
            rows = f["embeddings"][offsets[7] : offsets[8]]
            np.testing.assert_array_equal(np.moveaxis(rows, 0, -2), arrays[7].astype(output_dtype))
            assert sorted(f.keys()) == ["embeddings", "offsets", "text_offsets", "texts"]
            at = f["text_offsets"][()]
            assert at.dtype == np.int64 and f["texts"].dtype == np.uint8
            assert [f["texts"][a:b].tobytes().decode() for a, b in zip(at[:-1], at[1:])] == texts


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
@pytest.mark.parametrize("layers", [3, None])
def test_allennlp_raw_writes_match_hdf5s_own(tmp_path, monkeypatch, output_dtype, layers):
    """The POSIX driver's datasets written by os.pwritev into space HDF5 allocated (in runs of at most 2 buffers
    here, the sentences out of order, some empty, blocked or not) read exactly as HDF5's own writes (the core
    driver, written to disk when closed); the sentence index too."""
    monkeypatch.setattr(embed_output, "MAX_BUFFERS", 2)
    arrays, texts = make_sentences(30, layers, seed=3)
    order = np.random.default_rng(4).permutation(len(arrays))
    files = {}
    for name, kwargs, blocked in (("hdf5", {"driver": "core", "backing_store": True}, False),
                                  ("raw", {"meta_block_size": 1 << 16}, False),
                                  ("raw_blocked", {}, True)):
        files[name] = tmp_path / f"{name}.hdf5"
        with h5py.File(files[name], "w", **kwargs) as f:
            writer = EmbeddingWriter(f, output_dtype=output_dtype, attrs=ATTRS)
            assert (writer._fd is None) == (name == "hdf5")
            for piece in np.array_split(order, 4):
                rows = [np.moveaxis(arrays[i], -2, 0) for i in piece]  # (n, [layers,] dim)
                if blocked and layers:  # each sentence's (layers, n, dim) values in its rows
                    rows = [arrays[i].reshape(r.shape) for i, r in zip(piece, rows)]
                writer.write_rows(np.concatenate(rows), [len(r) for r in rows], piece, blocked=blocked)
            writer.finish(texts)
    for name in files:
        assert_reads(files[name], arrays, texts, output_dtype)
    with h5py.File(files["raw"]) as f:
        assert f["0"].id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY


def test_raw_run_continues_short_writes(tmp_path, monkeypatch):
    """A write that takes part of a run (os.pwritev may) is continued from where it stopped."""
    pwritev = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: pwritev(fd, [buffers[0][:3]], offset))
    with open(tmp_path / "raw", "wb") as handle:
        run = embed_output._Run(handle.fileno())
        for k, offset in enumerate((4, 12, 20, 40)):
            run.add(offset, np.full(2, k, np.float32))
        run.write()
    data = np.fromfile(tmp_path / "raw", np.uint8)
    want = np.zeros(48, np.uint8)
    for k, offset in enumerate((4, 12, 20, 40)):
        want[offset : offset + 8] = np.full(2, k, np.float32).view(np.uint8)
    np.testing.assert_array_equal(data, want)


def test_packed_buffering_across_many_flushes(tmp_path, monkeypatch):
    """Tiny chunks: sentences straddle buffer flushes and one sentence spans several buffers."""
    monkeypatch.setattr(embed_output, "CHUNK_BYTES", 3 * 8 * 4 * 5)  # 5 rows of (3, 8) float32
    monkeypatch.setattr(embed_output, "BUFFER_CHUNKS", 2)
    arrays, texts = make_sentences(30, max_tokens=25)
    write(tmp_path / "p.hdf5", arrays, texts, "packed", writes=7)
    assert_reads(tmp_path / "p.hdf5", arrays, texts)
    with h5py.File(tmp_path / "p.hdf5") as f:
        assert f["embeddings"].chunks == (5, 3, 8)


def test_packed_writes_big_slabs(tmp_path, monkeypatch):
    """2,000 sentences become a few ~16 MiB writes in ~1 MiB chunks, not one h5py call per sentence."""
    flushes = []
    flush = EmbeddingWriter._flush
    monkeypatch.setattr(EmbeddingWriter, "_flush", lambda self: (flushes.append(self._filled), flush(self)))
    arrays, texts = make_sentences(2000, dim=64, max_tokens=60)
    write(tmp_path / "p.hdf5", arrays, texts, "packed", writes=20)
    with h5py.File(tmp_path / "p.hdf5") as f:
        chunk_rows = f["embeddings"].chunks[0]
        assert 0.5 * 2**20 < chunk_rows * 3 * 64 * 4 <= 2**20
    assert len(flushes) <= 4  # ~46 MB in 16 MiB slabs


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
def test_packed_size_is_the_payload(tmp_path, output_dtype):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, k, 64)).astype(np.float32) for k in rng.integers(1, 61, 2000)]
    texts = [f"s{i}" for i in range(2000)]
    write(tmp_path / "p.hdf5", arrays, texts, "packed", output_dtype)
    payload = sum(a.size for a in arrays) * np.dtype(output_dtype).itemsize
    assert os.path.getsize(tmp_path / "p.hdf5") / payload < 1.05


def test_reads_allennlp_file_without_attrs(tmp_path):
    """A file as AllenNLP's elmo command writes it: datasets per line and sentence_to_index, no attributes."""
    arrays, texts = make_sentences(12)
    path = tmp_path / "allennlp.hdf5"
    with h5py.File(path, "w") as f:
        for i, a in enumerate(arrays):
            f.create_dataset(str(i), a.shape, dtype="float32", data=a)
        index = f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))
        index[0] = json.dumps(index_of(texts))
    assert_reads(path, arrays, texts)
    with open_embeddings(path) as emb:
        assert emb.layout == "allennlp" and emb.attrs == {}


def test_empty_output(tmp_path):
    for layout in ("allennlp", "packed"):
        path = tmp_path / f"{layout}.hdf5"
        assert write(path, [], [], layout, writes=1) == {"sentences": 0, "tokens": 0}
        with open_embeddings(path) as emb:
            assert len(emb) == 0 and list(emb) == [] and emb.sentence_to_index == {}


TRICKY_TEXTS = ["a", "b c", "\u00e9", "x\ny", 'q"uote', "\\n", "\ud800", "tab\t", "", "\u65e5\u672c", "\x00"]


@pytest.mark.parametrize("collide", [False, True])
def test_sentence_index_is_json_dumps_of_the_dict(tmp_path, monkeypatch, collide):
    """SentenceIndex.to_json() is json.dumps(d), byte for byte, for d[text] = str(i) in turn: a repeated text keeps
    its first place and its last index. With every text's hash in one of 3 buckets, texts are still told apart;
    the texts spill from memory to a file in the folder given."""
    monkeypatch.setattr(SentenceIndex, "SPOOL_BYTES", 64)
    if collide:
        monkeypatch.setattr(SentenceIndex, "_hash", staticmethod(lambda text: len(text) % 3))
    rng = np.random.default_rng(1)
    for _ in range(60):
        items = [(" ".join(str(w) for w in rng.choice(TRICKY_TEXTS, rng.integers(0, 4))), int(rng.integers(0, 99)))
                 for _ in range(rng.integers(0, 60))]
        expected = {}
        with SentenceIndex(tmp_path) as index:
            for text, i in items:
                index.add(text, i)
                expected[text] = str(i)
            assert len(index) == len(items)
            assert index.to_json() == json.dumps(expected).encode()
    assert os.listdir(tmp_path) == []  # the spilled file is unnamed and gone


def test_sentence_index_items_and_texts(tmp_path, monkeypatch):
    """items() gives the dict's (text, index) in its order, each text as json.dumps writes it; texts() every text
    added, in turn; in_line_order() whether the adds were lines 0, 1, 2, ..."""
    monkeypatch.setattr(SentenceIndex, "SPOOL_BYTES", 64)
    rng = np.random.default_rng(2)
    for _ in range(20):
        texts = [str(rng.choice(TRICKY_TEXTS)) for _ in range(rng.integers(0, 30))]
        with SentenceIndex(tmp_path) as index:
            index.update((text, i) for i, text in enumerate(texts))
            expected = {}
            for i, text in enumerate(texts):
                expected[text] = i
            assert [(json.loads(text), i) for text, i in index.items()] == list(expected.items())
            assert list(index.texts()) == texts and index.in_line_order()
            index.add("late", 0)
            assert not index.in_line_order()


def test_packed_texts_any_text_and_errors(tmp_path):
    """Packed texts are any text (newlines, NUL, quotes, empty), written and read in pieces; a text that is not
    valid Unicode, texts that are not one a line, bytes that are not UTF-8 and offsets out of order are one-line
    errors."""
    texts = [t for t in TRICKY_TEXTS if t != "\ud800"] * 7
    arrays = [np.full((2, 3), i, np.float32) for i in range(len(texts))]
    path = tmp_path / "p.hdf5"
    with h5py.File(path, "w") as f:
        writer = EmbeddingWriter(f, layout="packed")
        writer.write(arrays)
        old = embed_output.TEXTS_CHUNK
        embed_output.TEXTS_CHUNK = 8  # written and read in several chunks
        try:
            writer.finish(texts)
        finally:
            embed_output.TEXTS_CHUNK = old
    with open_embeddings(path) as emb:
        assert list(emb.texts()) == texts and emb.text(3) == texts[3]
        assert emb.sentence_to_index == index_of(texts)
        with pytest.raises(IndexError, match=f"sentence {len(texts)} is out of range"):
            emb.text(len(texts))
    with h5py.File(path, "a") as f:
        f["texts"][f["text_offsets"][3]] = 0xFF  # sentence 3's first byte
    with open_embeddings(path) as emb:
        with pytest.raises(EmbeddingsFileError, match=r"p.hdf5: the text of sentence 3 is not UTF-8$"):
            list(emb.texts())
    with h5py.File(path, "a") as f:
        f["text_offsets"][5] = 0
    with open_embeddings(path) as emb:
        with pytest.raises(EmbeddingsFileError, match=r"p.hdf5: 'text_offsets' decrease after sentence 0$"):
            list(emb.texts())
    with h5py.File(tmp_path / "q.hdf5", "w") as f:
        writer = EmbeddingWriter(f, layout="packed")
        writer.write(arrays[:3])
        with pytest.raises(ValueError, match="sentence 1's text is not valid Unicode"):
            writer.finish(["a", "\ud800", "b"])
    with h5py.File(tmp_path / "q.hdf5", "w") as f:
        writer = EmbeddingWriter(f, layout="packed")
        writer.write(arrays[:3])
        with pytest.raises(ValueError, match="the packed layout needs one text a sentence in line order: 3 sentences, "
                                             "2 texts$"):
            writer.finish(["a", "b"])
        with pytest.raises(TypeError, match="not a {text: index} map"):
            writer.finish({"a": "0", "b": "1", "c": "2"})


def test_reads_packed_files_of_format_version_1(tmp_path):
    """A packed file written before "sentences" (format_version 1: AllenNLP's JSON "sentence_to_index") reads as
    before; it holds no text a line."""
    arrays, texts = make_sentences(12)
    path = tmp_path / "v1.hdf5"
    write(path, arrays, texts, "packed")
    with h5py.File(path, "a") as f:
        del f["texts"], f["text_offsets"]
        f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))[0] = json.dumps(index_of(texts))
        f.attrs["format_version"] = 1
    assert_reads(path, arrays, texts)
    with open_embeddings(path) as emb:
        assert emb.layout == "packed"
        with pytest.raises(EmbeddingsFileError, match=r"v1.hdf5: holds no text a line \(the packed layout of "
                                                      r"format_version 1\), only 'sentence_to_index'$"):
            list(emb.texts())


def write_raw_index(path, raw: str) -> None:
    """A file of no sentence whose "sentence_to_index" holds ``raw``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))[0] = raw


def test_index_items_decode_one_at_a_time(tmp_path):
    """Embeddings.index_items() gives json.loads' items of any JSON object of strings; anything else is a one-line
    error naming the file."""
    index = {text: str(i) for i, text in enumerate(TRICKY_TEXTS)}
    readable = {text: i for text, i in index.items() if text != "\ud800"}  # HDF5 takes UTF-8 text only
    for raw in (json.dumps(index), json.dumps(readable, indent=2, ensure_ascii=False), "{}", " { } ",
                '{"a":"1","a" : "2"}'):
        write_raw_index(tmp_path / "a.hdf5", raw)
        with open_embeddings(tmp_path / "a.hdf5") as emb:
            assert list(emb.index_items()) == list(json.loads(raw, object_pairs_hook=list))
    for raw in ('["a"]', '{"a": 1}', '{"a" "1"}', '{"a": "1",}', '{"a": "1"', '{"a": "1"} x', ""):
        write_raw_index(tmp_path / "a.hdf5", raw)
        with open_embeddings(tmp_path / "a.hdf5") as emb:
            with pytest.raises(EmbeddingsFileError, match=r"a\.hdf5: 'sentence_to_index' is not a JSON object of "
                                                          r"strings \(.+\)$"):
                list(emb.index_items())


def write_parts(folder, arrays, texts, layout, bounds=(0, 9, 9, 20, 33)) -> list[str]:
    """Part files of consecutive lines as ``embed --distributed`` writes them (one part has no line)."""
    os.makedirs(folder, exist_ok=True)
    parts = []
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = os.path.join(folder, f"part-{k}.hdf5")
        with h5py.File(part, "w") as f:
            writer = EmbeddingWriter(f, layout=layout, output_dtype="float16", attrs=ATTRS)
            writer.write(arrays[start:end])
            writer.finish(texts[start:end])
        parts.append(part)
    return parts


def assert_same_file(merged, single, layout):
    """Through h5py, the merged file holds the numbers, index and counts of the one-process file."""
    with h5py.File(merged) as m, h5py.File(single) as s:
        for key in ("sentence_to_index",) if layout == "allennlp" else ("texts", "text_offsets"):
            assert m[key][()].tolist() == s[key][()].tolist()
        for key in ("n_sentences", "n_tokens", "layout", "output_dtype", "mode", "format"):
            assert m.attrs[key] == s.attrs[key]
        if layout == "allennlp":
            for i in range(s.attrs["n_sentences"]):
                assert m[str(i)].dtype == s[str(i)].dtype
                np.testing.assert_array_equal(m[str(i)][()], s[str(i)][()])
        else:
            assert m["embeddings"].dtype == s["embeddings"].dtype
            np.testing.assert_array_equal(m["embeddings"][...], s["embeddings"][...])
            np.testing.assert_array_equal(m["offsets"][()], s["offsets"][()])


@pytest.mark.parametrize("layout", ["allennlp", "packed"])
def test_merged_parts_read_like_one_process(tmp_path, monkeypatch, layout):
    arrays, texts = make_sentences(33)
    write(tmp_path / "single.hdf5", arrays, texts, layout, "float16")
    out = tmp_path / "run"
    parts = write_parts(out / "parts", arrays, texts, layout)
    merge_parts(out / "merged.hdf5", parts, layout=layout)
    assert_same_file(out / "merged.hdf5", tmp_path / "single.hdf5", layout)
    assert_reads(out / "merged.hdf5", arrays, texts, "float16")
    with open_embeddings(out / "merged.hdf5") as emb:
        assert emb.attrs["parts"] == [f"parts/part-{k}.hdf5" for k in range(4)]
    with h5py.File(out / "merged.hdf5") as f:  # links and virtual sources hold relative paths
        if layout == "allennlp":
            assert f.get("9", getlink=True).path == "0" and f.get("9", getlink=True).filename == "parts/part-2.hdf5"
        else:
            sources = [source.file_name for source in f["embeddings"].virtual_sources()]
            assert sources == ["parts/part-0.hdf5", "parts/part-2.hdf5", "parts/part-3.hdf5"]  # part 1 is empty

    # HDF5 looks up relative link and VDS paths from the merged file's folder, not the working directory:
    # from elsewhere, with a decoy part of other numbers at the same relative path from there.
    elsewhere = tmp_path / "elsewhere"
    write_parts(elsewhere / "parts", [a + 1 for a in arrays], texts, layout)
    monkeypatch.chdir(elsewhere)
    assert_same_file("../run/merged.hdf5", "../single.hdf5", layout)
    assert_reads("../run/merged.hdf5", arrays, texts, "float16")

    # The output folder moves as a whole.
    shutil.move(out, tmp_path / "moved")
    assert_same_file("../moved/merged.hdf5", "../single.hdf5", layout)
    assert_reads(tmp_path / "moved" / "merged.hdf5", arrays, texts, "float16")


@pytest.mark.parametrize("layout", ["allennlp", "packed"])
def test_merged_file_with_missing_part(tmp_path, layout):
    arrays, texts = make_sentences(33)
    parts = write_parts(tmp_path / "parts", arrays, texts, layout)
    merge_parts(tmp_path / "merged.hdf5", parts, layout=layout)
    os.remove(parts[1])  # a part with no line: only the "parts" attribute names it
    with pytest.raises(EmbeddingsFileError, match=r"merged.hdf5: part file parts/part-1.hdf5 is missing"):
        open_embeddings(tmp_path / "merged.hdf5")
    write_parts(tmp_path / "parts", arrays, texts, layout)
    os.remove(parts[3])
    with pytest.raises(EmbeddingsFileError, match=r"merged.hdf5: part file parts/part-3.hdf5 is missing"):
        open_embeddings(tmp_path / "merged.hdf5")


def test_merge_checks_parts(tmp_path):
    arrays, texts = make_sentences(33)
    parts = write_parts(tmp_path / "parts", arrays, texts, "packed")
    mixed = write_parts(tmp_path / "mixed", arrays, texts, "allennlp")
    mixed[2] = parts[2]
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: .*parts/part-2.hdf5: expected a part "
                                                  r"file written by EmbeddingWriter in the allennlp layout, found the "
                                                  r"packed layout$"):
        merge_parts(tmp_path / "m.hdf5", mixed, layout="allennlp")
    mixed[2] = tmp_path / "allennlp.hdf5"
    with h5py.File(mixed[2], "w") as f:  # as AllenNLP writes it: no attributes
        f["0"] = np.zeros((3, 2, 8), np.float16)
        f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))[0] = "{}"
    with pytest.raises(EmbeddingsFileError, match=r"allennlp.hdf5: expected a part file written by EmbeddingWriter "
                                                  r"in the allennlp layout, found the allennlp layout without the "
                                                  r"format attribute$"):
        merge_parts(tmp_path / "m.hdf5", mixed, layout="allennlp")
    with h5py.File(parts[3], "w") as f:
        writer = EmbeddingWriter(f, layout="packed", output_dtype="float16")
        writer.write([np.zeros((2, 2, 8), np.float32)])
        writer.finish(["x"])
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: part parts/part-3.hdf5 has embeddings "
                                                  r"\(2, 2, 8\), expected \(tokens, 3, 8\) as the first part"):
        merge_parts(tmp_path / "m.hdf5", parts, layout="packed")
    with h5py.File(parts[3], "w") as f:
        EmbeddingWriter(f, layout="packed").finish([])
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: part parts/part-3.hdf5 is float32, "
                                                  r"expected float16 as the first part"):
        merge_parts(tmp_path / "m.hdf5", parts, layout="packed")
    (tmp_path / "m.hdf5").unlink(missing_ok=True)  # left by the checks made once it is open (embed wraps them)
    good = write_parts(tmp_path / "good", arrays, texts, "allennlp")
    with h5py.File(good[1], "a") as f:
        f["sentence_to_index"][0] = '{"a": "0", "b"}'
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: .*good/part-1.hdf5: "
                                                  r"'sentence_to_index' is not a JSON object of strings \(.+\)$"):
        merge_parts(tmp_path / "m.hdf5", good, layout="allennlp")
    assert not os.path.exists(tmp_path / "m.hdf5")  # read before the merged file is made
    good = write_parts(tmp_path / "good", arrays, texts, "packed")
    with h5py.File(good[2], "a") as f:
        del f["text_offsets"]
        f["text_offsets"] = np.array([0, 3])
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: .*good/part-2.hdf5: expected 'texts' "
                                                  r"uint8 and 'text_offsets' int \(12,\) from 0 to the \d+ bytes of "
                                                  r"'texts', found 'text_offsets' int64, \(2,\)$"):
        merge_parts(tmp_path / "m.hdf5", good, layout="packed")
    assert not os.path.exists(tmp_path / "m.hdf5")
    os.remove(parts[2])
    with pytest.raises(EmbeddingsFileError, match=r"cannot merge into .*m.hdf5: .*part-2.hdf5: no such file"):
        merge_parts(tmp_path / "m.hdf5", parts, layout="packed")
    with pytest.raises(ValueError, match="layout must be one of 'allennlp', 'packed', found 'flat'"):
        merge_parts(tmp_path / "m.hdf5", parts, layout="flat")


def test_allennlp_file_with_a_gap(tmp_path):
    with h5py.File(tmp_path / "gap.hdf5", "w") as f:
        for i in (0, 1, 3):
            f[str(i)] = np.zeros((2, 4), np.float32)
        f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))[0] = "{}"
    with pytest.raises(EmbeddingsFileError, match=r"gap.hdf5: expected datasets '0' ... '2' \(3 sentences\), found "
                                                  r"others"):
        open_embeddings(tmp_path / "gap.hdf5")
    with h5py.File(tmp_path / "gap.hdf5", "a") as f:
        f.attrs["n_sentences"] = 1  # the attribute is checked against the names around it
    with pytest.raises(EmbeddingsFileError, match=r"gap.hdf5: expected datasets '0' ... '0' \(1 sentences\)"):
        open_embeddings(tmp_path / "gap.hdf5")


def test_file_errors(tmp_path):
    expected = "expected an HDF5 embeddings file"
    with pytest.raises(EmbeddingsFileError, match=f"absent.hdf5: no such file; {expected}"):
        open_embeddings(tmp_path / "absent.hdf5")
    (tmp_path / "folder").mkdir()
    with pytest.raises(EmbeddingsFileError, match=f"folder: is a directory; {expected}"):
        open_embeddings(tmp_path / "folder")
    (tmp_path / "text.hdf5").write_text("not HDF5\n")
    with pytest.raises(EmbeddingsFileError, match=f"text.hdf5: not an HDF5 file; {expected}"):
        open_embeddings(tmp_path / "text.hdf5")
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f["weights"] = np.zeros(3)
    with pytest.raises(EmbeddingsFileError, match=r"other.hdf5: expected datasets '0', '1', ... and "
                                                  r"'sentence_to_index' \(AllenNLP layout\) or 'embeddings', "
                                                  r"'offsets', 'texts' and 'text_offsets' \(packed\); found "
                                                  r"\['weights'\]"):
        open_embeddings(tmp_path / "other.hdf5")


@pytest.mark.parametrize("offsets, found", [([0, 5, 9], "found 0 ... 9"), ([1, 5, 10], "found 1 ... 10"),
                                            ([0, 6, 5, 10], "found decreasing offsets"),
                                            ([[0, 10]], r"found dtype int64, shape \(1, 2\)")])
def test_inconsistent_offsets(tmp_path, offsets, found):
    path = tmp_path / "packed.hdf5"
    write(path, [np.ones((3, 5, 4), np.float32), np.ones((3, 5, 4), np.float32)], ["a", "b"], "packed")
    with h5py.File(path, "a") as f:
        del f["offsets"]
        f["offsets"] = np.array(offsets, np.int64)
    with pytest.raises(EmbeddingsFileError, match=rf"packed.hdf5: expected 'offsets' int \(n_sentences \+ 1,\) "
                                                  rf"non-decreasing from 0 to the 10 rows of 'embeddings', {found}"):
        open_embeddings(path)


def test_bad_options_and_arrays(tmp_path):
    check_output_options("packed", "float16")
    with pytest.raises(ValueError, match="layout must be one of 'allennlp', 'packed', found 'foo'"):
        check_output_options("foo", "float32")
    with pytest.raises(ValueError, match="output_dtype must be one of 'float32', 'float16', found 'bfloat16'"):
        check_output_options("packed", "bfloat16")
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        with pytest.raises(ValueError, match="output_dtype must be one of"):
            EmbeddingWriter(f, output_dtype="float64")
        with pytest.raises(ValueError, match=r"attrs must not set \['n_tokens'\]"):
            EmbeddingWriter(f, attrs={"n_tokens": 3})
        writer = EmbeddingWriter(f, layout="packed")
        with pytest.raises(ValueError, match=r"sentence 0: expected an array \(layers, n, dim\) or \(n, dim\), "
                                             r"found shape \(4,\)"):
            writer.write([np.zeros(4, np.float32)])
        writer.write([np.zeros((3, 2, 4), np.float32)])
        with pytest.raises(ValueError, match=r"sentence 1: packed layout needs the \(layers, dim\) of sentence 0, "
                                             r"\(3, 4\), found \(2, 4\)"):
            writer.write([np.zeros((2, 2, 4), np.float32)])
