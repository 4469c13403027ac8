import json

import h5py
import jax
import numpy as np
import pytest

from elmo_jax.characters import BOS_TOKEN, EOS_TOKEN, TokenError
from elmo_jax.cli import main
from elmo_jax import embed, open_embeddings
from elmo_jax.embed import Embedder
from elmo_jax.lanes import (GatherPlan, Slots, Timeline, TokenTable, assign_lanes, choose_lanes, drain_lanes,
                            lane_subsets, slot_rows, slot_steps, widen)
from tests import reference

WORDS = "the bank raised its interest rates . I went to river and deposited money in a very long sentence".split()


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]


def _three_letter_sentences(n, letters, max_tokens, seed):
    """n sentences of 1 to max_tokens - 1 tokens, each 3 random ``letters``: many distinct tokens, often repeated."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(letters))
    return [["".join(rng.choice(letters, size=3)) for _ in range(rng.integers(1, max_tokens))] for _ in range(n)]


@pytest.fixture(scope="module")
def expected(tiny_model):
    sentences = _sentences(24)
    return sentences, [reference.bilm_sentence(tiny_model.params, tiny_model.options, s)[:, 1:-1] for s in sentences]


@pytest.mark.parametrize("lanes, block_steps", [(1, 1), (3, 5), (16, 64), (None, None)])
def test_lanes_and_blocks_never_change_the_numbers(tiny_model, expected, lanes, block_steps):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=lanes, block_steps=block_steps)
    got = list(embedder.embed_sentences(sentences))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_insert_chunks_pad_less_than_the_smallest_size():
    """New tokens go to the char CNN in calls of fixed sizes, padded in all by less than the smallest."""
    for n in range(0, 3000, 7):
        chunks = embed.insert_chunks(n, (256, 1024))
        assert [c[0] for c in chunks] == [sum(c[2] for c in chunks[:k]) for k in range(len(chunks))]
        assert sum(c[1] for c in chunks) == n and all(0 < c[1] <= c[2] for c in chunks)
        assert sum(c[2] for c in chunks) - n < 256
    assert [c[2] for c in embed.insert_chunks(2 * 1024 + 700, (256, 1024))] == [1024, 1024, 256, 256, 256]
    assert [c[2] for c in embed.insert_chunks(800, (256, 1024))] == [1024]


def test_compilations_do_not_grow_with_the_corpus(tiny_model):
    small, large = Embedder(model=tiny_model, batch_size=8), Embedder(model=tiny_model, batch_size=8)
    list(small.embed_sentences(_sentences(100, seed=1)))
    list(large.embed_sentences(_sentences(1000, seed=1) + [["w" * 30, "x" * 20]]))  # long tokens too
    # a block program per lane subset, token-table inserts in a few fixed sizes (short and long tokens)
    assert small.compilations <= large.compilations <= len(lane_subsets(8)) + len(
        embed.INSERT_SIZES["short"]) + len(embed.INSERT_SIZES["long"])
    before = large.compilations
    list(large.embed_sentences(_sentences(300, seed=2)))
    assert large.compilations == before


def test_token_table_frees_the_least_used_rows_in_place():
    """A full table frees the rows of the tokens read in the fewest windows, never a pinned row, a live row or a
    token of the window, and new tokens take the freed rows: no row of a kept token moves."""
    table = TokenTable(16, pinned=["the"])  # rows 0, 1: <S>, </S>; 2: the
    rows, new, new_rows = table.lookup(["a", "b", "c", "d"])
    assert new == ["a", "b", "c", "d"] and new_rows.tolist() == rows.tolist() == [3, 4, 5, 6]
    for _ in range(3):
        table.lookup(["a", "b"])  # a and b now read in 4 windows, c and d in 1
    table.lookup([f"x{k}" for k in range(9)])  # rows 7..15: full
    assert table.free() == 0 and table.make_room(["a", "y"], live_rows=np.array([5])) == 0  # c (row 5) is live
    assert table.free() >= 1 and "d" not in table.rows and {"a", "b", "c", "the"} <= set(table.rows)
    rows, new, new_rows = table.lookup(["a", "y"])
    assert new == ["y"] and rows[0] == 3 and new_rows[0] in range(6, 16)  # a kept its row; y took a freed one
    assert table.tokens[new_rows[0]] == "y" and table.rows["c"] == 5
    assert table.make_room([f"z{k}" for k in range(40)], live_rows=np.arange(16)) == 40 - table.free()
    table.resize(64)
    assert table.free() >= 40
    table.clear()
    assert table.tokens == [BOS_TOKEN, EOS_TOKEN, "the"] and table.free() == 61


def test_token_table_compaction_and_growth_keep_the_numbers(tiny_model, monkeypatch):
    monkeypatch.setattr(embed, "TABLE_BYTES", 0)
    monkeypatch.setattr(embed, "TABLE_MIN_ROWS", 40)
    sentences = _three_letter_sentences(60, "abcdefghij", 12, seed=3)
    embedder = Embedder(model=tiny_model, batch_size=2, block_steps=4)
    assert embedder._tokens.capacity == 40
    got = list(embedder.embed_sentences(sentences))  # windows of 16 sentences: ~100 distinct tokens each
    assert embedder._tokens.capacity > 40  # grew once a window's tokens did not fit
    got += list(embedder.embed_sentences(sentences[:5]))  # rows freed between windows, cache reused across calls
    for a, s in zip(got, sentences + sentences[:5]):
        np.testing.assert_allclose(a, reference.bilm_sentence(tiny_model.params, tiny_model.options, s)[:, 1:-1],
                                   atol=1e-5)


def test_token_gates_on_a_cpu_keep_the_numbers(tiny_model, expected, monkeypatch):
    """On a CPU the token table keeps the first layer's input gates of each token (the blocks look them up); without
    them (a model whose gates outgrow GATE_TABLE_BYTES) the blocks multiply the token vectors: the same numbers."""
    sentences, want = expected
    with_gates = Embedder(model=tiny_model, batch_size=4, block_steps=6)
    assert with_gates._token_gates and with_gates._capacity == embed.GATE_TABLE_ROWS
    monkeypatch.setattr(embed, "GATE_TABLE_BYTES", 0)
    without = Embedder(model=tiny_model, batch_size=4, block_steps=6)
    assert not without._token_gates
    for a, b, w in zip(with_gates.embed_sentences(sentences), without.embed_sentences(sentences), want):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(a, w, atol=1e-5)
    assert set(with_gates._table) == {"vectors", "forward_gates", "backward_gates"} and set(without._table) == {
        "vectors"}


def test_token_table_sized_to_a_known_input_grows_for_a_longer_one(tiny_model, monkeypatch):
    """The device table is made by the first stream: for an input the host has read whole (a short one), with the
    fewest power-of-two rows, at least TABLE_MIN_ROWS, that hold its tokens; a later input of unknown length grows it
    to the largest at once. The numbers are the loop reference's throughout."""
    monkeypatch.setattr(embed, "TABLE_MIN_ROWS", 16)
    monkeypatch.setattr(embed, "LOOK_AHEAD_PER_LANE", 2)
    sentences = _three_letter_sentences(40, "abcdefghijkl", 9, seed=5)
    embedder = Embedder(model=tiny_model, batch_size=4, block_steps=4)
    assert embedder._table is None and embedder._capacity == embed.GATE_TABLE_ROWS
    short = sentences[:3]  # read whole at once (fewer than LOOK_AHEAD_PER_LANE a lane)
    got = list(embedder.embed_sentences(short))
    needed = len({"<S>", "</S>"} | {t for s in short for t in s})
    assert 16 <= len(embedder._table["vectors"]) == embedder._tokens.capacity == max(
        16, 1 << (needed - 1).bit_length()) < embed.GATE_TABLE_ROWS
    small = embedder._tokens.capacity
    got += list(embedder.embed_sentences(short[::-1]))  # its tokens are all in the table: it stays as it is
    assert len(embedder._table["vectors"]) == embedder._tokens.capacity == small
    got += list(embedder.embed_sentences(iter(sentences)))  # read a window at a time: grows the table
    assert len(embedder._table["forward_gates"]) == embedder._tokens.capacity == embed.GATE_TABLE_ROWS
    for a, s in zip(got, short + short[::-1] + sentences):
        np.testing.assert_allclose(a, reference.bilm_sentence(tiny_model.params, tiny_model.options, s)[:, 1:-1],
                                   atol=1e-5)


