"""Tokens to character ids, exactly as AllenNLP's ``batch_to_ids`` and bilm-tf's ``Batcher`` make them.

Each token becomes ``max_characters_per_token`` (50) ids: begin-of-word, the token's UTF-8 bytes
(truncated to 48), end-of-word, then padding; every id is shifted by +1 so that 0 marks a masked
(padding) token. Sentence boundary tokens ``<S>``/``</S>`` are not added here: ``bilm`` adds them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

MAX_CHARACTERS_PER_TOKEN = 50
# Raw ids before the +1 shift (bilm-tf's UnicodeCharsVocabulary): bytes are 0-255.
BOS_CHAR = 256  # begin of sentence
EOS_CHAR = 257  # end of sentence
BOW_CHAR = 258  # begin of word
EOW_CHAR = 259  # end of word
PAD_CHAR = 260  # padding within a word

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<S>", "</S>", "<UNK>"


class TokenError(ValueError):
    """A sentence or token that cannot be turned into character ids."""


def _word_ids(body: Sequence[int], max_chars: int) -> np.ndarray:
    ids = np.full(max_chars, PAD_CHAR + 1, dtype=np.int32)
    body = list(body)[: max_chars - 2]
    ids[0] = BOW_CHAR + 1
    ids[1 : 1 + len(body)] = np.asarray(body, dtype=np.int32) + 1
    ids[1 + len(body)] = EOW_CHAR + 1
    return ids


def boundary_char_ids(max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> tuple[np.ndarray, np.ndarray]:
    """Char ids of the sentence-begin and sentence-end tokens: two (max_chars,) int32 arrays."""
    return _word_ids([BOS_CHAR], max_chars), _word_ids([EOS_CHAR], max_chars)


def token_to_char_ids(token: str, max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> np.ndarray:
    """One token -> (max_chars,) int32 char ids, +1 shifted.

    ``<S>`` and ``</S>`` map to the sentence boundary ids, as in bilm-tf's vocabulary.
    """
    encoded = _utf8(token)
    if token == BOS_TOKEN:
        return boundary_char_ids(max_chars)[0]
    if token == EOS_TOKEN:
        return boundary_char_ids(max_chars)[1]
    return _word_ids(encoded, max_chars)


def _utf8(token: str) -> bytes:
    """A token's UTF-8 bytes; TokenError if it is not a str or not valid Unicode text."""
    if not isinstance(token, str):
        raise TokenError(f"tokens must be str, found {type(token).__name__}: {token!r}")
    try:
        return token.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates from a bad decode
        raise TokenError(f"token {token!r} is not valid Unicode text: {error}") from None


