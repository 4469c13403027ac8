"""ELMo representations: scalar mixes of the biLM layers, dropout, removal of <S>/</S> (AllenNLP's ``Elmo``)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .bilm import BiLM, BiLMOutput, _check_char_ids, bilm, bilm_from_word_ids
from .options import BiLMOptions
from .scalar_mix import init_scalar_mix, scalar_mix


class ElmoOutput(NamedTuple):
    """representations: list of (batch, time, 2 * projection_dim), one per mix; mask: (batch, time) bool.

    With keep_sentence_boundaries, time includes <S> and </S>."""

    representations: list
    mask: jax.Array


@dataclasses.dataclass(frozen=True)
class ElmoConfig:
    """How biLM layers become representations (hashable: a static jit argument).

    num_output_representations: how many scalar mixes (AllenNLP's argument of that name); dropout: rate on
    each representation when a key is given; do_layer_norm: AllenNLP's masked layer norm of each layer before
    mixing; keep_sentence_boundaries: keep <S> and </S> in the outputs (and mask).
    """

    num_output_representations: int = 1
    dropout: float = 0.5
    do_layer_norm: bool = False
    keep_sentence_boundaries: bool = False


def dropout(x: jax.Array, rate: float, *, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (tf.nn.dropout): keep with probability 1 - rate, scale by 1 / (1 - rate).

    Identity when key is None or rate is 0. Shared by the ELMo mixes and the training LMs.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def remove_sentence_boundaries(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Drop <S> and </S>: x (batch, time + 2, dim), mask (batch, time + 2) -> (batch, time, dim), (batch, time)."""
    # Sentences are left-aligned, so position t + 1 holds token t and mask[:, t + 2] says t < length.
    new_mask = mask[:, 2:]
    return x[:, 1:-1] * new_mask[..., None].astype(x.dtype), new_mask


def mix_representations(mix_params: list, config: ElmoConfig, bilm_output: BiLMOutput, *, key=None) -> ElmoOutput:
    """One scalar mix per output representation, boundary removal and dropout.

    Args:
      mix_params: [scalar mix params] * num_output_representations.
      bilm_output: activations (n_layers + 1, batch, time + 2, dim) and mask (batch, time + 2).
      key: PRNG key for dropout; None = no dropout (inference).
    Returns:
      ElmoOutput: representations, each (batch, time, dim) (time + 2 with keep_sentence_boundaries), and mask.
    """
    representations = []
    keys = jax.random.split(key, len(mix_params)) if key is not None else [None] * len(mix_params)
    for params, mix_key in zip(mix_params, keys):
        mixed = scalar_mix(params, bilm_output.activations, bilm_output.mask, config.do_layer_norm)
        mask = bilm_output.mask
        if not config.keep_sentence_boundaries:
            mixed, mask = remove_sentence_boundaries(mixed, mask)
        representations.append(dropout(mixed, config.dropout, key=mix_key))
    return ElmoOutput(representations, mask)


def elmo(params: dict, options: BiLMOptions, config: ElmoConfig, char_ids: jax.Array, *, key=None,
         state=None) -> tuple[ElmoOutput, dict]:
    """Char ids -> ELMo representations.

    Args:
      params: {"bilm": biLM params, "scalar_mix": [{"weights", "gamma"}] * num_output_representations}.
      char_ids: (batch, time, max_chars) from ``batch_to_ids``.
      key: dropout PRNG key, None for none; state: biLM state (None = stateless).
    Returns:
      ElmoOutput (representations (batch, time, 2 * projection_dim) each, mask (batch, time)), final biLM state.
    """
    bilm_output, state = bilm(params["bilm"], options, char_ids, state)
    return mix_representations(params["scalar_mix"], config, bilm_output, key=key), state


@functools.partial(jax.jit, static_argnames=("options", "config"))
def _elmo_jit(params, options, config, char_ids, key, state):
    return elmo(params, options, config, char_ids, key=key, state=state)


@functools.partial(jax.jit, static_argnames=("options", "config"))
def _elmo_words_jit(params, options, config, cache, word_ids, key, state):
    bilm_output, state = bilm_from_word_ids(params["bilm"], options, cache, word_ids, state)
    return mix_representations(params["scalar_mix"], config, bilm_output, key=key), state


class Elmo:
    """AllenNLP's ``Elmo``: ``out = elmo(char_ids, key=None)`` -> ElmoOutput.

    Stateless: a sentence's vectors never depend on other sentences or earlier calls. ``key`` turns
    dropout on (training). With ``vocab_to_cache`` the token layer of those words is precomputed and
    ``elmo(word_ids=...)`` looks it up (AllenNLP's ``word_inputs``; index 0 is padding).
    """

    def __init__(self, bilm_model: BiLM, config: ElmoConfig, scalar_mix_parameters=None, vocab_to_cache=None):
        """bilm_model: a loaded BiLM; config: ElmoConfig; scalar_mix_parameters: initial (unnormalised) mix
        weights, one per layer (default zeros = equal weights); vocab_to_cache: words whose token vectors are
        precomputed so that ``word_ids`` can be passed instead of characters."""
        n_layers = bilm_model.options.n_representation_layers
        self.bilm = bilm_model
        self.options = bilm_model.options
        self.config = config
        self.params = {
            "bilm": bilm_model.params,
            "scalar_mix": [init_scalar_mix(n_layers, scalar_mix_parameters)
                           for _ in range(config.num_output_representations)],
        }
        self.vocab_to_cache = list(vocab_to_cache) if vocab_to_cache is not None else None
        self.word_cache = (jnp.asarray(bilm_model.embed_vocabulary(self.vocab_to_cache))
                           if self.vocab_to_cache is not None else None)

    @classmethod
    def from_hdf5(cls, options_file: str | os.PathLike, weight_file: str | os.PathLike,
                  num_output_representations: int, dropout: float = 0.5, do_layer_norm: bool = False,
                  keep_sentence_boundaries: bool = False, scalar_mix_parameters=None, vocab_to_cache=None) -> Elmo:
        """Load published weights; arguments as AllenNLP's ``Elmo``."""
        return cls._build(BiLM.from_hdf5(options_file, weight_file), num_output_representations, dropout,
                          do_layer_norm, keep_sentence_boundaries, scalar_mix_parameters, vocab_to_cache)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_output_representations: int = 1, **kwargs) -> Elmo:
        """Any published model (``BiLM.from_pretrained``: bilm-tf, NLPL, ELMoForManyLangs); kwargs as
        ``from_hdf5``. Build the inputs with ``elmo.batch_to_ids``: the model's own token ids."""
        return cls._build(BiLM.from_pretrained(path), num_output_representations, **kwargs)

    @classmethod
    def _build(cls, model: BiLM, num_output_representations: int, dropout: float = 0.5, do_layer_norm: bool = False,
               keep_sentence_boundaries: bool = False, scalar_mix_parameters=None, vocab_to_cache=None) -> Elmo:
        if num_output_representations < 1:
            raise ValueError(f"num_output_representations must be >= 1, found {num_output_representations}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {dropout}")
        config = ElmoConfig(num_output_representations, dropout, do_layer_norm, keep_sentence_boundaries)
        return cls(model, config, scalar_mix_parameters, vocab_to_cache)

    @classmethod
    def pretrained(cls, num_output_representations: int = 1, **kwargs) -> Elmo:
        """ELMo over the built-in English biLM (``elmo_jax.pretrained``); kwargs as ``from_hdf5``."""
        from .pretrained import default_model_files

        return cls.from_hdf5(*default_model_files(), num_output_representations, **kwargs)

    def __call__(self, char_ids=None, *, word_ids=None, key=None) -> ElmoOutput:
        """char_ids (batch, time, max_chars) from batch_to_ids, or word_ids (batch, time) into vocab_to_cache
        (0 = padding) -> ElmoOutput (representations (batch, time, 2 * projection_dim) each, mask (batch, time)).
        ``key`` turns dropout on."""
        if word_ids is not None:
            if self.word_cache is None:
                raise ValueError("word_ids need a vocabulary cache: build Elmo with vocab_to_cache=[...]")
            word_ids = np.asarray(word_ids)
            if word_ids.ndim != 2 or word_ids.size == 0:
                raise ValueError(f"word_ids must be a non-empty (batch, time) array, found shape {word_ids.shape}")
            if word_ids.min() < 0 or word_ids.max() >= len(self.vocab_to_cache):
                raise ValueError(f"word_ids must index vocab_to_cache (0..{len(self.vocab_to_cache) - 1})")
            out, _ = _elmo_words_jit(self._compute_params(), self.options, self.config, self.word_cache,
                                     jnp.asarray(word_ids, jnp.int32), key, None)
            return out
        if char_ids is None:
            raise ValueError("pass char_ids (from batch_to_ids) or word_ids")
        char_ids = _check_char_ids(char_ids, self.options)
        out, _ = _elmo_jit(self._compute_params(), self.options, self.config, char_ids, key, None)
        return out

    def batch_to_ids(self, sentences) -> np.ndarray:
        """Tokenized sentences -> the model's token ids (``BiLM.batch_to_ids``), the input of ``__call__``."""
        return self.bilm.batch_to_ids(sentences)

    def _compute_params(self) -> dict:
        """``params`` with the biLM in its jit-friendly layout (``BiLM.compute_params``), unless the user has
        replaced ``params["bilm"]`` (e.g. with trained values), which is then used as it is."""
        if self.params["bilm"] is self.bilm.params:
            return {**self.params, "bilm": self.bilm.compute_params}
        return self.params

    def get_output_dim(self) -> int:
        """Width of each representation: 2 * projection_dim (AllenNLP's method of that name)."""
        return self.options.output_dim
