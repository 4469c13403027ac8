"""ELMoForManyLangs (HIT-SCIR) model directories, converted at load time into the params the biLM reads.

A model directory holds ``config.json`` (its ``config_path`` names the architecture json), ``char.dic``,
``word.dic``, ``token_embedder.pkl`` and ``encoder.pkl`` (torch pickles, read by ``torch_pickle`` without
torch and without running code). The family's conventions become params and options here, once, so the
pure functions of ``bilm`` run it unchanged:

- chars: its own dictionary, position 0 holds ``<eow>``'s id and the position after the last character
  ``<bow>``'s (the package swaps the two names, in training too), unknown chars ``<oov>``, the rest ``<pad>``,
  whose embedding row is an ordinary vector; tokens cut to ``max_characters_per_token - 2`` code points.
  Ids are +1 shifted, so that 0 masks a padding token as in bilm-tf.
- a word vector (``word.dic``, exact lookup, ``<oov>`` otherwise) goes before the char features, into the
  projection: ``TokenOptions.word_dim`` and the ``word_embed`` param.
- highway ``y = g x + (1 - g) relu(z[:F])``, ``g = sigmoid(z[F:])``: bilm-tf's form with carry = -W[F:].
- LSTM gates in PyTorch's (i, f, g, o) order with the forget bias stored in the bias: regrouped to TF's
  (i, j, f, o) and 1.0 taken off the f block, since the shared step adds TF's forget bias.
- skip connections always on, as ``use_skip_connections``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from .characters import TokenError, sentences_to_ids
from .options import BiLMOptions, CharCNNOptions, LSTMOptions, TokenOptions
from .weights import WeightsError, write_atomic

CHAR_SPECIALS = ("<bos>", "<eos>", "<oov>", "<pad>", "<bow>", "<eow>")
WORD_SPECIALS = ("<oov>", "<bos>", "<eos>", "<pad>")
MODEL_FILES = ("config.json", "char.dic", "token_embedder.pkl", "encoder.pkl")
# The architecture files inside the elmoformanylangs package (its configs/ folder), which the published
# models name by an absolute path on their trainer's machine and most archives do not contain.
_PUBLISHED = {
    "encoder": {"name": "elmo", "projection_dim": 512, "cell_clip": 3, "proj_clip": 3, "dim": 4096, "n_layers": 2},
    "token_embedder": {"name": "cnn", "activation": "relu", "n_highway": 2, "word_dim": 100, "char_dim": 50,
                       "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
                       "max_characters_per_token": 50},
}
PACKAGE_ARCHITECTURES = {"cnn_50_100_512_4096_sample.json": _PUBLISHED, "cnn_0_100_512_4096_sample.json": _PUBLISHED}


def is_model_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with an ELMoForManyLangs model's files."""
    return os.path.isdir(path) and all(os.path.exists(os.path.join(path, name)) for name in MODEL_FILES)


def read_dictionary(path: str | os.PathLike) -> dict[str, int]:
    """A ``char.dic`` / ``word.dic``: UTF-8 lines ``entry<TAB>id`` -> {entry: id}, read as the package reads it.

    Each line is stripped and split at tabs; a line left with one field is the entry U+3000 (the
    ideographic space, which the strip removed). WeightsError names the file and line of anything else.
    """
    path = os.fspath(path)
    entries: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise WeightsError(f"{path}: dictionary file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path}: not a readable UTF-8 dictionary ({error})") from None
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        fields = line.strip().split("\t")
        if len(fields) == 1:
            fields.insert(0, "\u3000")
        if len(fields) != 2 or not fields[1].isdigit():
            raise WeightsError(f"{path}: line {number} must be 'entry<TAB>id', found {line!r}")
        entries[fields[0]] = int(fields[1])
    return entries


