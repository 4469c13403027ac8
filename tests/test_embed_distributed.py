"""``elmo-jax embed --distributed`` for real: 2 local processes of 2 CPU devices each, joined through JAX's
coordination service (as tests/test_train.py runs ``train --distributed``), against one process in this one.

Failures: no coordinator, bad input in one process's share, a process killed midway. Each ends every
surviving process with a one-line error and status 2 within seconds, and leaves no new OUT.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from elmo_jax.cli import main
from elmo_jax.embed_output import open_embeddings
from tests.conftest import ROOT

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "quickly", "blue", "green", "house",
         "river", "tree", ",", "."]


def _model(elmo_tiny) -> list[str]:
    return ["--options", str(elmo_tiny / "options.json"), "--weights", str(elmo_tiny / "lm_weights.hdf5")]


def _write_lines(path, n_lines: int, max_words: int = 12, seed: int = 0) -> list[str]:
    """n_lines of random words, some lines repeated (sentence_to_index keeps the last)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n_lines)]
    lines[9] = lines[2]  # repeated within process 0's share of 40 lines
    lines[35] = lines[5]  # and across the shares
    path.write_text("\n".join(lines) + "\n")
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*argv, n_processes: int = 2, **env) -> list[subprocess.Popen]:
    """Start ``elmo-jax embed --distributed --quiet ARGV`` in n_processes local processes of 2 CPU devices each."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "elmo_jax.cli", "embed", *map(str, argv), "--distributed",
                              "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "JAX_NUM_PROCESSES": str(n_processes), "JAX_PROCESS_ID": str(index),
                                  "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu", **env})
            for index in range(n_processes)]


def _finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


def _assert_one_line_error(err: str, expected: str) -> None:
    """The error is stderr's last line, one line, and nothing aborted (no JAX fatal log, no traceback)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("elmo-jax embed: error: ") and expected in last, err
    assert "Traceback" not in err and "Check failure" not in err and "Terminating process" not in err, err


def _assert_same_file(got, expected, atol: float) -> None:
    """got reads like expected through h5py (keys, arrays, texts) and open_embeddings."""
    with h5py.File(got, "r") as g, h5py.File(expected, "r") as e:
        assert sorted(g.keys()) == sorted(e.keys())
        for key in e:
            if key == "sentence_to_index":
                assert json.loads(g[key][0]) == json.loads(e[key][0])
            elif key == "sentences":  # packed: each line's text
                assert g[key][()].tolist() == e[key][()].tolist()
            else:
                assert g[key].dtype == e[key].dtype and g[key].shape == e[key].shape, key
                np.testing.assert_allclose(g[key][()], e[key][()], rtol=0, atol=atol, err_msg=key)
        for attr in ("layout", "output_dtype", "n_sentences", "n_tokens", "mode"):
            assert g.attrs[attr] == e.attrs[attr], attr
    with open_embeddings(got) as g, open_embeddings(expected) as e:
        assert (len(g), g.layout, g.sentence_to_index) == (len(e), e.layout, e.sentence_to_index)
        for i in range(len(e)):
            np.testing.assert_allclose(g[i], e[i], rtol=0, atol=atol)


@pytest.mark.parametrize("layout, output_dtype", [("allennlp", "float32"), ("packed", "float32"),
                                                  ("allennlp", "float16")])
def test_two_processes_write_what_one_process_writes(elmo_tiny, tmp_path, capsys, layout, output_dtype):
    text, one, out = tmp_path / "in.txt", tmp_path / "one.hdf5", tmp_path / "out.hdf5"
    lines = _write_lines(text, 40)
    options = ["--layout", layout, "--output-dtype", output_dtype, *_model(elmo_tiny)]
    older = [out.parent / "out.hdf5.parts" / name for name in ("part-00000-of-00002-older.hdf5",
                                                                  ".tmp-x1-part-00001-of-00002-older.hdf5")]
    older[0].parent.mkdir()
    for path in [*older, older[0].parent / "notes.txt"]:
        path.write_text("from an older run")

    started = time.perf_counter()
    (rc0, out0, err0), (rc1, out1, err1) = _finish(_start(text, out, *options))
    seconds = time.perf_counter() - started
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert main(["embed", str(text), str(one), "--quiet", *options]) == 0
    summary = capsys.readouterr().out.strip()

    tokens = sum(len(line.split()) for line in lines)
    assert summary.startswith(f"wrote {one}: 40 sentences, {tokens} tokens in ")
    # Before it, gloo may print that each process's 2 CPU devices are connected (their collectives).
    last = out0.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}: 40 sentences, {tokens} tokens in ") and last.endswith(" compilations)")
    assert "wrote" not in out1
    _assert_same_file(out, one, atol=1e-6)
    parts = sorted(p.name for p in (out.parent / "out.hdf5.parts").iterdir())
    assert [p[:19] for p in parts] == ["notes.txt", "part-00000-of-00002", "part-00001-of-00002"]  # older gone
    assert seconds < 60


