"""options.json of a biLM, parsed once into frozen dataclasses that can be static jit arguments.

Field names are those of bilm-tf's options.json (``n_layers``, ``projection_dim``, ``cell_clip``...).
Every validation error names the file and the field, with what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ACTIVATIONS = ("relu", "tanh")


class OptionsError(ValueError):
    """options.json is missing, unreadable, or a field has the wrong type or value."""


@dataclasses.dataclass(frozen=True, slots=True)
class CharCNNOptions:
    """The character encoder: embedding, convolutions (width, n_filters), highway layers."""

    char_embedding_dim: int
    filters: tuple[tuple[int, int], ...]
    n_highway: int
    n_characters: int = 262
    max_characters_per_token: int = 50
    activation: str = "relu"

    @property
    def n_filters(self) -> int:
        """Width of the concatenated max-pooled convolution outputs (2048 in the published models)."""
        return sum(num for _, num in self.filters)


@dataclasses.dataclass(frozen=True, slots=True)
class LSTMOptions:
    """The stacked bidirectional LSTM with projection (TF LSTMCell with num_proj)."""

    dim: int
    projection_dim: int
    n_layers: int
    cell_clip: float | None = None
    proj_clip: float | None = None
    use_skip_connections: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class TokenOptions:
    """How a token is represented besides its characters: what differs between the model families.

    bilm-tf / AllenNLP / NLPL models use the defaults: no word embedding, and the char ids of ``<S>``/``</S>``
    that ``characters.boundary_char_ids`` makes. ELMoForManyLangs models concatenate a word vector (the
    token's id in ``word.dic``) before the projection, and their boundary tokens' ids come from their
    dictionaries; a token's ids then end with one more column, its word id (+1 shifted, 0 = masked).
    """

    word_dim: int = 0  # 0: no word embedding
    n_words: int = 0  # rows of the word embedding, the padding row 0 included
    bos_ids: tuple[int, ...] = ()  # all ids of the sentence-begin token (chars, then the word id); () = bilm-tf's
    eos_ids: tuple[int, ...] = ()

    @property
    def has_words(self) -> bool:
        """Whether token ids carry a word id column after the char ids."""
        return self.word_dim > 0


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingOptions:
    """The training fields of bilm-tf's options (absent from inference-only options files)."""

    n_tokens_vocab: int | None = None
    bidirectional: bool = True
    dropout: float = 0.1
    unroll_steps: int = 20
    batch_size: int = 128
    n_epochs: int = 10
    n_train_tokens: int | None = None
    n_negative_samples_batch: int = 8192
    all_clip_norm_val: float = 10.0
    share_embedding_softmax: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class BiLMOptions:
    """Everything options.json says about a biLM."""

    char_cnn: CharCNNOptions
    lstm: LSTMOptions
    training: TrainingOptions = TrainingOptions()
    tokens: TokenOptions = TokenOptions()

    @property
    def token_id_width(self) -> int:
        """Ids per token: max_characters_per_token char ids, plus the word id where the model has words."""
        return self.char_cnn.max_characters_per_token + int(self.tokens.has_words)

    @property
    def output_dim(self) -> int:
        """Width of every representation layer: forward and backward halves."""
        return 2 * self.lstm.projection_dim

    @property
    def n_representation_layers(self) -> int:
        """Token layer plus one per LSTM layer."""
        return self.lstm.n_layers + 1

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> BiLMOptions:
        """Read and validate an options.json file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise OptionsError(f"{path}: options file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OptionsError(f"{path}: not a readable JSON options file ({error})") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "options") -> BiLMOptions:
        """Validate a parsed options.json dict (bilm-tf layout)."""
        reader = _FieldReader(raw, source)
        filters = reader.get("char_cnn.filters", list)
        if not filters or not all(
            isinstance(f, (list, tuple)) and len(f) == 2 and all(_is_int(v) and v > 0 for v in f) for f in filters
        ):
            raise OptionsError(f"{source}: field 'char_cnn.filters' must be a non-empty list of [width, n_filters] "
                               f"pairs of positive integers, found {filters!r}")
        max_chars = reader.get("char_cnn.max_characters_per_token", int, default=50, minimum=3)
        if max(width for width, _ in filters) > max_chars:
            raise OptionsError(f"{source}: field 'char_cnn.filters' has a width wider than "
                               f"max_characters_per_token={max_chars}")
        activation = reader.get("char_cnn.activation", str, default="relu")
        if activation not in ACTIVATIONS:
            raise OptionsError(
                f"{source}: field 'char_cnn.activation' must be one of {ACTIVATIONS}, found {activation!r}")
        tokens = _token_options(reader, max_chars)
        n_characters = reader.get("char_cnn.n_characters", int, default=262)
        if not tokens.bos_ids and n_characters not in (261, 262):
            raise OptionsError(f"{source}: field 'char_cnn.n_characters' must be 261 (training) or 262 (inference), "
                               f"found {n_characters}")
        if tokens.bos_ids and n_characters < 2:
            raise OptionsError(f"{source}: field 'char_cnn.n_characters' must be >= 2, found {n_characters}")
        for name, ids in (("bos", tokens.bos_ids), ("eos", tokens.eos_ids)):
            chars = ids[:max_chars]
            if chars and not all(0 < i < n_characters for i in chars):
                raise OptionsError(f"{source}: field 'tokens.{name}_ids' must hold char ids in 1..{n_characters - 1}")
            if tokens.has_words and not 0 < ids[-1] < tokens.n_words:
                raise OptionsError(f"{source}: field 'tokens.{name}_ids' must end with a word id in "
                                   f"1..{tokens.n_words - 1}, found {ids[-1]}")
        char_cnn = CharCNNOptions(
            char_embedding_dim=reader.get("char_cnn.embedding.dim", int, minimum=1),
            filters=tuple((int(w), int(n)) for w, n in filters),
            n_highway=reader.get("char_cnn.n_highway", int, default=0, minimum=0),
            n_characters=n_characters,
            max_characters_per_token=max_chars,
            activation=activation,
        )
        lstm = LSTMOptions(
            dim=reader.get("lstm.dim", int, minimum=1),
            projection_dim=reader.get("lstm.projection_dim", int, minimum=1),
            n_layers=reader.get("lstm.n_layers", int, minimum=1),
            cell_clip=reader.get("lstm.cell_clip", float, default=None, minimum=0.0),
            proj_clip=reader.get("lstm.proj_clip", float, default=None, minimum=0.0),
            use_skip_connections=reader.get("lstm.use_skip_connections", bool, default=True),
        )
        defaults = TrainingOptions()
        training = TrainingOptions(
            n_tokens_vocab=reader.get("n_tokens_vocab", int, default=None, minimum=4),
            bidirectional=reader.get("bidirectional", bool, default=True),
            dropout=reader.get("dropout", float, default=defaults.dropout, minimum=0.0),
            unroll_steps=reader.get("unroll_steps", int, default=defaults.unroll_steps, minimum=1),
            batch_size=reader.get("batch_size", int, default=defaults.batch_size, minimum=1),
            n_epochs=reader.get("n_epochs", int, default=defaults.n_epochs, minimum=1),
            n_train_tokens=reader.get("n_train_tokens", int, default=None, minimum=1),
            n_negative_samples_batch=reader.get(
                "n_negative_samples_batch", int, default=defaults.n_negative_samples_batch, minimum=1
            ),
            all_clip_norm_val=reader.get("all_clip_norm_val", float, default=defaults.all_clip_norm_val, minimum=0.0),
            share_embedding_softmax=reader.get("share_embedding_softmax", bool, default=False),
        )
        if training.dropout >= 1.0:
            raise OptionsError(f"{source}: field 'dropout' must be in [0, 1), found {training.dropout}")
        return cls(char_cnn=char_cnn, lstm=lstm, training=training, tokens=tokens)

    def to_dict(self, include_training: bool = True) -> dict[str, Any]:
        """The options.json dict (bilm-tf layout); inverse of from_dict."""
        cnn, lstm, training = self.char_cnn, self.lstm, self.training
        out: dict[str, Any] = {
            "lstm": {
                "dim": lstm.dim,
                "projection_dim": lstm.projection_dim,
                "n_layers": lstm.n_layers,
                "use_skip_connections": lstm.use_skip_connections,
            },
            "char_cnn": {
                "activation": cnn.activation,
                "filters": [list(f) for f in cnn.filters],
                "n_highway": cnn.n_highway,
                "embedding": {"dim": cnn.char_embedding_dim},
                "n_characters": cnn.n_characters,
                "max_characters_per_token": cnn.max_characters_per_token,
            },
        }
        for name in ("cell_clip", "proj_clip"):
            if getattr(lstm, name) is not None:
                out["lstm"][name] = getattr(lstm, name)
        if self.tokens != TokenOptions():
            out["tokens"] = {"word_dim": self.tokens.word_dim, "n_words": self.tokens.n_words,
                             "bos_ids": list(self.tokens.bos_ids), "eos_ids": list(self.tokens.eos_ids)}
        if include_training:
            for field in dataclasses.fields(training):
                value = getattr(training, field.name)
                if value is not None:
                    out[field.name] = value
        return out

    def replace(self, **sections: Any) -> BiLMOptions:
        """A copy with whole sections replaced, e.g. ``options.replace(char_cnn=...)``."""
        return dataclasses.replace(self, **sections)


def _token_options(reader: _FieldReader, max_chars: int) -> TokenOptions:
    """The optional "tokens" section (see TokenOptions), validated."""
    source = reader.source
    word_dim = reader.get("tokens.word_dim", int, default=0, minimum=0)
    n_words = reader.get("tokens.n_words", int, default=0, minimum=0)
    if word_dim and n_words < 2:
        raise OptionsError(f"{source}: field 'tokens.n_words' must be >= 2 with a word embedding, found {n_words}")
    width = max_chars + int(word_dim > 0)
    ids = {}
    for name in ("bos_ids", "eos_ids"):
        value = reader.get(f"tokens.{name}", list, default=[])
        if value and (len(value) != width or not all(_is_int(i) and i >= 0 for i in value)):
            raise OptionsError(f"{source}: field 'tokens.{name}' must be {width} non-negative integers "
                               f"(max_characters_per_token char ids{', then the word id' if word_dim else ''}), "
                               f"found {value!r}")
        ids[name] = tuple(value)
    if bool(ids["bos_ids"]) != bool(ids["eos_ids"]) or (word_dim and not ids["bos_ids"]):
        raise OptionsError(f"{source}: fields 'tokens.bos_ids' and 'tokens.eos_ids' go together, and a model with "
                           f"a word embedding needs both")
    return TokenOptions(word_dim=word_dim, n_words=n_words, **ids)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _FieldReader:
    """Reads dotted fields from the raw dict with type checks and messages that name the field."""

    _MISSING = object()

    def __init__(self, raw: Any, source: str):
        if not isinstance(raw, dict):
            raise OptionsError(f"{source}: options must be a JSON object, found {type(raw).__name__}")
        self.raw, self.source = raw, source

    def get(self, dotted: str, kind: type, default: Any = _MISSING, minimum: float | None = None) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is self._MISSING:
                    raise OptionsError(f"{self.source}: required field '{dotted}' is missing")
                return default
            node = node[part]
        if node is None and default is None:
            return None
        ok = {
            int: _is_int(node),
            float: isinstance(node, (int, float)) and not isinstance(node, bool),
            bool: isinstance(node, bool),
            str: isinstance(node, str),
            list: isinstance(node, list),
        }[kind]
        if not ok:
            raise OptionsError(f"{self.source}: field '{dotted}' must be {kind.__name__}, found {node!r}")
        if minimum is not None and node < minimum:
            raise OptionsError(f"{self.source}: field '{dotted}' must be >= {minimum}, found {node!r}")
        return float(node) if kind is float else node
