"""Flax NNX wrapper: ELMo as a module inside a user's model, the biLM frozen or trained.

NNX is what Flax recommends for new code; the module holds the same params trees that
``weights.load_hdf5`` returns and calls the same pure functions, so numbers are identical to ``Elmo``.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from .bilm import BiLM, bilm, model_characters
from .elmo import ElmoConfig, ElmoOutput, mix_representations
from .options import BiLMOptions
from .scalar_mix import init_scalar_mix


class FrozenParam(nnx.Variable):
    """A biLM weight that an optimiser over ``nnx.Param`` leaves alone (the frozen-biLM default)."""


def _values(tree):
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class ElmoModule(nnx.Module):
    """biLM + ``num_output_representations`` scalar mixes, as one NNX module.

    ``module(char_ids, rngs=None)`` -> ElmoOutput; pass ``rngs=nnx.Rngs(dropout=key)`` to apply dropout.
    The scalar mixes are ``nnx.Param``; the biLM weights are ``nnx.Param`` when ``trainable_bilm`` (fine-tuning)
    and ``FrozenParam`` otherwise, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains only the mixes.
    """

    def __init__(self, bilm_params: dict, options: BiLMOptions, config: ElmoConfig = ElmoConfig(),
                 trainable_bilm: bool = False, scalar_mix_parameters=None, characters=None):
        """bilm_params: the loader's params dict; options: BiLMOptions; config: ElmoConfig (number of mixes,
        dropout, layer norm, boundaries); trainable_bilm: fine-tune the biLM too; scalar_mix_parameters:
        initial mix weights, one per layer; characters: the model's token-to-id mapping (``BiLM.characters``;
        default bilm-tf's bytes), which ``module.batch_to_ids`` uses."""
        self.characters = model_characters(options, characters)
        self.options = options
        self.config = config
        kind = nnx.Param if trainable_bilm else FrozenParam
        self.bilm = nnx.data(jax.tree.map(kind, bilm_params))
        self.scalar_mix = nnx.data([
            jax.tree.map(nnx.Param, init_scalar_mix(options.n_representation_layers, scalar_mix_parameters))
            for _ in range(config.num_output_representations)
        ])

    @classmethod
    def from_hdf5(cls, options_file: str | os.PathLike, weight_file: str | os.PathLike, **kwargs) -> ElmoModule:
        """Load an options.json + weights.hdf5 (published or exported) biLM with fresh scalar mixes.

        kwargs: config, trainable_bilm, scalar_mix_parameters (as ``__init__``)."""
        loaded = BiLM.from_hdf5(options_file, weight_file)
        return cls(loaded.params, loaded.options, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ElmoModule:
        """Any published model (``BiLM.from_pretrained``: bilm-tf, NLPL, ELMoForManyLangs) with fresh scalar
        mixes; kwargs as ``__init__``. ``module.batch_to_ids(sentences)`` gives that model's token ids."""
        loaded = BiLM.from_pretrained(path)
        return cls(loaded.params, loaded.options, characters=loaded.characters, **kwargs)

    def batch_to_ids(self, sentences):
        """Tokenized sentences -> this model's token ids (batch, time, width), the input of ``__call__``."""
        return self.characters.batch_to_ids(sentences)

    @classmethod
    def pretrained(cls, **kwargs) -> ElmoModule:
        """The built-in English biLM (``elmo_jax.pretrained``) with fresh scalar mixes; kwargs as ``__init__``."""
        from .pretrained import default_model_files

        return cls.from_hdf5(*default_model_files(), **kwargs)

    def __call__(self, char_ids: jax.Array, *, rngs: nnx.Rngs | None = None) -> ElmoOutput:
        """char_ids (batch, time, max_chars) -> ElmoOutput (representations (batch, time, dim) each, mask)."""
        bilm_output, _ = bilm(_values(self.bilm), self.options, char_ids)
        key = rngs.dropout() if rngs is not None else None
        return mix_representations(_values(self.scalar_mix), self.config, bilm_output, key=key)