def _write_dictionary(path: str, entries: dict[str, int]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{entry}\t{i}\n" for entry, i in entries.items())

    write_atomic(path, write)


class DictionaryCharacters:
    """How an ELMoForManyLangs model turns tokens into ids: its char.dic and word.dic (see the module docstring).

    ``token_ids(token)`` gives ``max_chars`` char ids and, where the model has words, the word id last,
    all +1 shifted (0 = masked). The literal tokens ``<bos>`` and ``<eos>`` are the sentence boundaries,
    as in the original.
    """

    boundary_tokens = ("<bos>", "<eos>")

    def __init__(self, chars: dict[str, int], words: dict[str, int] | None, max_chars: int = 50,
                 source: str = "dictionaries"):
        """chars, words: the dictionaries' {entry: id} (words None for a model without a word embedding)."""
        missing = [s for s in CHAR_SPECIALS if s not in chars]
        missing += [s for s in WORD_SPECIALS if words is not None and s not in words]
        if missing:
            raise WeightsError(f"{source}: the dictionaries lack the special entries {missing}")
        self.chars, self.words, self.max_chars, self.source = chars, words, max_chars, source
        self.width = max_chars + int(words is not None)
        self._pad, self._oov = chars["<pad>"] + 1, chars["<oov>"] + 1
        # The package looks '<bow>' up as '<eow>' and the other way round: position 0 holds <eow>'s id.
        self._first, self._last = chars["<eow>"] + 1, chars["<bow>"] + 1
        self._word_oov = None if words is None else words["<oov>"] + 1

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, options: BiLMOptions) -> DictionaryCharacters:
        """Read ``char.dic`` (and ``word.dic`` where the options have words) of a model or checkpoint directory."""
        directory = os.fspath(directory)
        chars = read_dictionary(os.path.join(directory, "char.dic"))
        words = read_dictionary(os.path.join(directory, "word.dic")) if options.tokens.has_words else None
        return cls(chars, words, options.char_cnn.max_characters_per_token, source=directory)

    def tokens_ids(self, tokens: Sequence[str]) -> np.ndarray:
        """Many tokens -> (len(tokens), width) int32 ids (``token_ids`` of each)."""
        if not tokens:
            return np.zeros((0, self.width), np.int32)
        return np.stack([self.token_ids(token) for token in tokens])

    def token_ids(self, token: str) -> np.ndarray:
        """One token -> (width,) int32 ids: char ids, then the word id if the model has words."""
        if not isinstance(token, str):
            raise TokenError(f"tokens must be str, found {type(token).__name__}: {token!r}")
        token = token[: self.max_chars - 2]  # code points, before anything else (the word lookup too)
        ids = np.full(self.width, self._pad, np.int32)
        ids[0] = self._first
        if token in self.boundary_tokens:
            body = [self.chars[token] + 1]
        else:
            get, oov = self.chars.get, self._oov - 1
            body = [get(c, oov) + 1 for c in token]
        ids[1 : 1 + len(body)] = body
        ids[1 + len(body)] = self._last
        if self.words is not None:
            ids[-1] = self.words.get(token, self._word_oov - 1) + 1
        return ids

    def batch_to_ids(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Sentences -> (batch, time, width) int32, 0 at padding."""
        return sentences_to_ids(sentences, self.token_ids, self.width)

    def save(self, directory: str | os.PathLike) -> None:
        """Write char.dic (and word.dic) into ``directory``, in the package's format."""
        _write_dictionary(os.path.join(os.fspath(directory), "char.dic"), self.chars)
        if self.words is not None:
            _write_dictionary(os.path.join(os.fspath(directory), "word.dic"), self.words)


def find_architecture(directory: str, config_path: str) -> tuple[dict, str]:
    """The architecture json named by config.json's ``config_path``, found where the package looks for it.

    Tried in order: ``config_path`` joined to the model directory (an absolute one stays as it is), its
    basename inside the model directory, then the package's own configs (``PACKAGE_ARCHITECTURES``).
    Returns (the parsed json, where it came from)."""
    for candidate in (os.path.join(directory, config_path), os.path.join(directory, os.path.basename(config_path))):
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    return json.load(f), candidate
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise WeightsError(f"{candidate}: not a readable architecture json ({error})") from None
    name = os.path.basename(config_path)
    if name in PACKAGE_ARCHITECTURES:
        return PACKAGE_ARCHITECTURES[name], f"elmoformanylangs/configs/{name}"
    raise WeightsError(f"{directory}/config.json: config_path {config_path!r} is found neither in the model "
                       f"directory nor among the package's configs ({sorted(PACKAGE_ARCHITECTURES)})")


def _field(section: dict, name: str, source: str, kind=int):
    value = section.get(name) if isinstance(section, dict) else None
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not float else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise WeightsError(f"{source}: field {name!r} must be {kind.__name__}, found {value!r}")
    return value


def architecture_options(arch: dict, source: str, characters: DictionaryCharacters, n_chars: int,
                         n_words: int) -> BiLMOptions:
    """The architecture json and the embedding sizes -> BiLMOptions (n_chars, n_words: rows in the .pkl)."""
    embedder, encoder = arch.get("token_embedder"), arch.get("encoder")
    if not isinstance(embedder, dict) or not isinstance(encoder, dict):
        raise WeightsError(f"{source}: an ELMoForManyLangs architecture needs 'token_embedder' and 'encoder'")
    for part, name in ((embedder, "cnn"), (encoder, "elmo")):
        if str(part.get("name", "")).lower() != name:
            raise WeightsError(f"{source}: only the published architecture (token_embedder 'cnn', encoder 'elmo') "
                               f"loads, found {part.get('name')!r}")
    if _field(embedder, "char_dim", source) <= 0:
        raise WeightsError(f"{source}: a model without characters (char_dim 0) is not supported")
    filters = embedder.get("filters")
    if not isinstance(filters, list) or not filters or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(v, int) and v > 0 for v in f) for f in filters):
        raise WeightsError(f"{source}: field 'filters' must be [[width, n], ...], found {filters!r}")
    activation = embedder.get("activation", "relu")
    if activation not in ("relu", "tanh"):
        raise WeightsError(f"{source}: field 'activation' must be 'relu' or 'tanh', found {activation!r}")
    word_dim = _field(embedder, "word_dim", source)
    bos, eos = (characters.token_ids(t) for t in characters.boundary_tokens)
    clips = [encoder.get(name) for name in ("cell_clip", "proj_clip")]
    for name, clip in zip(("cell_clip", "proj_clip"), clips):
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
            raise WeightsError(f"{source}: field {name!r} must be a number >= 0, found {clip!r}")
    return BiLMOptions(
        char_cnn=CharCNNOptions(
            char_embedding_dim=embedder["char_dim"], filters=tuple((w, n) for w, n in filters),
            n_highway=_field(embedder, "n_highway", source), n_characters=n_chars + 1,
            max_characters_per_token=_field(embedder, "max_characters_per_token", source), activation=activation),
        lstm=LSTMOptions(
            dim=_field(encoder, "dim", source), projection_dim=_field(encoder, "projection_dim", source),
            n_layers=_field(encoder, "n_layers", source),
            # The package clips only when the value is truthy.
            cell_clip=float(clips[0]) if clips[0] else None, proj_clip=float(clips[1]) if clips[1] else None,
            use_skip_connections=True),
        tokens=TokenOptions(word_dim=word_dim if word_dim > 0 else 0, n_words=n_words + 1 if word_dim > 0 else 0,
                            bos_ids=tuple(int(i) for i in bos), eos_ids=tuple(int(i) for i in eos)),
    )