def test_interleaved_and_abandoned_streams(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=4, vocab=WORDS[:5])
    abandoned = embedder.embed_sentences(sentences)
    next(abandoned)
    abandoned.close()  # the shared token table is left consistent
    for a, b, w in zip(embedder.embed_sentences(sentences), embedder.embed_sentences(sentences[::-1]), want):
        np.testing.assert_allclose(a, w, atol=1e-5)
    for b, w in zip(embedder.embed_sentences(sentences[::-1]), want[::-1]):
        np.testing.assert_allclose(b, w, atol=1e-5)


def test_long_sentence_is_embedded(tiny_model):
    long = (WORDS * 20)[:300]
    got = Embedder(model=tiny_model).embed_sentence(long)
    np.testing.assert_allclose(got, reference.bilm_sentence(tiny_model.params, tiny_model.options, long)[:, 1:-1],
                               atol=1e-5)


def test_output_modes_and_sentence_vectors(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8)
    for mode, reduce in [("top", lambda a: a[-1]), ("average", lambda a: a.mean(0)), ("token", lambda a: a[0]),
                         ([0.2, 0.3, 0.5], lambda a: np.einsum("l,ltd->td", [0.2, 0.3, 0.5], a))]:
        for got, full in zip(embedder.embed_sentences(sentences, mode=mode), want):
            np.testing.assert_allclose(got, reduce(full), atol=1e-5)
    vectors = list(embedder.embed_sentences(sentences, mode="all", sentence_vectors=True))
    np.testing.assert_allclose(vectors[3], want[3].mean(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="one value per layer"):
        list(embedder.embed_sentences(sentences, mode=[1.0, 0.0]))
    with pytest.raises(ValueError, match="mode must be"):
        list(embedder.embed_sentences(sentences, mode="middle"))


@pytest.mark.parametrize("vocab", [WORDS[:10], WORDS])
def test_vocabulary_cache_gives_the_same_numbers(tiny_model, expected, vocab):
    """The pinned rows reach the device with a stream's first new tokens, or before its first block when every
    token is pinned (the whole vocabulary: no new token at all)."""
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8, vocab=vocab)
    for _ in range(2):  # a second stream finds them there
        for got, full in zip(embedder.embed_sentences(sentences), want, strict=True):
            np.testing.assert_allclose(got, full, atol=1e-5)


