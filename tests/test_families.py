"""Every family loads through BiLM.from_pretrained, with parity to its own original.

ELMoForManyLangs: ``tests/fixtures/efml_tiny`` is a random-weight tiny model written by the original
package's own code, with the original's outputs on sentences in several scripts (see its make_fixture.sh),
so the golden test runs without torch. NLPL: archives are built here from the bilm-tf fixture.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

import elmo_jax
from elmo_jax import BiLM, Elmo, Embedder
from elmo_jax.cli import main
from elmo_jax.families import detect_family
from elmo_jax.options import BiLMOptions
from elmo_jax.weights import WeightsError

EFML = pathlib.Path(__file__).resolve().parent / "fixtures" / "efml_tiny"
TOLERANCE = 1e-5


def efml_sentences() -> list[list[str]]:
    return [line.split() for line in (EFML / "sentences.txt").read_text(encoding="utf-8").splitlines()]


def efml_reference() -> list[np.ndarray]:
    with h5py.File(EFML / "outputs.hdf5", "r") as f:
        return [f[str(i)][...] for i in range(len(efml_sentences()))]


@pytest.fixture(scope="module")
def efml_model() -> BiLM:
    return BiLM.from_pretrained(EFML / "model")


def test_efml_fixture_covers_the_hard_cases(efml_model):
    """Several scripts, unknown words and characters, tokens over the 48-character cut, a non-BMP character."""
    tokens = [t for s in efml_sentences() for t in s]
    chars, words = efml_model.characters.chars, efml_model.characters.words
    assert len({c for t in tokens for c in t if ord(c) > 0x2000}) > 10  # CJK, Arabic, Devanagari, kana, emoji
    assert any(c not in chars for t in tokens for c in t) and any(t not in words for t in tokens)
    assert any(len(t) > 48 for t in tokens) and any(ord(c) > 0xFFFF for t in tokens for c in t)


def test_efml_all_layers_match_the_original_in_one_padded_batch(efml_model):
    assert efml_model.family == "elmoformanylangs"
    sentences, reference = efml_sentences(), efml_reference()
    out, _ = efml_model(efml_model.batch_to_ids(sentences))
    activations = np.asarray(out.activations)
    for i, (sentence, want) in enumerate(zip(sentences, reference)):
        got = activations[:, i, 1 : len(sentence) + 1]
        assert got.shape == want.shape == (3, len(sentence), 32)
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0, err_msg=f"sentence {i}: {sentence}")


def test_efml_embedder_matches_the_original(efml_model):
    reference = efml_reference()
    embedder = Embedder(model=efml_model, batch_size=4, block_steps=8)  # several sentences per lane
    for i, got in enumerate(embedder.embed_sentences(efml_sentences())):
        np.testing.assert_allclose(got, reference[i], atol=TOLERANCE, rtol=0)


def test_efml_embedder_takes_the_model_directory_and_sents2elmo_layers():
    """ELMoForManyLangs' own call, ``Embedder(model_dir).sents2elmo(sents, output_layer)``."""
    sentences, reference = efml_sentences()[:6], efml_reference()[:6]
    embedder = Embedder(str(EFML / "model"))
    for layer in (-2, -1, 0, 1, 2):  # 0, 1, 2: the token mode, a one-hot mix, the top mode
        outputs = embedder.sents2elmo(sentences, output_layer=layer)
        for got, want in zip(outputs, reference):
            want = {-2: want, -1: want.mean(axis=0)}.get(layer, want[layer] if layer >= 0 else None)
            np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="output_layer"):
        embedder.sents2elmo(sentences, output_layer=3)


def test_efml_elmo_and_module_take_the_models_own_ids(efml_model):
    from flax import nnx

    sentences = efml_sentences()[:5]
    elmo = Elmo.from_pretrained(EFML / "model", 1, dropout=0.0)
    module = elmo_jax.ElmoModule.from_pretrained(EFML / "model")
    ids = elmo.batch_to_ids(sentences)
    assert ids.shape[-1] == efml_model.options.token_id_width == 51
    np.testing.assert_array_equal(ids, module.batch_to_ids(sentences))
    want = np.asarray(elmo(ids).representations[0])
    got = np.asarray(nnx.jit(lambda m, x: m(x).representations[0])(module, ids))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    mean = np.stack([r.mean(axis=0) for r in efml_reference()[:5]][:1])  # equal mix weights = layer average
    np.testing.assert_allclose(want[0, : len(sentences[0])], mean[0], atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="batch_to_ids"):
        elmo(elmo_jax.batch_to_ids(sentences))  # bilm-tf's byte ids do not fit this model


