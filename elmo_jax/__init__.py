"""elmo_jax: ELMo (Peters et al., 2018) in JAX, numerically identical to bilm-tf / AllenNLP."""

from .bilm import BiLM, BiLMOutput, StatefulBiLM, bilm, init_params, token_embedding
from .characters import Vocabulary, batch_to_ids
from .elmo import Elmo, ElmoConfig, ElmoOutput
from .embed import Embedder
from .embed_output import EmbeddingsFileError, open_embeddings
from .lstm import LSTMState
from .modules import ElmoModule
from .options import BiLMOptions, OptionsError
from .weights import WeightsError, load_hdf5, save_hdf5

__version__ = "0.1.0"

__all__ = [
    "BiLM", "BiLMOptions", "BiLMOutput", "Elmo", "ElmoConfig", "ElmoModule", "ElmoOutput", "Embedder",
    "EmbeddingsFileError", "LSTMState", "OptionsError", "StatefulBiLM", "Vocabulary", "WeightsError", "batch_to_ids",
    "bilm", "init_params", "load_hdf5", "open_embeddings", "save_hdf5", "token_embedding",
]