def test_multi_device_equals_single_device(tiny_model, expected):
    assert jax.device_count() >= 4, "tests/conftest.py asks for 4 CPU devices"
    sentences, _ = expected
    one = Embedder(model=tiny_model, batch_size=6, devices=jax.devices()[:1])
    four = Embedder(model=tiny_model, batch_size=6, devices=jax.devices()[:4])
    assert four.n_devices == 4
    for a, b in zip(one.embed_sentences(sentences), four.embed_sentences(sentences)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_sentences(tiny_model):
    embedder = Embedder(model=tiny_model)
    with pytest.raises(TokenError, match="sentence 1 is empty"):
        list(embedder.embed_sentences([["a"], []]))
    with pytest.raises(TokenError, match="sentence 0, token 1"):
        list(embedder.embed_sentences([["a", None]]))
    got = list(embedder.embed_sentences([["a"], []], allow_empty=True))
    assert got[1].shape == (3, 0, 32)


@pytest.fixture
def cli_args(elmo_tiny):
    return ["--options", str(elmo_tiny / "options.json"), "--weights", str(elmo_tiny / "lm_weights.hdf5"),
            "--no-progress", "--batch-size", "4"]


@pytest.mark.parametrize("flag, shape", [("--all", (3, 5, 32)), ("--top", (5, 32)), ("--average", (5, 32)),
                                         ("--token", (5, 32))])
def test_cli_writes_allennlp_layout(tmp_path, cli_args, flag, shape):
    lines = ["The bank raised rates .", "I went to the river bank .", "Hello"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), flag, *cli_args]) == 0
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert sorted(f.keys()) == ["0", "1", "2", "sentence_to_index"]
        assert f["0"].shape == shape and f["0"].dtype == np.float32
        assert f["1"].shape[-2] == 7 and f["2"].shape[-2] == 1
        assert json.loads(f["sentence_to_index"][0]) == {line: str(i) for i, line in enumerate(lines)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_the_installed_command_ends_a_finished_embed_at_once(tmp_path, cli_args):
    """The console entry (``cli.console``, run as ``python -m elmo_jax.cli``) exits without tearing the runtime
    down after an embed: its summary line is printed and its output complete; bad input still exits 2."""
    import subprocess
    import sys

    lines = ["The bank raised rates .", "Hello"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "-m", "elmo_jax.cli", "embed", str(tmp_path / "in.txt"),
                          str(tmp_path / "out.hdf5"), *cli_args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {tmp_path / 'out.hdf5'}: 2 sentences, 6 tokens in "), run.stdout
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert f["0"].shape == (3, 5, 32) and f["1"].shape == (3, 1, 32)
    run = subprocess.run([sys.executable, "-m", "elmo_jax.cli", "embed", str(tmp_path / "missing.txt"),
                          str(tmp_path / "m.hdf5"), *cli_args], capture_output=True, text=True)
    assert run.returncode == 2 and "missing.txt" in run.stderr and not (tmp_path / "m.hdf5").exists()


def test_the_installed_command_ends_on_sigterm_as_on_interrupt(tmp_path, cli_args):
    """SIGTERM (a scheduler's stop) to the installed command midway (reading stdin, its temporary file open):
    a one-line message, exit 143, and neither the temporary file nor OUT left; before, it died at once and left
    the temporary file behind."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "elmo_jax.cli", "embed", "-", str(tmp_path / "out.hdf5"),
                                *cli_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdin.write("The bank raised rates .\n" * 50)
    process.stdin.flush()  # and left open: the command waits for more lines
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tmp-*")) and time.monotonic() < deadline:
        assert process.poll() is None
        time.sleep(0.02)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == "elmo-jax embed: terminated (SIGTERM)" and "wrote" not in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["allennlp", "packed"])
def test_a_write_that_fails_for_want_of_room_is_a_one_line_error(tmp_path, cli_args, layout):
    """The output outgrows what the file system allows midway (here a file-size limit, as a full disk or a quota
    would): a one-line error naming OUT and the reason, exit 2, nothing left. Before, h5py's close of the failed
    file raised an error of its own over the first one: a traceback and exit 1; and in the packed layout HDF5,
    unable to close the file it could not extend, crashed (SIGSEGV) when its objects were freed afterwards."""
    import subprocess
    import sys

    # set in a small parent that then becomes the command (a preexec_fn would run in a fork of this threaded process)
    limited = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'elmo_jax.cli', *sys.argv[1:]])")  # EFBIG, no signal
    (tmp_path / "in.txt").write_text("The bank raised rates .\n" * 400)  # ~800 KB of vectors
    run = subprocess.run([sys.executable, "-c", limited, "embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"),
                          "--layout", layout, *cli_args], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == f"elmo-jax embed: error: {tmp_path / 'out.hdf5'}: cannot write it: File too large"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_cli_output_that_is_a_directory_is_refused(tmp_path, cli_args, capsys):
    """OUT naming a directory is a one-line error, exit 2, raised before the input is embedded (it used to fail
    only at the final rename, after all the work), and nothing is left in that directory."""
    (tmp_path / "in.txt").write_text("a b\n")
    (tmp_path / "out").mkdir()
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out"), *cli_args]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: is a directory" in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


def test_an_output_named_as_an_input_is_refused(tmp_path, cli_args, capsys, tiny_model):
    """OUT naming the input file (or the vocabulary, options or weights) is a one-line error, exit 2, before any
    work: the rename would replace the user's input with the vectors. The Python API refuses it too."""
    (tmp_path / "in.txt").write_text("a b\n")
    (tmp_path / "vocab.txt").write_text("a\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "in.txt")
    for output, extra in [("in.txt", []), ("link.txt", []), ("vocab.txt", ["--vocab", str(tmp_path / "vocab.txt")])]:
        assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / output), *cli_args, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / output}: is also the input" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "in.txt").read_text() == "a b\n" and (tmp_path / "vocab.txt").read_text() == "a\n"
    with pytest.raises(OSError, match="is also the input"):
        Embedder(model=tiny_model, batch_size=4).embed_file(str(tmp_path / "in.txt"), tmp_path / "in.txt",
                                                            progress=False)
    assert (tmp_path / "in.txt").read_text() == "a b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "link.txt", "vocab.txt"]


def test_cli_bad_input_leaves_no_output(tmp_path, cli_args, capsys):
    (tmp_path / "empty_line.txt").write_text("a b\n\nc\n")
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "o.hdf5"), *cli_args]) == 2
    assert "line 2 is empty" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "o.hdf5"), "--empty-lines", "skip",
                 *cli_args]) == 0
    with h5py.File(tmp_path / "o.hdf5", "r") as f:
        assert f["1"].shape == (3, 0, 32) and f["2"].shape == (3, 1, 32)
    (tmp_path / "latin1.txt").write_bytes(b"good line\ncaf\xe9 au lait\n")
    assert main(["embed", str(tmp_path / "latin1.txt"), str(tmp_path / "l.hdf5"), *cli_args]) == 2
    assert "line 2 is not UTF-8" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing.txt"), str(tmp_path / "m.hdf5"), *cli_args]) == 2
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "no_dir" / "x.hdf5"), *cli_args]) == 2
    assert "no_dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_line.txt", "latin1.txt", "o.hdf5"]


def test_interrupted_run_leaves_no_file(tiny_model, tmp_path):
    class Exploding:
        name = "exploding.txt"

        def __iter__(self):
            yield b"a b c\n"
            yield b"d e\n"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Embedder(model=tiny_model, batch_size=1).embed_file(Exploding(), tmp_path / "o.hdf5",
                                                                               progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_compute_stays_close_to_float32(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8, dtype="bfloat16")
    got = list(embedder.embed_sentences(sentences[:6]))
    assert all(g.dtype == np.float32 for g in got)
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want[:6])
    assert 0 < worst < 0.05 * scale, (worst, scale)  # bf16 has an 8-bit mantissa: ~1e-2 relative


def test_lanes_end_together():
    rng = np.random.default_rng(0)
    steps = rng.integers(3, 60, size=500)
    free = np.zeros(16, np.int64)
    lane, start = assign_lanes(free, steps)
    assert free.max() - free.min() <= steps.min() + 1  # longest first: only the shortest sentences differ
    for r in range(16):  # each lane's slots follow each other without gaps or overlaps
        mine = np.argsort(start[lane == r])
        ends = (start[lane == r] + steps[lane == r])[mine]
        assert start[lane == r][mine][0] == 0 and np.array_equal(start[lane == r][mine][1:], ends[:-1])


def test_default_lanes_by_device_kind_and_lstm_size():
    """A CPU: 256 lanes while a step's gates fit 4 MB (the built-in 512 cells, 1024), 128 beyond (2x4096);
    an accelerator 1024 a device; always a multiple of the device count."""
    assert embed.default_lanes("cpu", 1, 512) == embed.default_lanes("cpu", 1, 1024) == 256
    assert embed.default_lanes("cpu", 1, 2048) == embed.default_lanes("cpu", 1, 4096) == 128
    assert embed.default_lanes("cpu", 3, 512) == 258 and embed.default_lanes("cpu", 3, 4096) == 129
    assert embed.default_lanes("gpu", 2, 4096) == 2048
    assert Embedder(devices=jax.devices()[:1]).lanes == 256  # the built-in model


