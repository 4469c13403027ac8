import importlib
import os
import pathlib
import sys

import h5py
import numpy as np
import pytest

from elmo_jax import BiLM, BiLMOptions, WeightsError, batch_to_ids, load_hdf5, save_hdf5
from elmo_jax.weights import load_checkpoint, save_checkpoint


def _datasets(path):
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return {n: f[n][...] for n in names}


def test_hdf5_round_trip_is_exact(elmo_tiny, tiny_model, tmp_path):
    save_hdf5(tiny_model.params, tiny_model.options, tmp_path / "w.hdf5")
    original, written = _datasets(elmo_tiny / "lm_weights.hdf5"), _datasets(tmp_path / "w.hdf5")
    assert original.keys() == written.keys()
    for name in original:
        assert original[name].shape == written[name].shape and np.array_equal(original[name], written[name]), name


def test_orbax_checkpoint_round_trip(tiny_model, tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model.params, tiny_model.options)
    params, options = load_checkpoint(tmp_path / "ckpt")
    assert options == tiny_model.options
    for a, b in zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(tiny_model.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def make_weights(bench_dir):
    sys.path.insert(0, str(bench_dir))
    try:
        return importlib.import_module("make_weights")
    finally:
        sys.path.remove(str(bench_dir))


@pytest.mark.parametrize("size", ["2x1024_128_2048cnn_1xhighway", "2x4096_512_2048cnn_2xhighway"])
def test_published_sizes_load(make_weights, size, tmp_path):
    """Random weights in the exact published layout (written by ../shared/bench/make_weights.py)."""
    raw_options = make_weights.make_options(size)
    weights = make_weights.make_weights(raw_options, np.random.default_rng(0))
    with h5py.File(tmp_path / "w.hdf5", "w") as f:
        for name, value in weights.items():
            f.create_dataset(name, data=value)
    options = BiLMOptions.from_dict(raw_options)
    params = load_hdf5(tmp_path / "w.hdf5", options)
    assert params["char_embed"].shape == (262, 16) and not params["char_embed"][0].any()
    assert len(params["highway"]) == options.char_cnn.n_highway
    assert params["convolutions"][6]["kernel"].shape == (7, 16, 1024)
    if size.startswith("2x1024"):
        out, _ = BiLM(params, options)(batch_to_ids([["Hello", "world", "."]]))
        assert out.activations.shape == (3, 1, 5, 256) and np.isfinite(np.asarray(out.activations)).all()


@pytest.fixture
def tiny_file(elmo_tiny, tmp_path):
    def write(edit):
        data = _datasets(elmo_tiny / "lm_weights.hdf5")
        edit(data)
        path = tmp_path / "edited.hdf5"
        with h5py.File(path, "w") as f:
            for name, value in data.items():
                f.create_dataset(name, data=value)
        return path

    return write


def test_missing_dataset_is_named(tiny_file, tiny_model):
    path = tiny_file(lambda d: d.pop("CNN_high_1/W_carry"))
    with pytest.raises(WeightsError, match="missing datasets.*CNN_high_1/W_carry"):
        load_hdf5(path, tiny_model.options)


def test_wrong_shape_is_named(tiny_file, tiny_model):
    path = tiny_file(lambda d: d.update({"CNN_proj/b_proj": np.zeros(17, np.float32)}))
    with pytest.raises(WeightsError, match=r"'CNN_proj/b_proj' has shape \(17,\).*expect \(16,\)"):
        load_hdf5(path, tiny_model.options)


def test_nan_is_rejected(tiny_file, tiny_model):
    path = tiny_file(lambda d: d["CNN_proj/W_proj"].__setitem__((0, 0), np.nan))
    with pytest.raises(WeightsError, match="NaN"):
        load_hdf5(path, tiny_model.options)


def test_options_that_do_not_match_the_file(elmo_tiny, tiny_model):
    wrong = tiny_model.options.replace(char_cnn=tiny_model.options.char_cnn.__class__(4, ((1, 4), (2, 8)), 1))
    with pytest.raises(WeightsError, match="not described by the options|has shape"):
        load_hdf5(elmo_tiny / "lm_weights.hdf5", wrong)


def test_corrupt_and_truncated_files(elmo_tiny, tiny_model, tmp_path):
    (tmp_path / "garbage.hdf5").write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(WeightsError, match="garbage.hdf5: not a readable HDF5"):
        load_hdf5(tmp_path / "garbage.hdf5", tiny_model.options)
    data = (elmo_tiny / "lm_weights.hdf5").read_bytes()
    (tmp_path / "cut.hdf5").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.hdf5"):
        load_hdf5(tmp_path / "cut.hdf5", tiny_model.options)
    with pytest.raises(WeightsError, match="not found"):
        load_hdf5(tmp_path / "nothing.hdf5", tiny_model.options)


def test_failed_write_leaves_no_file(tiny_model, tmp_path):
    broken = dict(tiny_model.params, projection={"kernel": np.zeros((3, 3)), "bias": np.zeros(3)})
    with pytest.raises(WeightsError, match="projection"):
        save_hdf5(broken, tiny_model.options, tmp_path / "out.hdf5")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_rename_onto_no_file(tmp_path, monkeypatch):
    """write_atomic replaces an existing file by removing it just before the rename: renamed over a file, ext4
    writes the new one back before the rename returns (0.27 s of a 10,000-line embed); an error in the writer
    leaves the old file as it was."""
    from elmo_jax.weights import write_atomic

    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        write_atomic(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("stop")))
    assert target.read_text() == "old"
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(os.path.lexists(dst)), replace(src, dst)))
    write_atomic(target, lambda tmp: pathlib.Path(tmp).write_text("new"))
    assert renames == [False] and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_writes_create_their_temporary_file(tmp_path):
    """write_atomic hands the writer a fresh name beside the target, which the writer creates: an existing empty
    file opened with O_TRUNC makes ext4 write all of it back when it is closed (0.25 s of a 10,000-line embed)."""
    from elmo_jax.weights import write_atomic

    seen = []

    def write(tmp):
        seen.append((tmp, os.path.exists(tmp)))
        with open(tmp, "x") as f:  # exclusive creation: fails if the name exists
            f.write("done")

    write_atomic(tmp_path / "out.txt", write)
    assert seen[0][1] is False and os.path.dirname(seen[0][0]) == str(tmp_path)
    assert (tmp_path / "out.txt").read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_writes_refuse_a_directory_before_writing(tmp_path):
    """write_atomic checks its target before calling the writer: a directory, or a file in a directory that does
    not exist, is an OSError naming the path, and the writer (a long embed) never runs."""
    from elmo_jax.weights import write_atomic

    calls = []
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError, match="d: is a directory"):
        write_atomic(tmp_path / "d", calls.append)
    with pytest.raises(OSError, match="directory .*missing does not exist"):
        write_atomic(tmp_path / "missing" / "out.txt", calls.append)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_writes_name_the_target_of_a_write_that_failed_for_want_of_room(tmp_path):
    """A full disk in the writer is an OSError naming the target and the reason, even where closing the failed
    file raised another error over it (h5py's RuntimeError, its errno only in the message), and nothing is left;
    other errors pass unchanged."""
    import errno

    from elmo_jax.weights import write_atomic

    def full(tmp):
        open(tmp, "w").close()
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            raise RuntimeError("Disable slist on flush dest failure failed (file write failed: ..., errno = 28, ...)")

    def h5py_alone(tmp):
        raise RuntimeError("Can't write data (file write failed: time = ..., errno = 122, error message = ...)")

    for writer, reason in ((full, os.strerror(errno.ENOSPC)), (h5py_alone, os.strerror(errno.EDQUOT))):
        with pytest.raises(OSError) as info:
            write_atomic(tmp_path / "out.hdf5", writer)
        assert str(info.value) == f"{tmp_path / 'out.hdf5'}: cannot write it: {reason}"
    with pytest.raises(RuntimeError, match="a bug"):
        write_atomic(tmp_path / "out.hdf5", lambda tmp: (_ for _ in ()).throw(RuntimeError("a bug, errno = 2")))
    assert list(tmp_path.iterdir()) == []
