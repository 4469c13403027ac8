"""elmo_jax: ELMo (Peters et al., 2018) in JAX, numerically identical to bilm-tf / AllenNLP."""

from .bilm import BiLM, BiLMOutput, StatefulBiLM, bilm, init_params, token_embedding
from .characters import Vocabulary, batch_to_ids
from .elmo import Elmo, ElmoConfig, ElmoOutput
from .embed import Embedder
from .embed_output import EmbeddingsFileError, open_embeddings
from .lstm import LSTMState
from .options import BiLMOptions, OptionsError
from .weights import WeightsError, load_hdf5, save_hdf5

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ElmoModule`` is imported on first use: Flax NNX takes ~0.6 s to import, which the CLI does not need."""
    if name == "ElmoModule":
        from .modules import ElmoModule

        return ElmoModule
    raise AttributeError(f"module 'elmo_jax' has no attribute {name!r}")

__all__ = [
    "BiLM", "BiLMOptions", "BiLMOutput", "Elmo", "ElmoConfig", "ElmoModule", "ElmoOutput", "Embedder",
    "EmbeddingsFileError", "LSTMState", "OptionsError", "StatefulBiLM", "Vocabulary", "WeightsError", "batch_to_ids",
    "bilm", "init_params", "load_hdf5", "open_embeddings", "save_hdf5", "token_embedding",
]
