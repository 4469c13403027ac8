"""The built-in English biLM, shipped inside the package: no download, no network.

Trained by elmo_jax's own trainer on ~11M tokens of openly licensed English (see MODEL_CARD.md in the
repository for sources, licences, training and evaluation; ``scripts/train_default_model.sh`` rebuilds
it). The files are package data found with ``importlib.resources``, so they work from an installed
wheel as well as from a source checkout.

    options_file, weight_file = elmo_jax.pretrained.default_model_files()
    bilm = elmo_jax.BiLM.pretrained()            # same as BiLM.from_hdf5(*default_model_files())
"""

from __future__ import annotations

import importlib.resources
import os

OPTIONS_NAME = "options.json"
WEIGHTS_NAME = "weights.hdf5"


def default_model_files() -> tuple[str, str]:
    """Paths of the built-in model's (options.json, weights.hdf5) inside the installed package.

    Raises FileNotFoundError naming the missing file when the package was installed without its data.
    """
    root = importlib.resources.files(__name__)
    paths = []
    for name in (OPTIONS_NAME, WEIGHTS_NAME):
        path = os.fspath(root.joinpath(name))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the built-in model's {name} is missing from the installed elmo_jax "
                                    f"package (reinstall it, or pass options and weights files explicitly)")
        paths.append(path)
    return paths[0], paths[1]