def test_a_short_input_gets_the_lanes_that_cost_least():
    assert choose_lanes(np.array([190] + [27] * 279), 128, 1, 32) == 128  # lane subsets run the long one alone
    many_long = np.array([190] + [110, 100, 97, 93, 90, 90, 87, 84] + [27] * 291)  # 9 run past 128 lanes' end
    assert choose_lanes(many_long, 128, 1, 32) == 64
    assert choose_lanes(np.array([22]), 128, 1, 32) == 1  # one sentence: one lane (a small ring and gather)
    assert choose_lanes(np.array([27] * 10), 128, 1, 32, step_overhead=1024) == 16  # no more than it fills
    assert choose_lanes(np.array([9]), 128, 4, 32) == 4  # a multiple of the device count
    assert choose_lanes(np.array([], np.int64), 128, 1, 32) == 1


def test_feature_major_steps_weigh_a_smaller_step_overhead(tiny_model, monkeypatch):
    """A feature-major step costs its lanes plus ~8 lanes' worth (2x4096 on this CPU), a batch-major one ~32: 900
    sentences shaped like the held-out corpus's first 900 (its 12 longest, the rest at its mean) get 64 lanes
    feature-major, which ran them ~13% faster than the 128 that the batch-major cost picks."""
    steps = slot_steps(np.array([188, 108, 98, 95, 91, 88, 88, 85, 82, 73, 70, 68] + [18] * 888))
    batch_major = Embedder(model=tiny_model).step_overhead_lanes(128)
    monkeypatch.setattr(embed, "FEATURE_MAJOR_MIN_BYTES", 0)
    feature_major = Embedder(model=tiny_model).step_overhead_lanes(128)
    assert (batch_major, feature_major) == (embed.STEP_OVERHEAD_LANES["cpu"], embed.FEATURE_MAJOR_STEP_OVERHEAD_LANES)
    assert choose_lanes(steps, 128, 1, 32, batch_major) == 128 and choose_lanes(steps, 128, 1, 32, feature_major) == 64


def test_blocks_with_few_busy_lanes_run_only_those():
    assert lane_subsets(128) == (128, 32, 16, 8, 1) and lane_subsets(8) == (8, 2, 1) and lane_subsets(1) == (1,)
    timeline = Timeline(lanes=8, block_steps=4, subsets=lane_subsets(8))
    lengths = np.array([22, 12] + [3] * 12)  # 22 and 12 steps in lanes 0 and 1; 12 of 3 steps in lanes 2-7
    timeline.place(np.arange(14), lengths, np.arange(70, dtype=np.int32) + 2)
    blocks = timeline.pop_blocks(final=True)
    assert [None if b.active is None else b.active.tolist() for b in blocks] == [None, None, [0, 1], [0], [0], [0]]
    two = Timeline(lanes=8, block_steps=4, subsets=lane_subsets(4), devices=2)  # lanes 0-3 and 4-7
    two.place(np.arange(14), lengths, np.arange(70, dtype=np.int32) + 2)
    assert [None if b.active is None else b.active.tolist() for b in two.pop_blocks(final=True)] == [
        None, None, None, [0, 4], [0, 4], [0, 4]]  # the same count on each device (lanes 0 and 1: 2 of 4 on one)
    whole = Timeline(lanes=8, block_steps=4)  # the same placement, every block on all lanes
    whole.place(np.arange(14), lengths, np.arange(70, dtype=np.int32) + 2)
    for block, full in zip(blocks, whole.pop_blocks(final=True)):
        lanes = slice(None) if block.active is None else block.active
        assert not full.mask[np.setdiff1d(np.arange(8), np.arange(8)[lanes])].any()  # nothing busy is left out
        for name in ("forward", "backward", "reset", "mask"):
            assert np.array_equal(getattr(block, name), getattr(full, name)[lanes])


def test_an_inputs_end_compiles_a_lane_subset_only_where_it_pays():
    subsets = lane_subsets(128)
    # the built-in model on the CPU: a block program compiles in ~3 blocks' time; the end's 32- and 8-lane blocks
    # would save 1.5 blocks, so they run on all lanes
    assert drain_lanes([128, 32, 8, 8], subsets, {128}, 32, 3.0) == {128: 128, 32: 128, 8: 128}
    assert drain_lanes([128, 32, 8, 8], subsets, {128}, 32, 0.0) == {128: 128, 32: 32, 8: 8}
    # 2x4096: compiling takes a quarter of a block; 20 one-lane blocks save ~15 blocks
    assert drain_lanes([128] + [1] * 20, subsets, {128}, 32, 0.25) == {128: 128, 1: 1}
    assert drain_lanes([32, 1, 1], subsets, {128, 8}, 32, 1.0) == {32: 128, 1: 8}  # compiled ones are free
    assert drain_lanes([32, 8, 8], subsets, {128}, 32, 1.0) == {32: 32, 8: 32}  # one program serves both


def test_a_widened_block_is_the_block_timeline_makes_with_those_lanes():
    lengths = np.array([22, 12] + [3] * 12)
    for devices in (1, 2):
        part, made = 8 // devices, []
        for subsets in (lane_subsets(part), (part,), (part, 2)):
            timeline = Timeline(lanes=8, block_steps=4, subsets=subsets, devices=devices)
            timeline.place(np.arange(14), lengths, np.arange(70, dtype=np.int32) + 2)
            made.append(timeline.pop_blocks(final=True))
        widened = 0
        for block, full, pair in zip(*made):
            for want in (full, pair):
                n = len(want.forward) // devices
                if len(block.forward) // devices > n:
                    continue  # widen never narrows
                got = widen(block, n, 8, devices)
                widened += block.active is not None and got.active is not block.active
                assert (got.active is None) == (want.active is None) and got.first_step == want.first_step
                assert got.active is None or got.active.tolist() == want.active.tolist()
                for name in ("forward", "backward", "reset", "mask"):
                    assert np.array_equal(getattr(got, name), getattr(want, name))
        assert widened >= 4


def _ending_with_a_long_sentence(count):
    """count short sentences, then one of 200 tokens: on 8 lanes, 70 are a stream (more than LOOK_AHEAD_PER_LANE a
    lane) and 40 an input known in advance; either ends with the long sentence running on alone."""
    return _sentences(count, seed=7) + [list(np.random.default_rng(8).choice(WORDS, size=200))]


