import h5py
import numpy as np

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