def _tf_gates(blocks: np.ndarray, dim: int, axis: int) -> np.ndarray:
    """PyTorch's gate blocks (i, f, g, o) of size ``dim`` along ``axis`` -> TF LSTMCell's (i, j=g, f, o)."""
    i, f, g, o = np.split(blocks, [dim, 2 * dim, 3 * dim], axis=axis)
    return np.concatenate([i, g, f, o], axis=axis)


def convert_state(token_state: dict[str, np.ndarray], encoder_state: dict[str, np.ndarray],
                  options: BiLMOptions, sources: tuple[str, str] = ("token_embedder.pkl", "encoder.pkl")) -> dict:
    """The two state dicts (torch layouts) -> params in ``bilm.init_params``' layout, every shape checked.

    Args:
      token_state: token_embedder.pkl: word_emb_layer.embedding.weight (n_words, W), char_emb_layer.embedding
        .weight (n_chars, c), convolutions.{i}.weight (n, c, width) and .bias, highways._layers.{k}.weight
        (2F, F) and .bias, projection.weight (P, W + F) and .bias.
      encoder_state: encoder.pkl: {forward,backward}_layer_{l}.input_linearity.weight (4D, P),
        .state_linearity.weight (4D, P) and .bias (4D,), .state_projection.weight (P, D).
      sources: the two files' names, for errors.
    """
    cnn, lstm, tokens = options.char_cnn, options.lstm, options.tokens
    n_filters, proj, dim = cnn.n_filters, lstm.projection_dim, lstm.dim

    def take(state, name, shape):
        source = sources[state is encoder_state]
        if name not in state:
            raise WeightsError(f"{source}: tensor {name!r} is missing")
        value = np.asarray(state[name], np.float32)
        if value.shape != shape:
            raise WeightsError(f"{source}: tensor {name!r} has shape {value.shape}, the architecture expects {shape}")
        if not np.all(np.isfinite(value)):
            raise WeightsError(f"{source}: tensor {name!r} holds NaN or infinite values")
        return value

    def zero_row(table):
        return np.concatenate([np.zeros((1, table.shape[1]), np.float32), table])

    params: dict = {
        "char_embed": zero_row(take(token_state, "char_emb_layer.embedding.weight",
                                    (cnn.n_characters - 1, cnn.char_embedding_dim))),
        "convolutions": [], "highway": [],
    }
    for i, (width, num) in enumerate(cnn.filters):
        kernel = take(token_state, f"convolutions.{i}.weight", (num, cnn.char_embedding_dim, width))
        params["convolutions"].append({"kernel": kernel.transpose(2, 1, 0),  # (width, char_dim, n)
                                       "bias": take(token_state, f"convolutions.{i}.bias", (num,))})
    for k in range(cnn.n_highway):
        weight = take(token_state, f"highways._layers.{k}.weight", (2 * n_filters, n_filters))
        bias = take(token_state, f"highways._layers.{k}.bias", (2 * n_filters,))
        params["highway"].append({  # g keeps x in the original: carry = 1 - g = sigmoid(-z[F:])
            "transform": {"kernel": weight[:n_filters].T, "bias": bias[:n_filters]},
            "carry": {"kernel": -weight[n_filters:].T, "bias": -bias[n_filters:]},
        })
    params["projection"] = {
        "kernel": take(token_state, "projection.weight", (proj, tokens.word_dim + n_filters)).T,
        "bias": take(token_state, "projection.bias", (proj,)),
    }
    if tokens.has_words:
        params["word_embed"] = zero_row(take(token_state, "word_emb_layer.embedding.weight",
                                             (tokens.n_words - 1, tokens.word_dim)))
    params["lstm"] = {"forward": [], "backward": []}
    for layer in range(lstm.n_layers):
        for direction in ("forward", "backward"):
            prefix = f"{direction}_layer_{layer}."
            inputs = take(encoder_state, prefix + "input_linearity.weight", (4 * dim, proj))
            state = take(encoder_state, prefix + "state_linearity.weight", (4 * dim, proj))
            bias = _tf_gates(take(encoder_state, prefix + "state_linearity.bias", (4 * dim,)), dim, 0)
            bias[2 * dim : 3 * dim] -= 1.0  # the shared step adds TF's forget bias of 1
            params["lstm"][direction].append({
                "kernel": _tf_gates(np.concatenate([inputs.T, state.T]), dim, 1),  # (2P, 4D): [x, h] rows
                "bias": bias,
                "projection": take(encoder_state, prefix + "state_projection.weight", (proj, dim)).T,
            })
    return params


