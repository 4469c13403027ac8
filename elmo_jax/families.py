"""Every published ELMo behind one call: which family a path holds, and loading it as a ``BiLM``.

- ``bilm-tf``: bilm-tf / AllenNLP models, a directory with ``options.json`` and one ``.hdf5``.
- ``nlpl``: the NLPL repository's bilm-tf models, a ``.zip`` with ``model.hdf5``, ``options.json`` (often
  ``n_characters: 261``), ``vocab.txt`` and ``meta.json``, or the directory it unpacks to.
- ``elmoformanylangs``: HIT-SCIR's ELMoForManyLangs (44 languages; also in NLPL archives): ``config.json``,
  ``char.dic``, ``word.dic``, ``token_embedder.pkl``, ``encoder.pkl``.

A checkpoint of ``elmo-jax convert`` (``options.json`` and ``params/``) loads too, with the family it was
converted from. Files are read only here, at the edge; what differs between families is turned into
params, options and the model's ``characters`` (token -> ids) at load time.
"""

from __future__ import annotations

import os
import tempfile
import zipfile

from .options import OptionsError
from .weights import WeightsError

FAMILIES = ("bilm-tf", "nlpl", "elmoformanylangs")
WEIGHT_SUFFIXES = (".hdf5", ".h5")


def detect_family(path: str | os.PathLike) -> str:
    """The family of the model at ``path`` (one of ``FAMILIES``, or "checkpoint" for elmo_jax's own).

    WeightsError naming the path and what it holds when it is none of them."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no model here (a model directory, an NLPL .zip or a checkpoint was expected)")
    if os.path.isfile(path):
        if zipfile.is_zipfile(path):
            return "nlpl"
        raise WeightsError(f"{path}: a file that is not a .zip archive; give the model's directory, an NLPL .zip, "
                           f"or --options/--weights for an options.json + .hdf5 pair")
    from .efml import MODEL_FILES, is_model_directory

    names = set(os.listdir(path))
    if is_model_directory(path):
        return "elmoformanylangs"
    if "options.json" in names and os.path.isdir(os.path.join(path, "params")):
        return "checkpoint"
    weights = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
    if "options.json" in names and weights:
        return "nlpl" if "model.hdf5" in names and "meta.json" in names else "bilm-tf"
    listing = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "") or "nothing"
    raise WeightsError(f"{path}: not a model directory of a known family: it holds {listing}; expected "
                       f"options.json + a .hdf5 weight file (bilm-tf, NLPL), {' + '.join(MODEL_FILES)} + word.dic "
                       f"(ELMoForManyLangs), or options.json + params/ (elmo-jax convert)")


def weight_file(directory: str) -> str:
    """The .hdf5 weight file of a bilm-tf / NLPL directory: the only one, else weights.hdf5 or model.hdf5."""
    weights = sorted(n for n in os.listdir(directory) if n.endswith(WEIGHT_SUFFIXES))
    if len(weights) == 1:
        return os.path.join(directory, weights[0])
    for name in ("weights.hdf5", "model.hdf5"):
        if name in weights:
            return os.path.join(directory, name)
    raise WeightsError(f"{directory}: several weight files {weights} and none is weights.hdf5 or model.hdf5; "
                       f"give --options and --weights")


def load_pretrained(path: str | os.PathLike):
    """The model at ``path`` as a ``BiLM`` whose ``family`` says which family it was (see ``detect_family``)."""
    from .bilm import BiLM

    path = os.fspath(path)
    family = detect_family(path)
    if family == "nlpl" and os.path.isfile(path):
        return _load_archive(path)
    if family == "elmoformanylangs":
        from .efml import load_model_directory

        params, options, characters = load_model_directory(path)
        return BiLM(params, options, characters, family)
    if family == "checkpoint":
        return BiLM.from_checkpoint(path)
    model = BiLM.from_hdf5(os.path.join(path, "options.json"), weight_file(path))
    model.family = family
    return model


def _load_archive(path: str):
    """An NLPL .zip: its files (at the top or in one folder) are unpacked to a temporary directory and loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            folders = {os.path.dirname(m.filename) for m in members
                       if os.path.basename(m.filename) in ("options.json", "config.json")}
            if len(folders) != 1:
                names = ", ".join(sorted(m.filename for m in members)[:12])
                raise WeightsError(f"{path}: an archive of no known model: expected one options.json (bilm-tf) or "
                                   f"config.json (ELMoForManyLangs), found {names or 'nothing'}")
            folder = folders.pop()
            with tempfile.TemporaryDirectory(prefix="elmo-jax-archive-") as tmp:
                for member in members:
                    if os.path.dirname(member.filename) != folder:
                        continue
                    target = os.path.join(tmp, os.path.basename(member.filename))
                    with archive.open(member) as source, open(target, "wb") as out:
                        while chunk := source.read(1 << 24):
                            out.write(chunk)
                try:
                    model = load_pretrained(tmp)
                except (WeightsError, OptionsError) as error:
                    raise type(error)(str(error).replace(tmp, f"{path}:{folder or '.'}")) from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise WeightsError(f"{path}: not a readable .zip archive; it is corrupt or truncated ({error})") from None
    if model.family == "bilm-tf":
        model.family = "nlpl"
    return model