def test_efml_token_ids_follow_the_original(efml_model):
    characters = efml_model.characters
    chars, words = characters.chars, characters.words
    ids = characters.token_ids("cat")
    # position 0 holds <eow>'s id and the one after the last char <bow>'s (the package's swap), all +1
    assert ids[0] == chars["<eow>"] + 1 and ids[4] == chars["<bow>"] + 1 and ids[5] == chars["<pad>"] + 1
    assert list(ids[1:4]) == [chars[c] + 1 for c in "cat"] and ids[-1] == words["cat"] + 1
    unknown = characters.token_ids("ж€q")
    assert unknown[2] == chars["<oov>"] + 1 and unknown[-1] == words["<oov>"] + 1
    long = "ab" * 40
    np.testing.assert_array_equal(characters.token_ids(long), characters.token_ids(long[:48]))
    many = ["cat", "ж€q", long, *characters.boundary_tokens]
    np.testing.assert_array_equal(characters.tokens_ids(many), np.stack([characters.token_ids(t) for t in many]))
    assert characters.tokens_ids([]).shape == (0, characters.width)
    assert characters.token_ids(long)[49] == chars["<bow>"] + 1
    np.testing.assert_array_equal(characters.token_ids("<bos>"), efml_model.options.tokens.bos_ids)
    assert characters.token_ids("<S>")[1] == chars["<"] + 1  # bilm-tf's boundary is an ordinary token here
    assert characters.token_ids("😀")[2] == chars["<bow>"] + 1  # one code point, not 4 bytes


def test_efml_checkpoint_round_trip_through_convert(efml_model, tmp_path, capsys):
    assert main(["convert", "--model", str(EFML / "model"), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    loaded = BiLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.family == "elmoformanylangs" and loaded.options == efml_model.options
    ids = efml_model.batch_to_ids(efml_sentences())
    np.testing.assert_array_equal(loaded.batch_to_ids(efml_sentences()), ids)
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0].activations), np.asarray(efml_model(ids)[0].activations))
    assert main(["convert", "--model", str(EFML / "model"), "--to", "hdf5", "--options", str(tmp_path / "o.json"),
                 "--weights", str(tmp_path / "w.hdf5")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the bilm-tf HDF5 layout" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.hdf5").exists()


def test_efml_options_round_trip():
    options = BiLM.from_pretrained(EFML / "model").options
    assert BiLMOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    raw = options.to_dict()
    raw["tokens"]["bos_ids"] = raw["tokens"]["bos_ids"][:-1]
    with pytest.raises(elmo_jax.OptionsError, match="tokens.bos_ids"):
        BiLMOptions.from_dict(raw)


def test_efml_cli_embed_with_model(tmp_path):
    lines = (EFML / "sentences.txt").read_text(encoding="utf-8").splitlines()[:4]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), "--model", str(EFML / "model"),
                 "--quiet"]) == 0
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        for i, want in enumerate(efml_reference()[:4]):
            np.testing.assert_allclose(f[str(i)][...], want, atol=TOLERANCE, rtol=0)


def _copy_model(tmp_path) -> pathlib.Path:
    target = tmp_path / "model"
    shutil.copytree(EFML / "model", target)
    return target


def test_efml_bad_files_are_one_line_errors(tmp_path):
    model = _copy_model(tmp_path)
    (model / "char.dic").write_text("a\t0\nb c d\n", encoding="utf-8")
    with pytest.raises(WeightsError, match=r"char.dic: line 2 must be 'entry<TAB>id'"):
        BiLM.from_pretrained(model)
    shutil.copy(EFML / "model" / "char.dic", model / "char.dic")
    with open(model / "word.dic", "a", encoding="utf-8") as f:
        f.write("extra\t100\n")
    with pytest.raises(WeightsError, match=r"word.dic: 101 entries .* do not match the 100 embedding rows"):
        BiLM.from_pretrained(model)
    shutil.copy(EFML / "model" / "word.dic", model / "word.dic")
    os.unlink(model / "cnn_tiny.json")
    with pytest.raises(WeightsError, match=r"config_path '/home/trainer/elmo/configs/cnn_tiny.json' is found neither"):
        BiLM.from_pretrained(model)
    shutil.copy(EFML / "model" / "cnn_tiny.json", model / "cnn_tiny.json")
    data = (model / "encoder.pkl").read_bytes()
    (model / "encoder.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="encoder.pkl"):
        BiLM.from_pretrained(model)


def test_efml_malicious_pickle_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = _copy_model(tmp_path)
    (model / "token_embedder.pkl").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(ValueError, match="token_embedder.pkl"):
        BiLM.from_pretrained(model)
    assert not marker.exists()


def test_unknown_paths_name_what_they_found(tmp_path):
    with pytest.raises(WeightsError, match="no model here"):
        BiLM.from_pretrained(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match=r"not a model directory of a known family: it holds notes.txt"):
        BiLM.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="not a .zip archive"):
        BiLM.from_pretrained(tmp_path / "notes.txt")
    assert main(["embed", str(tmp_path / "notes.txt"), str(tmp_path / "o.hdf5"), "--model", str(tmp_path)]) == 2


