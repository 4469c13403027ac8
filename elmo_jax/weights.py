"""Weight files: the published HDF5 layout (bilm-tf / AllenNLP) <-> params pytree, and orbax checkpoints.

``hdf5_layout(options)`` is the one table that maps params to HDF5 datasets. Loading checks every
dataset name and shape against the options in both directions and names the offenders; writing goes
to a temporary file that is renamed when complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .options import BiLMOptions


class WeightsError(ValueError):
    """A weight file is missing, unreadable, or does not match the options."""


class Dataset(NamedTuple):
    """One HDF5 dataset: where it goes in the params tree and its shape in the file."""

    path: tuple  # keys into the params tree, e.g. ("lstm", "forward", 0, "kernel")
    name: str  # HDF5 dataset name
    file_shape: tuple[int, ...]


def hdf5_layout(options: BiLMOptions) -> list[Dataset]:
    """Every dataset of a bilm-tf weight file for these options, in file order."""
    cnn, lstm = options.char_cnn, options.lstm
    n_filters, proj, dim, char_dim = cnn.n_filters, lstm.projection_dim, lstm.dim, cnn.char_embedding_dim
    # The file's char_embed has no padding row: 261 rows for both n_characters 261 and 262.
    layout = [Dataset(("char_embed",), "char_embed", (261, char_dim))]
    for i, (width, num) in enumerate(cnn.filters):
        layout.append(Dataset(("convolutions", i, "kernel"), f"CNN/W_cnn_{i}", (1, width, char_dim, num)))
        layout.append(Dataset(("convolutions", i, "bias"), f"CNN/b_cnn_{i}", (num,)))
    for k in range(cnn.n_highway):
        for part in ("carry", "transform"):
            layout.append(Dataset(("highway", k, part, "kernel"), f"CNN_high_{k}/W_{part}", (n_filters, n_filters)))
            layout.append(Dataset(("highway", k, part, "bias"), f"CNN_high_{k}/b_{part}", (n_filters,)))
    layout.append(Dataset(("projection", "kernel"), "CNN_proj/W_proj", (n_filters, proj)))
    layout.append(Dataset(("projection", "bias"), "CNN_proj/b_proj", (proj,)))
    for d, direction in enumerate(("forward", "backward")):
        for layer in range(lstm.n_layers):
            cell = f"RNN_{d}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            layout.append(Dataset(("lstm", direction, layer, "kernel"), f"{cell}/W_0", (proj + proj, 4 * dim)))
            layout.append(Dataset(("lstm", direction, layer, "bias"), f"{cell}/B", (4 * dim,)))
            layout.append(Dataset(("lstm", direction, layer, "projection"), f"{cell}/W_P_0", (dim, proj)))
    return layout


def _file_to_param(name: str, value: np.ndarray) -> np.ndarray:
    if name == "char_embed":  # prepend the zero row of padding id 0
        return np.concatenate([np.zeros((1, value.shape[1]), value.dtype), value])
    if name.startswith("CNN/W_cnn_"):  # (1, width, char_dim, n) -> (width, char_dim, n)
        return value[0]
    return value


def _param_to_file(name: str, value: np.ndarray) -> np.ndarray:
    if name == "char_embed":
        return value[1:]
    if name.startswith("CNN/W_cnn_"):
        return value[None]
    return value


def _set(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for key, next_key in zip(path[:-1], path[1:]):
        default = [] if isinstance(next_key, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = default
        else:
            node.setdefault(key, default)
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_hdf5(path: str | os.PathLike, options: BiLMOptions, strict: bool = True) -> dict:
    """Read a bilm-tf / AllenNLP weight file into a params pytree of float32 numpy arrays.

    Raises WeightsError naming the file and dataset for a missing file, an unreadable/corrupt file, a
    missing dataset, a wrong shape, a non-finite value, or (``strict``) datasets the options do not describe.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: weight file not found")
    layout = hdf5_layout(options)
    params: dict = {}
    try:
        with h5py.File(path, "r") as f:
            found = _dataset_names(f)
            expected = {d.name for d in layout}
            missing = [d.name for d in layout if d.name not in found]
            if missing:
                raise WeightsError(
                    f"{path}: missing datasets {missing[:8]}{' ...' if len(missing) > 8 else ''}; the options "
                    f"({_describe(options)}) expect {len(expected)} datasets and the file has {len(found)}")
            extra = sorted(found - expected)
            if strict and extra:
                raise WeightsError(f"{path}: datasets {extra[:8]} are not described by the options "
                                   f"({_describe(options)}); do the options belong to this file?")
            for d in layout:
                shape = tuple(f[d.name].shape)
                if shape != d.file_shape:
                    raise WeightsError(f"{path}: dataset '{d.name}' has shape {shape}, the options "
                                       f"({_describe(options)}) expect {d.file_shape}")
                try:
                    value = np.asarray(f[d.name][...], dtype=np.float32)
                except (OSError, RuntimeError, KeyError) as error:
                    raise WeightsError(f"{path}: dataset '{d.name}' cannot be read; the file is corrupt or "
                                       f"truncated ({error})") from None
                if not np.all(np.isfinite(value)):
                    raise WeightsError(f"{path}: dataset '{d.name}' holds NaN or infinite values")
                _set(params, d.path, _file_to_param(d.name, value))
    except WeightsError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable HDF5 weight file; it is corrupt, truncated or of another "
                           f"format ({error})") from None
    return params