@pytest.mark.parametrize("compile_blocks", [0.0, 1e9])
@pytest.mark.parametrize("count", [70, 40])
def test_an_inputs_end_keeps_the_numbers_whether_it_runs_on_subsets_or_all_lanes(tiny_model, monkeypatch,
                                                                                compile_blocks, count):
    """An input ends with a long sentence: its last blocks run on the one-lane program, or (compiling costs more
    than they save) widened to all lanes; the vectors are the same. 70 sentences (more than 8 a lane) are a
    stream, 40 an input known in advance: the same weighing decides for both, so a short input compiles no more
    programs than a long one."""
    decided = []

    def decide(counts, subsets, compiled, overhead, _):
        decided.append(drain_lanes(counts, subsets, compiled, overhead, compile_blocks))
        return decided[-1]

    monkeypatch.setattr(embed, "drain_lanes", decide)
    sentences = _ending_with_a_long_sentence(count)
    embedder = Embedder(model=tiny_model, batch_size=8, block_steps=4)
    got = list(embedder.embed_sentences(sentences))
    for sentence, vectors in zip(sentences, got):
        want = reference.bilm_sentence(tiny_model.params, tiny_model.options, sentence)[:, 1:-1]
        np.testing.assert_allclose(vectors, want, atol=1e-5)
    assert len(decided) == 1 and decided[0][1] == (1 if compile_blocks == 0 else 2)  # 2 lanes a device: all
    assert embedder._block.signatures == (2 if compile_blocks == 0 else 1)


@pytest.mark.parametrize("count", [70, 40])
def test_a_small_models_input_end_runs_on_all_lanes(tiny_model, count):
    """Measured, not forced: the tiny model's block runs in milliseconds against >= 0.5 s to compile a program, so
    the end of a stream and of a known input alike runs on the all-lanes program (the CLI's 2,000 lines compile
    what its 100,000 do); the block program's run was timed once."""
    sentences = _ending_with_a_long_sentence(count)
    embedder = Embedder(model=tiny_model, batch_size=8, block_steps=4)
    list(embedder.embed_sentences(sentences))
    assert embedder._block.signatures == 1
    [seconds] = embedder._block_programs.values()
    assert 0 < seconds < embed.DRAIN_MIN_COMPILE_SECONDS


def _compiling_is_free(monkeypatch):
    """An input's end runs every block on its own lane subset (``drain_lanes`` with compiling taken as free), as a
    large model's does: with the tiny model, a block costs far less than a compilation and all would run widened."""
    monkeypatch.setattr(embed, "drain_lanes", lambda counts, subsets, compiled, overhead, _: drain_lanes(
        counts, subsets, compiled, overhead, 0.0))


def test_lane_subsets_keep_the_numbers(tiny_model, monkeypatch):
    """A short input and an input's end: a long sentence runs alone in the one-lane program, others in a few
    (compiling taken as free, as for a large model whose blocks cost far more than a compilation)."""
    _compiling_is_free(monkeypatch)
    sentences = _sentences(30, seed=5) + [list(np.random.default_rng(6).choice(WORDS, size=150))]
    embedder = Embedder(model=tiny_model, batch_size=16, block_steps=8)  # the 4 test devices: 4 lanes each
    got = list(embedder.embed_sentences(sentences))
    for sentence, vectors in zip(sentences, got):
        want = reference.bilm_sentence(tiny_model.params, tiny_model.options, sentence)[:, 1:-1]
        np.testing.assert_allclose(vectors, want, atol=1e-5)
    blocks = embedder._block.signatures
    assert blocks >= 2  # all 16 lanes, then subsets as lanes finish (the last blocks: the long sentence alone)
    before = embedder.compilations
    assert [v.shape for v in embedder.embed_sentences(sentences)] == [v.shape for v in got]
    assert embedder.compilations == before


def test_slots_reset_and_reverse_each_sentence():
    # a slot is the tokens forward and the tokens reversed backward: the state after <S> / </S> is what a reset sets
    forward, backward = slot_rows(np.array([10, 11, 12, 20]), np.array([3, 1]))
    assert forward.tolist() == [10, 11, 12, 20]
    assert backward.tolist() == [12, 11, 10, 20]
    timeline = Timeline(lanes=2, block_steps=4)
    slots = timeline.place(np.array([0, 1, 2]), np.array([3, 1, 2]), np.array([10, 11, 12, 20, 30, 31]))
    assert slots.lane.tolist() == [0, 1, 1] and slots.start.tolist() == [0, 2, 0]  # longest first
    blocks = timeline.pop_blocks(final=True)
    assert [b.first_step for b in blocks] == [0]
    assert blocks[0].forward.tolist() == [[10, 11, 12, 0], [30, 31, 20, 0]]
    assert blocks[0].backward.tolist() == [[12, 11, 10, 0], [31, 30, 20, 0]]
    assert blocks[0].reset.tolist() == [[True, False, False, False], [True, False, True, False]]
    assert blocks[0].mask.tolist() == [[True, True, True, False], [True, True, True, False]]
    # a block owns its arrays: a view would keep the whole timeline alive while it waits in the stream's queue
    assert all(a.base is None for a in (blocks[0].forward, blocks[0].backward, blocks[0].reset, blocks[0].mask))