def load_model_directory(directory: str | os.PathLike):
    """An ELMoForManyLangs model directory -> (params, options, DictionaryCharacters).

    WeightsError names the file and what was wrong with it (missing file, unreadable or unsafe pickle,
    dictionaries that do not match the embeddings, an architecture that is not the published one's kind).
    """
    from .torch_pickle import load_state_dict

    directory = os.fspath(directory)
    missing = [name for name in MODEL_FILES if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise WeightsError(f"{directory}: not an ELMoForManyLangs model directory, it lacks {missing}")
    config_file = os.path.join(directory, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{config_file}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("config_path"), str):
        raise WeightsError(f"{config_file}: needs a 'config_path' string naming the architecture json")
    arch, arch_source = find_architecture(directory, config["config_path"])
    embedder = arch.get("token_embedder") if isinstance(arch, dict) else None
    max_chars = _field(embedder, "max_characters_per_token", arch_source) if isinstance(embedder, dict) else 50
    word_dim = embedder.get("word_dim", 0) if isinstance(embedder, dict) else 0
    token_file, encoder_file = os.path.join(directory, "token_embedder.pkl"), os.path.join(directory, "encoder.pkl")
    token_state, encoder_state = load_state_dict(token_file), load_state_dict(encoder_file)
    chars = read_dictionary(os.path.join(directory, "char.dic"))
    words = read_dictionary(os.path.join(directory, "word.dic")) if isinstance(word_dim, int) and word_dim > 0 else None
    characters = DictionaryCharacters(chars, words, max_chars, source=directory)
    n_chars = _rows(token_state, "char_emb_layer.embedding.weight", token_file)
    n_words = _rows(token_state, "word_emb_layer.embedding.weight", token_file) if words is not None else 0
    for name, entries, rows in (("char.dic", chars, n_chars), ("word.dic", words or {}, n_words)):
        if entries and (len(entries) != rows or max(entries.values()) >= rows):
            raise WeightsError(f"{directory}/{name}: {len(entries)} entries with ids up to {max(entries.values())} do "
                               f"not match the {rows} embedding rows of token_embedder.pkl")
    options = architecture_options(arch, arch_source, characters, n_chars, n_words)
    return convert_state(token_state, encoder_state, options, (token_file, encoder_file)), options, characters


def _rows(state: dict, name: str, source: str) -> int:
    if name not in state or np.ndim(state[name]) != 2:
        raise WeightsError(f"{source}: tensor {name!r} is missing or not a matrix")
    return int(np.shape(state[name])[0])
