import h5py
import numpy as np
import pytest

from elmo_jax.cli import main


def test_convert_round_trip(elmo_tiny, tmp_path, capsys):
    assert main(["convert", "--options", str(elmo_tiny / "options.json"), "--weights",
                 str(elmo_tiny / "lm_weights.hdf5"), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "--to", "hdf5", "--checkpoint", str(tmp_path / "ckpt"), "--weights",
                 str(tmp_path / "back.hdf5"), "--options", str(tmp_path / "back.json")]) == 0
    with h5py.File(elmo_tiny / "lm_weights.hdf5", "r") as a, h5py.File(tmp_path / "back.hdf5", "r") as b:
        assert np.array_equal(a["RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_0"][...],
                              b["RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_0"][...])


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code = main(["convert", "--options", str(tmp_path / "none.json"), "--weights", "w.hdf5",
                 "--checkpoint", str(tmp_path / "c")])
    assert code == 2
    err = capsys.readouterr().err
    assert "none.json: options file not found" in err and "Traceback" not in err


def test_the_embed_command_sets_glibc_mmap_threshold(monkeypatch):
    """``elmo-jax embed`` fixes glibc's mmap threshold (large blocks go back to the system when freed): the set
    call succeeds on glibc and is reported as not set elsewhere; run_embed makes it before any work."""
    import platform

    from elmo_jax import embed_cli

    assert embed_cli.serve_large_allocations_by_mmap() is (platform.libc_ver()[0] == "glibc")
    called = []
    monkeypatch.setattr(embed_cli, "serve_large_allocations_by_mmap", lambda: called.append(True))
    monkeypatch.setattr(embed_cli, "enable_compilation_cache", lambda: (_ for _ in ()).throw(RuntimeError("stop")))
    args = type("Args", (), {"options": None, "weights": None, "model": None, "layout": "allennlp",
                             "output_dtype": "float32", "tokenizer": "whitespace"})()
    with pytest.raises(RuntimeError, match="stop"):
        embed_cli.run_embed(args)
    assert called == [True]
