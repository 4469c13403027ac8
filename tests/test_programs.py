"""Programs kept across processes (elmo_jax.programs): a later Embedder with the same code, model options and devices
loads each program's trace instead of tracing it, with the same numbers; anything else traces anew."""

import dataclasses

import jax
import numpy as np
import pytest

from elmo_jax import embed, embed_cli
from elmo_jax.bilm import BiLM
from elmo_jax.cli import main
from elmo_jax.embed import Embedder
from elmo_jax.programs import Program
from tests import reference

WORDS = "the bank raised its interest rates . I went to river and deposited money".split()
SENTENCES = [list(np.random.default_rng(k).choice(WORDS, size=n)) for k, n in enumerate([3, 9, 1, 14, 6, 22, 5])]


def _embed(model, directory, mode="all", devices=None):
    embedder = Embedder(model=model, batch_size=4, block_steps=6, program_cache=directory, devices=devices)
    return embedder, list(embedder.embed_sentences(SENTENCES, mode=mode))


def _loaded(embedder) -> int:
    return sum(p.loaded for p in (embedder._insert, embedder._block, embedder._gather))


def _untraceable(monkeypatch):
    """Tracing any of the Embedder's programs fails from now on."""
    def traced(*args, **kwargs):
        raise AssertionError("a kept program was traced again")

    for name in ("insert_tokens", "write_block", "gather_tokens"):
        monkeypatch.setattr(embed, name, traced)


@pytest.mark.parametrize("mode", ["all", "top"])
def test_kept_programs_load_without_tracing_and_give_the_same_numbers(tiny_model, tmp_path, monkeypatch, mode):
    plain = _embed(tiny_model, None, mode)[1]
    first, kept = _embed(tiny_model, tmp_path, mode)
    assert _loaded(first) == 0 and first.compilations >= 3  # inserts, blocks, gathers
    assert len(list(tmp_path.glob("*.jaxexport"))) == first.compilations
    _untraceable(monkeypatch)
    second, loaded = _embed(tiny_model, tmp_path, mode)
    assert _loaded(second) == second.compilations == first.compilations
    for a, b, c in zip(plain, kept, loaded, strict=True):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)


def test_a_corrupt_kept_program_is_traced_again_and_replaced(tiny_model, tmp_path, monkeypatch):
    first, want = _embed(tiny_model, tmp_path)
    for path in tmp_path.glob("*.jaxexport"):
        path.write_bytes(b"not a program")
    second, got = _embed(tiny_model, tmp_path)
    assert _loaded(second) == 0
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(b, a)
    _untraceable(monkeypatch)  # replaced by whole ones
    third = _embed(tiny_model, tmp_path)[0]
    assert _loaded(third) == third.compilations == first.compilations


@pytest.mark.parametrize("change", ["options", "devices"])
def test_other_options_or_devices_trace_anew(tiny_model, tmp_path, change):
    """The same shapes, but a cell clip that binds (traced into the program) or one device instead of the test's 4:
    nothing kept for the first model is loaded, and the numbers are the other model's own."""
    _embed(tiny_model, tmp_path)
    model, devices = tiny_model, None
    if change == "options":
        lstm = dataclasses.replace(tiny_model.options.lstm, cell_clip=0.05)
        model = BiLM(tiny_model.params, dataclasses.replace(tiny_model.options, lstm=lstm))
    else:
        devices = jax.devices()[:1]
    embedder, got = _embed(model, tmp_path, devices=devices)
    assert _loaded(embedder) == 0
    for sentence, vectors in zip(SENTENCES, got, strict=True):
        want = reference.bilm_sentence(model.params, model.options, sentence)[:, 1:-1]
        np.testing.assert_allclose(vectors, want, atol=1e-5)


def test_program_counts_and_keeps_signatures(tmp_path):
    """A new shape or static argument is a new program, counted once; a donated argument stays donated when
    loaded."""
    made = []
    add = Program(lambda a, b, *, scale: (a + 1, b * scale), name="add", static_argnames=("scale",),
                  donate_argnums=(0,), directory=str(tmp_path), salt="test", on_new=lambda: made.append(1))
    for shape, scale in [(3,), 2.0], [(3,), 2.0], [(4,), 2.0], [(3,), 3.0]:
        out = add(jax.numpy.zeros(shape), np.ones(shape, np.float32), scale=scale)
        np.testing.assert_array_equal(out[1], np.full(shape, scale))
    assert add.signatures == len(made) == 3 and add.loaded == 0
    again = Program(lambda a, b, *, scale: (a - 1, b), name="add", static_argnames=("scale",), donate_argnums=(0,),
                    directory=str(tmp_path), salt="test")  # the kept trace, not this function, runs
    donated = jax.numpy.zeros(3)
    out = again(donated, np.ones(3, np.float32), scale=2.0)
    assert again.loaded == 1 and donated.is_deleted()
    np.testing.assert_array_equal(out[0], np.ones(3))


def test_the_cli_keeps_programs_beside_its_compilation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMO_JAX_COMPILATION_CACHE", "")
    assert embed_cli.enable_compilation_cache() is None  # off
    programs = tmp_path / "programs"
    monkeypatch.setattr(embed_cli, "enable_compilation_cache", lambda: str(programs))
    source = tmp_path / "in.txt"
    source.write_text("\n".join(" ".join(s) for s in SENTENCES) + "\n")
    assert main(["embed", str(source), str(tmp_path / "a.hdf5"), "--quiet"]) == 0
    assert list(programs.glob("*.jaxexport"))
    _untraceable(monkeypatch)
    assert main(["embed", str(source), str(tmp_path / "b.hdf5"), "--quiet"]) == 0
    import h5py

    with h5py.File(tmp_path / "a.hdf5") as a, h5py.File(tmp_path / "b.hdf5") as b:
        assert sorted(a) == sorted(b)
        for key in a:
            if key != "sentence_to_index":
                np.testing.assert_array_equal(b[key][()], a[key][()])