def test_timeline_behind_a_long_sentence_copies_its_steps_amortised():
    # a sentence of 2,000 steps in lane 0, short ones filling the other lanes window by window: each pop used to copy
    # every step still held (time quadratic in the long sentence); now the held steps are copied only once the steps
    # dropped before them outweigh them. The blocks are those of a timeline that is placed whole and popped
    # once (the reference: nothing popped before the end)
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[2000], rng.integers(1, 12, 3000)])
    rows = np.arange(int(lengths.sum()), dtype=np.int32) % 1000 + 2
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    streamed, once = Timeline(lanes=4, block_steps=8), Timeline(lanes=4, block_steps=8)
    got, copied, memory = [], 0, None
    for first in range(0, len(lengths), 6):
        last = min(first + 6, len(lengths))
        window = (np.arange(first, last), lengths[first:last], rows[offsets[first] : offsets[last]])
        streamed.place(*window)
        once.place(*window)
        got += streamed.pop_blocks()
        now = streamed.forward if streamed.forward.base is None else streamed.forward.base
        copied += now.shape[1] if now is not memory else 0  # steps held, copied into new memory
        memory = now
    got += streamed.pop_blocks(final=True)
    want = once.pop_blocks(final=True)
    assert len(got) == len(want) > 250
    for a, b in zip(got, want):
        assert a.first_step == b.first_step
        for name in ("forward", "backward", "reset", "mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert copied <= 2 * got[-1].first_step  # copying at every pop: ~100x the steps


def test_gather_plan_reads_whole_sentences_in_input_order_and_unreverses_the_backward_half():
    # ring of 8 steps, 2 lanes: sentence 5 (3 tokens) in lane 1 at steps 6..8, sentence 6 empty, sentence 7
    # (1 token) in lane 0 at step 0
    plan = GatherPlan(steps=8)
    plan.add(Slots(np.array([5, 6, 7]), np.array([1, 0, 0]), np.array([6, 0, 0]), np.array([3, 0, 1])))
    assert plan.oldest_start() == 0 and len(plan.ready(done=8)) == 0  # sentence 5 ends at step 8
    assert plan.ready(done=9).tolist() == [0, 1, 2] and plan.ready_tokens(done=9) == 4
    taken = plan.take(done=9, rows=3)  # sentences 5 and 6 (empty): with 7 they would be 4 tokens
    assert taken.index.tolist() == [5, 6] and len(plan) == 1
    forward, backward = plan.positions(taken, rows=3)
    assert forward.tolist() == [8 + 6, 8 + 7, 8 + 0]  # steps 6, 7, 8 modulo 8 in lane 1
    assert backward.tolist() == [8 + 0, 8 + 7, 8 + 6]  # steps 8, 7, 6: the slot reversed
    assert plan.take(done=9, rows=3).index.tolist() == [7] and plan.oldest_start() == float("inf")


def test_gather_plan_spills_a_running_sentence_the_ring_cannot_hold():
    """A sentence still running with steps about to be overwritten has its steps so far read early (spill); it is
    then taken from its first step still in the ring, and the ring keeps its size."""
    plan = GatherPlan(steps=8, in_order=False)
    plan.add(Slots(np.array([0, 1]), np.array([0, 1]), np.array([0, 0]), np.array([30, 2])))
    assert plan.take(done=4, rows=8).index.tolist() == [1]
    assert plan.oldest_start() == 0 and (plan.kept == plan.start).all()
    early = plan.spill(done=8, before=4)  # steps 0..7 of sentence 0 written; those before 4 would be overwritten
    assert (early.index.tolist(), early.start.tolist(), early.length.tolist()) == ([0], [0], [8])
    assert plan.steps_of(early, rows=4).tolist() == list(range(8))  # lane 0's steps 0..7
    assert plan.oldest_start() == 8 and (plan.kept != plan.start).tolist() == [True]
    assert len(plan.spill(done=12, before=4).index) == 0  # nothing before step 4 is left in the ring
    again = plan.spill(done=16, before=9)
    assert (again.start.tolist(), again.length.tolist()) == ([8], [8])
    assert plan.steps_of(again, rows=3).tolist() == list(range(8)) + [0]  # steps 8..15 at 0..7; padding
    assert plan.take(done=29, rows=64) is None  # not finished
    taken = plan.take(done=30, rows=64)
    assert (taken.index.tolist(), taken.start.tolist(), taken.length.tolist()) == ([0], [16], [30])
    # in input order, a finished sentence waits behind a running one: read early too, whole; all three are taken
    # together (one read for what is left: sentence 0's steps from 8, and sentence 3, never read early)
    plan = GatherPlan(steps=8, in_order=True)
    plan.add(Slots(np.array([0, 1, 2, 3]), np.array([0, 1, 1, 1]), np.array([0, 0, 3, 9]), np.array([30, 3, 2, 4])))
    early = plan.spill(done=8, before=4)
    assert (early.index.tolist(), early.start.tolist(), early.length.tolist()) == ([0, 1, 2], [0, 0, 3], [8, 3, 2])
    assert plan.oldest_start() == 8 and plan.take(done=29, rows=64) is None
    taken = plan.take(done=30, rows=64)
    assert (taken.index.tolist(), taken.start.tolist(), taken.length.tolist()) == ([0, 1, 2, 3], [8, 3, 5, 9],
                                                                                  [30, 3, 2, 4])
    assert len(plan) == 0


@pytest.mark.parametrize("waiting_bytes", [embed.WAITING_BYTES, 1])
@pytest.mark.parametrize("layout", ["allennlp", "packed"])
def test_long_sentences_are_read_in_pieces_and_keep_the_numbers(tiny_model, monkeypatch, tmp_path, layout,
                                                                  waiting_bytes):
    """Sentences far longer than the ring (8 steps here) among short ones: each is read in pieces as it runs (and,
    in input order, the sentences finished behind it), put together on the host, with the numbers of the loop
    reference, in a file of either layout and from embed_sentences; the ring keeps its 8 steps. (It used to double
    for every lane until the longest sentence fitted: 25 GB at 256 lanes for a line of 20,000 tokens.) With
    WAITING_BYTES at 1, in input order no sentence starts more than the ring's steps before the last end placed
    (Timeline.max_lead): the other lanes idle while a long sentence runs on."""
    monkeypatch.setattr(embed, "RING_STEPS", 8)
    monkeypatch.setattr(embed, "WAITING_BYTES", waiting_bytes)
    rng = np.random.default_rng(3)
    sentences = [[f"w{k % 40}" for k in range(n)] for n in np.where(rng.random(60) < 0.1, 90, rng.integers(1, 6, 60))]
    sentences[0] = [f"w{k % 40}" for k in range(70)]
    want = [reference.bilm_sentence(tiny_model.params, tiny_model.options, s)[:, 1:-1] for s in sentences]
    embedder = Embedder(model=tiny_model, batch_size=3, block_steps=4)
    block, ring_steps = embedder._block, set()
    monkeypatch.setattr(embedder, "_block", lambda *a, **k: (ring_steps.add(a[3].shape[1]), block(*a, **k))[1])
    (tmp_path / "in.txt").write_text("".join(" ".join(s) + "\n" for s in sentences))
    embedder.embed_file(str(tmp_path / "in.txt"), tmp_path / "out.hdf5", layout=layout, progress=False)
    with open_embeddings(tmp_path / "out.hdf5") as got:
        for k, expected_k in enumerate(want):
            np.testing.assert_allclose(got[k], expected_k, atol=1e-5)
    for got_k, expected_k in zip(embedder.embed_sentences(sentences, mode="top"), want, strict=True):
        np.testing.assert_allclose(got_k, expected_k[-1], atol=1e-5)
    assert ring_steps == {8}


def test_timeline_max_lead_starts_no_sentence_far_before_the_last_end():
    """In input order, what finishes before a sentence placed earlier waits for it: with max_lead, a window placed
    after a long sentence starts no earlier than max_lead steps before its end (those lanes idle until then)."""
    timeline = Timeline(lanes=4, block_steps=4, subsets=lane_subsets(4), max_lead=6)
    first = timeline.place(np.array([0, 1]), np.array([40, 2]), np.arange(42))
    assert first.start.tolist() == [0, 0]  # nothing placed before them
    after = timeline.place(np.array([2, 3, 4]), np.array([3, 3, 5]), np.arange(11))
    assert after.start.min() == 40 - 6 and sorted(after.lane.tolist()) == [1, 2, 3]
    blocks = timeline.pop_blocks()  # every lane decided to step 37
    assert [b.first_step for b in blocks] == list(range(0, 36, 4))
    idle = [b for b in blocks if 4 <= b.first_step < 32]  # lane 0 alone: blocks of the fewest lanes, one
    assert idle and all(b.active.tolist() == [0] and b.mask.all() for b in idle)
    free = Timeline(lanes=4, block_steps=4)  # unbounded (any order): they start as lanes free up
    free.place(np.array([0, 1]), np.array([40, 2]), np.arange(42))
    assert free.place(np.array([2, 3, 4]), np.array([3, 3, 5]), np.arange(11)).start.min() == 0


def test_gather_plan_in_any_order_reads_each_sentence_once_finished():
    """Sentence 5 runs to step 8; 6 (empty) and 7 (step 0) are read before it, and it alone after."""
    plan = GatherPlan(steps=8, in_order=False)
    plan.add(Slots(np.array([5, 6, 7]), np.array([1, 0, 0]), np.array([6, 0, 0]), np.array([3, 0, 1])))
    assert plan.ready(done=1).tolist() == [1, 2] and plan.ready_tokens(done=1) == 1
    taken = plan.take(done=1, rows=3)
    assert taken.index.tolist() == [6, 7] and taken.length.tolist() == [0, 1] and plan.oldest_start() == 6
    assert plan.take(done=8, rows=3) is None
    taken = plan.take(done=9, rows=3)
    assert taken.index.tolist() == [5] and len(plan) == 0
    assert plan.positions(taken, rows=3)[0].tolist() == [8 + 6, 8 + 7, 8 + 0]


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("layers", [3, None])
def test_gather_reads_token_by_token_or_each_sentence_blocked(blocked, layers):
    """gather_tokens at vector_places' places against the ring read by hand: sentence k's token j, layer l takes the
    forward half of its slot's step j and the backward half of step n - 1 - j; blocked, sentence k's rows hold
    its (layers, n, dim) in C order; the padding comes last."""
    from elmo_jax.embed import gather_tokens
    from elmo_jax.lanes import vector_places

    lanes, steps, width = 3, 8, 4
    lead = () if layers is None else (layers,)
    ring = np.random.default_rng(0).standard_normal((lanes, steps, *lead, width)).astype(np.float32)
    slots = Slots(np.array([4, 5, 6]), np.array([2, 0, 1]), np.array([6, 0, 3]), np.array([3, 0, 2]))
    plan = GatherPlan(steps=steps)
    forward, backward = plan.positions(slots, rows=8)  # 5 tokens, 3 of padding
    n_layers = layers or 1
    got = np.asarray(gather_tokens(ring, *(vector_places(at, slots.length, n_layers, blocked)
                                           for at in (forward, backward))))
    assert got.shape == (8 * n_layers, width)
    flat = ring.reshape(lanes * steps, n_layers, width)
    sentences = []
    for lane, start, n in zip(slots.lane, slots.start, slots.length):
        at = lane * steps + (start + np.arange(n)) % steps
        value = np.concatenate([flat[at, :, : width // 2], flat[at[::-1], :, width // 2 :]], axis=-1)  # (n, l, w)
        sentences.append(np.moveaxis(value, 0, 1) if blocked else value)
    want = np.concatenate([v.reshape(-1, width) for v in sentences])
    np.testing.assert_array_equal(got[: len(want)], want)
    np.testing.assert_array_equal(got[len(want) :], np.tile(np.concatenate([flat[0, :, :2], flat[0, :, 2:]], -1),
                                                            (3, 1)))


def test_short_tokens_skip_padding_windows_exactly(tiny_model):
    from elmo_jax.bilm import token_embedding
    from elmo_jax.char_cnn import long_tokens
    from elmo_jax.characters import token_to_char_ids
    from elmo_jax.embed import short_token_chars

    words = ["a", "bank", "x" * 13, "y" * 14, "z" * 15, "ÿ" * 7, "€" * 5, "w" * 60]
    embedder = Embedder(model=tiny_model)
    short_chars = short_token_chars(tiny_model.options)
    assert short_chars < 50
    ids = np.stack([token_to_char_ids(w) for w in words])
    assert long_tokens(ids).tolist() == [False] * 4 + [True, False, True, True]  # z*15, €*5 (15 bytes), w*60
    full = token_embedding(tiny_model.params, tiny_model.options, ids)
    short = token_embedding(tiny_model.params, tiny_model.options, ids[:5, :short_chars])
    np.testing.assert_allclose(short, full[:5], atol=1e-6)
    expected = reference.bilm_sentence(tiny_model.params, tiny_model.options, words)[:, 1:-1]
    np.testing.assert_allclose(embedder.embed_sentence(words), expected, atol=1e-5)


def test_cli_repeated_sentence_maps_to_its_last_line_as_allennlp(tmp_path, cli_args):
    (tmp_path / "in.txt").write_text("a b\nc\na b\n")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), *cli_args]) == 0
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert json.loads(f["sentence_to_index"][0]) == {"a b": "2", "c": "1"}
        assert sorted(f.keys()) == ["0", "1", "2", "sentence_to_index"]


@pytest.mark.parametrize("flag, value, message", [("--layout", "columns", "layout must be one of"),
                                                  ("--output-dtype", "float64", "output_dtype must be one of"),
                                                  ("--tokenizer", "spacy", "tokenizer must be one of")])
def test_cli_unknown_option_values_are_one_line_errors(tmp_path, cli_args, capsys, flag, value, message):
    (tmp_path / "in.txt").write_text("a b\n")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), flag, value, *cli_args]) == 2
    err = capsys.readouterr().err
    assert message in err and value in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.hdf5").exists()