def _nlpl_files(elmo_tiny, directory: pathlib.Path, n_characters: int) -> pathlib.Path:
    """An NLPL-style model: model.hdf5, options.json (n_characters as given), vocab.txt, meta.json."""
    directory.mkdir()
    options = json.loads((elmo_tiny / "options.json").read_text())
    options["char_cnn"]["n_characters"] = n_characters
    (directory / "options.json").write_text(json.dumps(options))
    shutil.copy(elmo_tiny / "lm_weights.hdf5", directory / "model.hdf5")
    (directory / "vocab.txt").write_text("<S>\n</S>\n<UNK>\nthe\n")
    (directory / "meta.json").write_text(json.dumps({"id": 0, "description": "test archive, not a real model"}))
    return directory


def test_nlpl_archive_directory_and_fixed_pair_agree(elmo_tiny, tmp_path):
    unpacked = _nlpl_files(elmo_tiny, tmp_path / "unpacked", 261)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in unpacked.iterdir():
            z.write(path, path.name)
    fixed = _nlpl_files(elmo_tiny, tmp_path / "fixed", 262)
    sentences = json.loads((elmo_tiny / "sentences.json").read_text())[0][:4]
    sentences = [s.split() for s in sentences]
    ids = elmo_jax.batch_to_ids(sentences)
    pair = BiLM.from_hdf5(fixed / "options.json", fixed / "model.hdf5")
    want = np.asarray(pair(ids)[0].activations)
    for path, family in ((archive, "nlpl"), (unpacked, "nlpl"), (fixed, "nlpl")):
        assert detect_family(path) == family
        model = BiLM.from_pretrained(path)
        assert model.family == family
        np.testing.assert_allclose(np.asarray(model(ids)[0].activations), want, atol=TOLERANCE, rtol=0)
    os.unlink(fixed / "meta.json")
    assert BiLM.from_pretrained(fixed).family == "bilm-tf"


def test_nlpl_bad_archives(elmo_tiny, tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "nothing")
    with pytest.raises(WeightsError, match="an archive of no known model"):
        BiLM.from_pretrained(archive)
    unpacked = _nlpl_files(elmo_tiny, tmp_path / "unpacked", 261)
    options = json.loads((unpacked / "options.json").read_text())
    options["lstm"]["dim"] = 32
    (unpacked / "options.json").write_text(json.dumps(options))
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as z:
        for path in unpacked.iterdir():
            z.write(path, f"norwegian/{path.name}")  # one folder inside, as some archives have
    with pytest.raises(WeightsError, match=r"m.zip:norwegian/model.hdf5: dataset .* has shape"):
        BiLM.from_pretrained(tmp_path / "m.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes((tmp_path / "m.zip").read_bytes()[:300])
    with pytest.raises(WeightsError, match="truncated.zip"):
        BiLM.from_pretrained(truncated)


@pytest.mark.skipif(not os.path.exists("/tmp/elmo-bench-venv/bin/python"), reason="AllenNLP peer venv absent "
                    "(bash ../shared/bench/setup.sh makes it)")
def test_nlpl_archive_matches_allennlp_on_the_fixed_pair(elmo_tiny, bench_dir, tmp_path):
    """Optional: the original AllenNLP, run for real, on the pair with n_characters fixed to 262."""
    unpacked = _nlpl_files(elmo_tiny, tmp_path / "unpacked", 261)
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as z:
        for path in unpacked.iterdir():
            z.write(path, path.name)
    fixed = _nlpl_files(elmo_tiny, tmp_path / "fixed", 262)
    sentences = [s for group in json.loads((elmo_tiny / "sentences.json").read_text()) for s in group][:12]
    (tmp_path / "s.txt").write_text("\n".join(sentences) + "\n")
    subprocess.run(["/tmp/elmo-bench-venv/bin/python", str(bench_dir / "ref_allennlp.py"), "--options",
                    str(fixed / "options.json"), "--weights", str(fixed / "model.hdf5"), "--sentences",
                    str(tmp_path / "s.txt"), "--batch-size", "4", "--out", str(tmp_path / "ref.hdf5")],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    model = BiLM.from_pretrained(tmp_path / "model.zip")
    embedder = Embedder(model=model)
    with h5py.File(tmp_path / "ref.hdf5", "r") as ref:
        for i, got in enumerate(embedder.embed_sentences([s.split() for s in sentences])):
            np.testing.assert_allclose(got, ref[str(i)][...], atol=TOLERANCE, rtol=0)


def test_reference_harness_python_is_not_needed():
    assert "torch" not in sys.modules  # loading ELMoForManyLangs' pickles never imports torch