def tokens_to_char_ids(tokens: Sequence[str], max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> np.ndarray:
    """Many tokens -> (len(tokens), max_chars) int32: ``token_to_char_ids`` of each, built with numpy at once
    (~10x faster than token by token: the Embedder's first pass meets ~20,000 new words in 10,000 lines)."""
    bodies = [_utf8(token)[: max_chars - 2] for token in tokens]
    n = len(bodies)
    lengths = np.fromiter(map(len, bodies), np.int64, n)
    ids = np.full((n, max_chars), PAD_CHAR + 1, np.int32)
    ids[:, 0] = BOW_CHAR + 1
    flat = np.frombuffer(b"".join(bodies), np.uint8).astype(np.int32) + 1
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids[np.repeat(np.arange(n), lengths), 1 + np.arange(len(flat)) - starts] = flat
    ids[np.arange(n), 1 + lengths] = EOW_CHAR + 1
    for special, row in zip((BOS_TOKEN, EOS_TOKEN), boundary_char_ids(max_chars)):
        ids[[i for i, token in enumerate(tokens) if token == special]] = row
    return ids


def batch_to_ids(sentences: Sequence[Sequence[str]], max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> np.ndarray:
    """Tokenized sentences -> bilm-tf char ids, padded with 0 (masked) tokens.

    The ids of bilm-tf / AllenNLP / NLPL models; ``BiLM.batch_to_ids`` gives any loaded model's own.

    Args:
      sentences: batch of sentences, each a non-empty list of str tokens.
    Returns:
      (batch, max_sentence_length, max_chars) int32.
    """
    return sentences_to_ids(sentences, lambda token: token_to_char_ids(token, max_chars), max_chars)


def sentences_to_ids(sentences: Sequence[Sequence[str]], token_ids: Callable[[str], np.ndarray],
                     width: int) -> np.ndarray:
    """Tokenized sentences -> (batch, max_sentence_length, width) int32 ids, ``token_ids(token)`` per token
    (each distinct token once), 0 at padding. TokenError names the first sentence or token that is not valid."""
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise TokenError(f"sentences must be a list of lists of str tokens, found {type(sentences).__name__}")
    if len(sentences) == 0:
        raise TokenError("empty batch: batch_to_ids needs at least one sentence")
    for index, sentence in enumerate(sentences):
        if isinstance(sentence, str) or not isinstance(sentence, Sequence):
            raise TokenError(f"sentence {index} must be a list of str tokens, found {type(sentence).__name__}")
        if len(sentence) == 0:
            raise TokenError(f"sentence {index} is empty: every sentence needs at least one token")
    length = max(len(sentence) for sentence in sentences)
    ids = np.zeros((len(sentences), length, width), dtype=np.int32)
    cache: dict[str, np.ndarray] = {}
    for i, sentence in enumerate(sentences):
        for j, token in enumerate(sentence):
            if not isinstance(token, str):
                raise TokenError(f"sentence {i}, token {j}: tokens must be str, found {type(token).__name__} {token!r}")
            row = cache.get(token)
            if row is None:
                row = cache[token] = token_ids(token)
            ids[i, j] = row
    return ids


class ByteCharacters:
    """How the bilm-tf family (bilm-tf, AllenNLP, NLPL, the built-in model) turns tokens into ids: UTF-8 bytes.

    Every loaded model has such an object as ``BiLM.characters``; ELMoForManyLangs models have
    ``efml.DictionaryCharacters`` instead, with the same methods.
    """

    boundary_tokens = (BOS_TOKEN, EOS_TOKEN)  # input tokens that are the sentence boundaries themselves

    def __init__(self, max_chars: int = MAX_CHARACTERS_PER_TOKEN):
        self.max_chars = max_chars
        self.width = max_chars

    def token_ids(self, token: str) -> np.ndarray:
        """One token -> (width,) int32 ids (``token_to_char_ids``)."""
        return token_to_char_ids(token, self.max_chars)

    def tokens_ids(self, tokens: Sequence[str]) -> np.ndarray:
        """Many tokens -> (len(tokens), width) int32 ids (``tokens_to_char_ids``)."""
        return tokens_to_char_ids(tokens, self.max_chars)

    def batch_to_ids(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Sentences -> (batch, time, width) int32, 0 at padding (``batch_to_ids``)."""
        return batch_to_ids(sentences, self.max_chars)

    def save(self, directory: str | os.PathLike) -> None:
        """Nothing to write: the mapping is fixed."""


class Vocabulary:
    """A bilm-tf vocabulary file: one token per line, ``<S>``, ``</S>``, ``<UNK>`` among them.

    bilm-tf's training vocabularies are sorted by frequency with the three specials first; the
    sampled softmax relies on that order (log-uniform sampler over ids).
    """

    def __init__(self, words: Iterable[str], source: str = "vocabulary", require_specials: bool = True):
        """Index ``words`` (id = position; a repeated word keeps its first id).

        Args:
          words: the tokens, one per id; each a non-empty str without whitespace.
          source: name used in error messages (the file path for ``from_file``).
          require_specials: raise TokenError unless ``<S>``, ``</S>`` and ``<UNK>`` are all present.
        """
        self.words = list(words)
        self.source = source
        self.index = {}
        for i, word in enumerate(self.words):
            if not isinstance(word, str) or not word or any(c.isspace() for c in word):
                raise TokenError(f"{source}: line {i + 1} must be a single token, found {word!r}")
            self.index.setdefault(word, i)
        missing = [s for s in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN) if s not in self.index]
        if require_specials and missing:
            raise TokenError(f"{source}: vocabulary lacks the special tokens {missing} (bilm-tf needs "
                             f"{BOS_TOKEN}, {EOS_TOKEN}, {UNK_TOKEN}, conventionally the first three lines)")

    @classmethod
    def from_file(cls, path: str | os.PathLike, require_specials: bool = True) -> Vocabulary:
        """Read a UTF-8 file, one token per line (trailing blank lines ignored); TokenError naming the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                words = [line.strip() for line in f.read().splitlines()]
        except FileNotFoundError:
            raise TokenError(f"{path}: vocabulary file not found") from None
        except UnicodeDecodeError as error:
            raise TokenError(f"{path}: vocabulary is not UTF-8 text ({error})") from None
        while words and not words[-1]:
            words.pop()
        return cls(words, source=path, require_specials=require_specials)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def bos(self) -> int:
        """Id of ``<S>``."""
        return self.index[BOS_TOKEN]

    @property
    def eos(self) -> int:
        """Id of ``</S>``."""
        return self.index[EOS_TOKEN]

    @property
    def unk(self) -> int:
        """Id of ``<UNK>``."""
        return self.index[UNK_TOKEN]

    def word_to_id(self, word: str) -> int:
        """Id of ``word``; ``<UNK>``'s id for an unknown word (-1 if the vocabulary has no ``<UNK>``)."""
        return self.index.get(word, self.index.get(UNK_TOKEN, -1))

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids of a sentence with ``<S>`` before and ``</S>`` after: (len(tokens) + 2,) int32."""
        ids = [self.bos] + [self.word_to_id(t) for t in tokens] + [self.eos]
        return np.asarray(ids, dtype=np.int32)

    def char_ids(self, max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> np.ndarray:
        """Char ids of every vocabulary word: (len(self), max_chars) int32."""
        return np.stack([token_to_char_ids(word, max_chars) for word in self.words])