def test_cli_packed_float16_and_moses_read_back_as_the_allennlp_layout(tmp_path, cli_args):
    pytest.importorskip("sacremoses")
    from elmo_jax.embed_output import open_embeddings

    raw = ["The bank’s rates rose, didn’t they?", "Hello", "I went to the river bank."]
    (tmp_path / "raw.txt").write_text("\n".join(raw) + "\n", encoding="utf-8")
    assert main(["embed", str(tmp_path / "raw.txt"), str(tmp_path / "a.hdf5"), "--tokenizer", "moses",
                 *cli_args]) == 0
    assert main(["embed", str(tmp_path / "raw.txt"), str(tmp_path / "p.hdf5"), "--tokenizer", "moses",
                 "--layout", "packed", "--output-dtype", "float16", *cli_args]) == 0
    with h5py.File(tmp_path / "a.hdf5", "r") as f, open_embeddings(tmp_path / "p.hdf5") as packed:
        assert len(packed) == 3 and packed.attrs["mode"] == "all" and packed.attrs["tokenizer"] == "moses"
        assert f["0"].shape == (3, 10, 32)  # The bank 's rates rose , didn 't they ?
        for i in range(3):
            assert packed[i].dtype == np.float16
            np.testing.assert_array_equal(packed[i], f[str(i)][...].astype(np.float16))
        assert json.loads(f["sentence_to_index"][0]) == packed.sentence_to_index


