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


REUSE_PROBE = """
import ctypes, resource, sys, time
from elmo_jax.embed_cli import reuse_freed_memory
if sys.argv[1] != "off":
    assert reuse_freed_memory(trim_every=None if sys.argv[1] == "on" else 0.05,
                              trim_growth=(32 if sys.argv[1] == "trimmed" else 128) << 20, warm_up=0)
    time.sleep(0.2)  # its thread has read the resident memory it compares against
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touch():
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    return block
libc.free(touch())
time.sleep(0 if sys.argv[1] in ("off", "on") else 0.5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc allocator policy")
def test_the_embed_commands_allocator_policy_reuses_freed_memory():
    """With ``reuse_freed_memory`` a freed 64 MB block is taken again without faulting its pages in anew (glibc's
    default mmaps it afresh: 16,384 page faults), but after a trim (its thread, here every 0.05 s once resident memory
    has grown by 32 MB since it started) it is handed back, and not while it has grown by less (128 MB here); each in
    a process of its own (the policy is process-wide)."""
    import subprocess
    import sys

    faults = {policy: int(subprocess.run([sys.executable, "-c", REUSE_PROBE, policy], capture_output=True, text=True,
                                         check=True).stdout)
              for policy in ("off", "on", "trimmed", "kept")}
    assert faults["off"] > 8000 and faults["on"] < 1000 and faults["trimmed"] > 8000 and faults["kept"] < 1000, faults


def test_the_embed_command_sets_its_allocator_policy_first(monkeypatch):
    """run_embed sets the allocator policy before any work (and before XLA's threads exist)."""
    from elmo_jax import embed_cli

    called = []
    monkeypatch.setattr(embed_cli, "reuse_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(embed_cli, "enable_compilation_cache", lambda: (_ for _ in ()).throw(RuntimeError("stop")))
    args = type("Args", (), {"options": None, "weights": None, "model": None, "layout": "allennlp",
                             "output_dtype": "float32", "tokenizer": "whitespace", "input": "-", "vocab": None,
                             "output": "out.hdf5"})()
    with pytest.raises(RuntimeError, match="stop"):
        embed_cli.run_embed(args)
    assert called == [True]


def test_the_command_line_parser_leaves_the_trainer_unloaded():
    """Building the ``elmo-jax`` parser (every command, embed included, starts there) registers the train
    commands without importing the trainer or optax (~70 ms); ``from elmo_jax.train import Trainer`` still works."""
    import subprocess
    import sys

    probe = ("import sys, elmo_jax.cli; elmo_jax.cli.build_parser(); "
             "print([m for m in ('optax', 'elmo_jax.train.trainer') if m in sys.modules]); "
             "from elmo_jax.train import Trainer, TrainError; print(Trainer.__name__, TrainError.__name__)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[:2] == ["[]", "Trainer TrainError"], run.stdout