def _dataset_names(f) -> set[str]:
    import h5py

    names: set[str] = set()
    f.visititems(lambda name, obj: names.add(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _describe(options: BiLMOptions) -> str:
    cnn, lstm = options.char_cnn, options.lstm
    return (f"lstm dim={lstm.dim}, projection_dim={lstm.projection_dim}, n_layers={lstm.n_layers}; char_cnn "
            f"filters={len(cnn.filters)} ({cnn.n_filters} total), n_highway={cnn.n_highway}, embedding dim="
            f"{cnn.char_embedding_dim}")


def check_params(params: dict, options: BiLMOptions) -> None:
    """Raise WeightsError unless params has exactly the arrays of ``init_params(options)`` with their shapes."""
    import jax

    from .bilm import init_params

    want = jax.eval_shape(lambda: init_params(options, jax.random.key(0)))
    for path, spec in jax.tree_util.tree_flatten_with_path(want)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        name = "/".join(map(str, keys))
        try:
            value = _get(params, keys)
        except (KeyError, IndexError, TypeError):
            raise WeightsError(f"params lack {name}") from None
        if tuple(np.shape(value)) != spec.shape:
            raise WeightsError(f"params {name} has shape {tuple(np.shape(value))}, expected {spec.shape}")


def check_output_path(path: str | os.PathLike, inputs: Sequence = ()) -> str:
    """The directory of ``path``, a file about to be written; raises OSError naming ``path`` if that directory does
    not exist, ``path`` is a directory, or it is one of the files ``inputs`` (paths; None, "-" and open files are
    passed over), which the rename would replace. Called before any work, so a long run does not fail at its
    rename, nor lose its input."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"{path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise OSError(f"{path}: is a directory, expected the name of a file to write")
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and source != "-" and os.path.exists(path) \
                and os.path.exists(source) and os.path.samefile(path, source):
            raise OSError(f"{path}: is also the input {os.fspath(source)}, which writing it would replace; "
                          f"give the output another name")
    return directory


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside ``path``, then rename it to ``path``.

    An error or interruption in ``write`` leaves ``path`` as it was (and removes the temporary file); a file
    already at ``path`` is removed just before the rename.
    """
    path = os.fspath(path)
    directory = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    except OSError as error:
        raise OSError(f"{path}: cannot create a file in {directory}: {error.strerror or error}") from None
    os.close(fd)
    # write() creates the file anew: opening this empty file with O_TRUNC (h5py's "w", open(..., "w")) would make
    # ext4 (auto_da_alloc) write back all of it when it is closed, 0.25 s for 500 MB with the caller waiting
    os.unlink(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        # renamed over an existing file, the new one has ext4 (auto_da_alloc) allocate and start writing back all
        # its blocks before the rename returns: 0.27 s for the 551 MB of 10,000 lines, 0.02 s with no file there
        if os.path.lexists(path):
            os.unlink(path)
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = _write_failure(error)
        if reason is not None:
            # the writer's objects stay alive (in the error's frames): HDF5, which could not close a file it could
            # not extend (a file-size limit), crashes when they are freed (SIGSEGV after the error, packed layout)
            _FAILED_WRITES.append(error)
            raise OSError(f"{path}: cannot write it: {reason}") from error
        raise


_FAILED_WRITES: list[BaseException] = []


# a write that failed for want of room or rights (h5py reports them only in its messages: "errno = 28")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _write_failure(error: BaseException | None) -> str | None:
    """The reason (e.g. "No space left on device") if ``error``, or an error it was raised while handling (h5py's
    close of a file whose write failed raises a RuntimeError of its own), is a failed write; else None."""
    while error is not None:
        code = error.errno if isinstance(error, OSError) else None
        if code is None and isinstance(error, (OSError, RuntimeError)):
            found = re.search(r"errno = (\d+)", str(error))
            code = int(found.group(1)) if found else None
        if code in _WRITE_ERRNOS:
            return os.strerror(code)
        error = error.__context__
    return None


def save_hdf5(params: dict, options: BiLMOptions, path: str | os.PathLike) -> None:
    """Write params in the original bilm-tf layout (loadable by AllenNLP, bilm-tf and ``load_hdf5``)."""
    import h5py

    if options.tokens.bos_ids:
        raise WeightsError(f"{os.fspath(path)}: this model (its own char dictionary"
                           f"{' and a word embedding' if options.tokens.has_words else ''}, as ELMoForManyLangs "
                           f"models have) does not fit the bilm-tf HDF5 layout; keep it as a checkpoint")
    check_params(params, options)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            for d in hdf5_layout(options):
                value = _param_to_file(d.name, np.asarray(_get(params, d.path), dtype=np.float32))
                f.create_dataset(d.name, data=value)

    write_atomic(path, write)


def save_options(options: BiLMOptions, path: str | os.PathLike, include_training: bool = False,
                 extra: dict | None = None) -> None:
    """Write options.json (bilm-tf layout, plus the ``extra`` top-level fields), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**options.to_dict(include_training=include_training), **(extra or {})}, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def save_checkpoint(directory: str | os.PathLike, params: dict, options: BiLMOptions, characters=None,
                    family: str = "bilm-tf") -> None:
    """Save params as an orbax checkpoint at ``directory/params`` with ``directory/options.json``.

    characters: the model's token-to-id mapping (``BiLM.characters``), which writes its dictionaries beside
    (bilm-tf's bytes write nothing; None: the same); family: the model family it came from, kept in options.json."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    check_params(params, options)
    os.makedirs(directory, exist_ok=True)
    if characters is not None:
        characters.save(directory)
    save_options(options, os.path.join(directory, "options.json"), include_training=True,
                 extra={"family": family} if family != "bilm-tf" else None)
    checkpointer = ocp.StandardCheckpointer()
    # orbax writes to a temporary directory and renames it when complete.
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()


def checkpoint_characters(directory: str | os.PathLike, options: BiLMOptions):
    """The token-to-id mapping and family of a ``save_checkpoint`` directory: (characters or None, family)."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, "options.json")
    try:
        with open(path, encoding="utf-8") as f:
            family = json.load(f).get("family", "bilm-tf")
    except (OSError, ValueError, AttributeError) as error:
        raise WeightsError(f"{path}: not a readable options file ({error})") from None
    if not options.tokens.bos_ids:
        return None, family
    from .efml import DictionaryCharacters

    return DictionaryCharacters.from_directory(directory, options), family


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict, BiLMOptions]:
    """Inverse of ``save_checkpoint``: (params, options); ``checkpoint_characters`` reads the rest."""
    import jax
    import orbax.checkpoint as ocp

    from .bilm import init_params

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(os.path.join(directory, "params")):
        raise WeightsError(f"{directory}: no orbax checkpoint here (expected {directory}/params and options.json)")
    options = BiLMOptions.from_path(os.path.join(directory, "options.json"))
    target = jax.eval_shape(lambda: init_params(options, jax.random.key(0)))
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
    except Exception as error:  # orbax raises many types for a damaged or mismatched checkpoint
        raise WeightsError(f"{directory}/params: cannot restore the checkpoint for these options ({error})") from None
    return params, options