def test_embed_rows_gives_sentences_back_to_back_in_the_output_dtype(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=4)
    got, lengths = [], []
    for rows, counts in embedder.embed_rows(sentences[:10] + [[]] + sentences[10:], mode="top",
                                            allow_empty=True, output_dtype="float16"):
        assert rows.dtype == np.float16 and len(rows) == counts.sum()
        got.append(rows)
        lengths += counts.tolist()
    assert lengths == [len(s) for s in sentences[:10]] + [0] + [len(s) for s in sentences[10:]]
    rows = np.concatenate(got)
    top = np.concatenate([w[-1] for w in want])  # (tokens, dim)
    np.testing.assert_allclose(rows.astype(np.float32), top, atol=2e-3 * np.abs(top).max())


def test_stand_in_device_runs_the_host_side_only(tiny_model):
    embedder = Embedder(model=tiny_model, batch_size=4, stand_in_device=True)
    sentences = _sentences(50, seed=4)
    out = list(embedder.embed_sentences(sentences))
    assert [a.shape for a in out] == [(3, len(s), 32) for s in sentences] and not any(a.any() for a in out)
    assert embedder.compilations == 0


@pytest.mark.parametrize("seed", [2, 4, 11])
@pytest.mark.parametrize("tail, lanes_end_together", [(embed.TAIL_PER_LANE, True), (0, False)])
def test_a_streams_last_sentences_are_packed_together_so_the_lanes_end_together(tiny_model, monkeypatch, tail,
                                                                               lanes_end_together, seed):
    """A stream's last window holds every sentence read ahead (TAIL_PER_LANE a lane), longest first: it runs in
    the fewest blocks its steps fill. Placed 2 sentences a lane at a time like the windows before it (tail 0), a
    long sentence near the end runs on alone for several blocks (with 4 a lane, up to 3 more here: a long sentence
    placed in the window before the last ran past the others)."""
    monkeypatch.setattr(embed, "TAIL_PER_LANE", tail)
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(600) < 0.1, 60, rng.integers(1, 8, 600))  # a long sentence now and then
    sentences = [[f"w{k}" for k in range(n)] for n in lengths]
    embedder = Embedder(model=tiny_model, batch_size=8, block_steps=4)
    stream = embed._Stream(embedder, sentences, 8, embed.TokenTable(64), allow_empty=False)
    try:
        blocks = [item for kind, item in stream if kind == "block"]
    finally:
        stream.stop()
    fewest = -(-int(np.sum(slot_steps(lengths))) // (8 * 4))
    assert (len(blocks) == fewest) == lanes_end_together


@pytest.mark.parametrize("devices", [1, 2])
def test_feature_major_blocks_keep_the_numbers(tiny_model, expected, monkeypatch, devices):
    """A large model's blocks run feature-major on a CPU (forced here for the tiny model): blocks of 8 lanes run so,
    the long sentence's last blocks on one lane (fewer than FEATURE_MAJOR_MIN_LANES) hoist the input gates; the
    vectors are the loop reference's."""
    assert not Embedder(model=tiny_model)._feature_major  # its kernel is small
    monkeypatch.setattr(embed, "FEATURE_MAJOR_MIN_BYTES", 0)
    monkeypatch.setattr(embed, "choose_lanes", lambda steps, max_lanes, *args: max_lanes)  # 8 lanes, then 1
    _compiling_is_free(monkeypatch)
    sentences, want = expected
    long = list(np.random.default_rng(9).choice(WORDS, size=90))
    sentences, want = sentences + [long], want + [reference.bilm_sentence(tiny_model.params, tiny_model.options,
                                                                          long)[:, 1:-1]]
    assert jax.device_count() >= devices, "tests/conftest.py asks for 4 CPU devices"
    embedder = Embedder(model=tiny_model, batch_size=8 * devices, block_steps=4, devices=jax.devices()[:devices])
    assert embedder._feature_major and "kernel_t" in embedder.params["lstm"]["stacked"][0]
    got = list(embedder.embed_sentences(sentences))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    lanes_run = {key[3] // devices for key in embedder._block_programs}  # lanes a device
    assert max(lanes_run) >= embed.FEATURE_MAJOR_MIN_LANES > min(lanes_run)


@pytest.mark.parametrize("layout", ["allennlp", "packed"])
def test_a_file_is_written_as_sentences_finish_and_reads_in_input_order(tiny_model, tmp_path, monkeypatch, layout):
    """A long first sentence finishes last: the AllenNLP layout writes the others' datasets before it (each named
    by its line), the packed layout waits for it; both read back line by line as the loop reference."""
    from elmo_jax import embed_output
    from elmo_jax.embed_output import open_embeddings

    sentences = [list(np.random.default_rng(1).choice(WORDS, size=60))] + _sentences(40, seed=2)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(" ".join(s) for s in sentences) + "\n")
    written = []
    write_rows = embed_output.EmbeddingWriter.write_rows

    def spy(self, rows, lengths, indices=None, blocked=False):
        written.append(list(range(self.n_sentences, self.n_sentences + len(lengths))) if indices is None
                       else np.asarray(indices).tolist())
        return write_rows(self, rows, lengths, indices, blocked)

    monkeypatch.setattr(embed_output.EmbeddingWriter, "write_rows", spy)
    embedder = Embedder(model=tiny_model, batch_size=4, block_steps=4)
    embedder.embed_file(source, tmp_path / "out.hdf5", layout=layout, progress=False)
    order = [i for batch in written for i in batch]
    assert sorted(order) == list(range(len(sentences)))
    assert (order.index(0) > 0) == (layout == "allennlp")
    stored = open_embeddings(tmp_path / "out.hdf5")
    assert len(stored) == len(sentences)
    for i, sentence in enumerate(sentences):
        want = reference.bilm_sentence(tiny_model.params, tiny_model.options, sentence)[:, 1:-1]
        np.testing.assert_allclose(stored[i], want, atol=1e-5)