def test_stdin_and_settings_are_refused(tmp_path, capsys, monkeypatch):
    assert main(["embed", "-", str(tmp_path / "out.hdf5"), "--distributed"]) == 2
    assert "not stdin" in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("a b\n")
    monkeypatch.setenv("ELMO_JAX_EMBED_PEER_TIMEOUT", "0")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), "--distributed"]) == 2
    assert "ELMO_JAX_EMBED_PEER_TIMEOUT='0': expected seconds" in capsys.readouterr().err


def test_no_coordinator_is_a_one_line_error(elmo_tiny, tmp_path):
    text, out = tmp_path / "in.txt", tmp_path / "out.hdf5"
    _write_lines(text, 40)
    port = _free_port()  # closed again: nothing listens there
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "elmo_jax.cli", "embed", str(text), str(out), "--distributed",
                              *_model(elmo_tiny)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_PLATFORMS": "cpu",
                                  "ELMO_JAX_EMBED_CONNECT_TIMEOUT": "3"})
    assert process.returncode == 2
    _assert_one_line_error(process.stderr, f"not all processes met at 127.0.0.1:{port} within 3 s")
    assert not out.exists() and time.perf_counter() - started < 30


def test_bad_line_in_one_share_stops_both_and_keeps_the_older_output(elmo_tiny, tmp_path):
    text, bad, out = tmp_path / "in.txt", tmp_path / "bad.txt", tmp_path / "out.hdf5"
    lines = _write_lines(text, 40)
    assert [rc for rc, *_ in _finish(_start(text, out, *_model(elmo_tiny)))] == [0, 0]
    before = {path: path.read_bytes() for path in [out, *(out.parent / "out.hdf5.parts").iterdir()]}

    lines[30] = ""  # in process 1's share (lines 20-39)
    bad.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    (rc0, _, err0), (rc1, _, err1) = _finish(_start(bad, out, *_model(elmo_tiny)))
    assert (rc0, rc1) == (2, 2)
    _assert_one_line_error(err1, f"{bad}: line 31 is empty")  # the file's own line number
    _assert_one_line_error(err0, f"process 1 of 2 failed: {bad}: line 31 is empty")
    assert time.perf_counter() - started < 60
    assert all(path.read_bytes() == data for path, data in before.items())  # the older OUT and its parts
    with open_embeddings(out) as emb:
        assert len(emb) == 40


def test_killed_process_ends_the_other_with_a_one_line_error(elmo_tiny, tmp_path):
    """Process 1 is killed while it embeds (its temporary part exists): process 0 sees no sign of life for
    ELMO_JAX_EMBED_PEER_TIMEOUT s and leaves with status 2, before JAX's heartbeat timeout would abort it."""
    text, out = tmp_path / "in.txt", tmp_path / "out.hdf5"
    _write_lines(text, 2000, max_words=30)
    # Lanes of 1 and blocks of 1 step: each share takes seconds, so the kill lands midway.
    processes = _start(text, out, *_model(elmo_tiny), "--batch-size", 1, "--block-steps", 1,
                       ELMO_JAX_EMBED_PEER_TIMEOUT="5")
    parts = out.parent / "out.hdf5.parts"
    deadline = time.monotonic() + 60
    while not list(parts.glob(".tmp-*-part-00001-of-00002-*")) and time.monotonic() < deadline:
        assert processes[1].poll() is None
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    (rc0, out0, err0), (rc1, *_) = _finish(processes, timeout=60)
    assert (rc0, rc1) == (2, -signal.SIGKILL)
    _assert_one_line_error(err0, "process 1 of 2 stopped (no sign of life for 5 s)")
    assert time.perf_counter() - killed < 25 and "wrote" not in out0
    assert not out.exists() and not list(parts.glob("part-00001-*"))  # killed before its part was written
