"""Sentence tokenizers for ``elmo-jax embed --tokenizer``: whitespace, or the 1B Word Benchmark's Moses.

``whitespace`` is ``str.split``: for text that is already tokenized.

``moses`` tokenizes raw English as the text of the 1B Word Benchmark (Chelba et al., 2013), on which the
original English ELMo models were trained (bilm-tf's README: on the benchmark's released text). Evidence,
from github.com/ciprian-chelba/1-billion-word-language-modeling-benchmark: ``scripts/get-data.sh`` pipes
the sentences through ``normalize-punctuation.perl -l en`` and then ``tokenizer.perl -l en``, the
repository's own copies of both. That tokenizer.perl ("Tokenizer v3") has no ``-no-escape`` flag and no
escaping step, so ``& < > ' "`` stay as they are (``escape=False`` below), and it predates rules that
today's Moses and sacremoses have. So this is sacremoses' ``MosesTokenizer(lang="en")`` with those old
rules restored, after a re-implementation of the benchmark's normalize-punctuation.perl (not sacremoses'
``MosesPunctNormalizer``, whose mappings differ: it turns an em dash into " - " where the benchmark has
"--"). Checked against the two Perl scripts run on 15,120 sentences of English prose and documentation and
70,000 random strings of words, abbreviations, digits, quotes, punctuation, whitespace and CJK: identical
tokens. Not reproduced: the script's repairs of mis-decoded UTF-8 ("â€œ" for a quote), and letters outside
the Basic Multilingual Plane other than CJK (Perl keeps them in words; here they are split off).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable

TOKENIZERS = ("whitespace", "moses")
MOSES_MISSING = "--tokenizer moses needs sacremoses: pip install 'elmo-jax[moses]'"

# normalize-punctuation.perl -l en, as the benchmark modified it (typographic quotes and dashes).
_UNICODE_PUNCT = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u2014": "--", "\u2013": "--", "\u2026": "... ",
    "\u201e": '"', "\u2033": '"', "\u201c": '"', "\u201d": '"',
})  # fmt: skip
_SPACES = re.compile(" +")
_PAREN_BEFORE_STOP = re.compile(r"\) ([.!:?;,])")
_DIGIT_SPACE_PERCENT = re.compile(r"(\d) %")
_QUOTE_BEFORE_STOP = re.compile(r'"([,.]+)')  # English style: the comma or period goes inside the quotes

# tokenizer.perl copies a line that starts with "<" and ends with ">" (an XML or HTML tag line) untouched.
_TAG_LINE = re.compile(r"<.+>$")
# tokenizer.perl pads the line with spaces and splits on each whitespace character; sacremoses strips the
# line and splits on runs. This marker stands in for the line's ends and for each run of 2+ whitespace
# characters (an empty word to Perl), so that the rules that look at neighbours see what Perl saw.
_MARK = "\uffff"  # a Unicode noncharacter: never in text, removed from the input all the same
_WHITESPACE_RUN = re.compile(r"\s\s+")
# Perl's \p{IsAlnum} and \p{IsAlpha} include these (CJK ideographs, Hangul syllables); sacremoses' do not.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7a3\U00020000-\U0003ffff"
# sacremoses' English nonbreaking prefixes that the benchmark's file lacks: there "Jan." ends a sentence.
_PREFIXES_ADDED_LATER = frozenset({"Rs", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"})


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    """The tokenizer called ``name``, one of ``TOKENIZERS``: a function from one line to its tokens.

    Raises ValueError for an unknown name, or for "moses" when sacremoses is not installed.
    """
    if name not in TOKENIZERS:
        known = ", ".join(repr(known) for known in TOKENIZERS)
        raise ValueError(f"tokenizer must be one of {known}, found {name!r}")
    if name == "whitespace":
        return str.split  # a plain C call: no Python work per token
    return functools.partial(_tokenize_moses, _benchmark_moses(_import_sacremoses()))


def _import_sacremoses():
    """The sacremoses module, or a ValueError that says how to install it."""
    try:
        import sacremoses
    except ImportError as err:
        raise ValueError(MOSES_MISSING) from err
    return sacremoses


@functools.lru_cache(maxsize=1)
def _benchmark_moses(sacremoses):
    """sacremoses' English MosesTokenizer with the rules of the benchmark's tokenizer.perl (built once)."""
    tok = sacremoses.MosesTokenizer(lang="en")
    tok.NONBREAKING_PREFIXES = [p for p in tok.NONBREAKING_PREFIXES if p not in _PREFIXES_ADDED_LATER]
    # The old comma rules: one pass each that consumes both neighbours, so "A,B,C" -> "A , B,C".
    digit = tok.IsN
    tok.COMMA_SEPARATE_1 = re.compile(f"([^{digit}]),([^{digit}])"), r"\1 , \2"
    tok.COMMA_SEPARATE_2 = re.compile(f"([{digit}]),([^{digit}])"), r"\1 , \2"
    tok.COMMA_SEPARATE_3 = re.compile(f"([^{digit}]),([{digit}])"), r"\1 , \2"
    tok.PAD_NOT_ISALNUM = _with_cjk(tok.PAD_NOT_ISALNUM, tok.IsAlnum)
    tok.ENGLISH_SPECIFIC_APOSTROPHE = [_with_cjk(rule, tok.IsAlpha) for rule in tok.ENGLISH_SPECIFIC_APOSTROPHE]
    # Same answers as sacremoses' methods, which rebuild a set of thousands of characters on every call.
    lower, alpha, cjk = frozenset(tok.IsLower), frozenset(tok.IsAlpha), re.compile(f"[{_CJK}]")
    tok.islower = lower.issuperset
    tok.isanyalpha = lambda text: not alpha.isdisjoint(text) or cjk.search(text) is not None
    return tok


def _with_cjk(rule, chars):
    """A sacremoses (pattern, replacement) rule with the CJK ranges added wherever ``chars`` is a class."""
    pattern = getattr(rule[0], "pattern", rule[0])
    return re.compile(pattern.replace(chars, chars + _CJK)), rule[1]


def _normalize_punctuation(text: str) -> str:
    """The benchmark's ``normalize-punctuation.perl -l en``, step by step (its mojibake repairs aside)."""
    text = text.replace("\r", "").replace("(", " (").replace(")", ") ")
    text = _SPACES.sub(" ", text)
    text = _PAREN_BEFORE_STOP.sub(r")\1", text).replace("( ", "(").replace(" )", ")")
    text = _DIGIT_SPACE_PERCENT.sub(r"\1%", text).replace(" :", ":").replace(" ;", ";")
    text = text.translate(_UNICODE_PUNCT).replace(" \u2605 ", " ")  # the star bullets of news headlines
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text)).replace("''", '"')
    return _QUOTE_BEFORE_STOP.sub(r'\1"', text)


def _tokenize_moses(tok, line: str) -> list[str]:
    """One raw sentence -> its tokens, as the benchmark's normalize + tokenize pipeline makes them."""
    text = _normalize_punctuation(line.rstrip("\n"))
    if _TAG_LINE.match(text):
        return text.split()
    # tokenizer.perl's rules ` -> ' and then '' -> " (it applies them a few steps later, to the same effect).
    text = text.replace("`", "'").replace("''", '"').replace(_MARK, "")
    if not text.strip():
        return []
    text = _WHITESPACE_RUN.sub(f" {_MARK} ", text)
    tokens = tok.tokenize(f"{_MARK}{text}{_MARK}", escape=False)
    return [token for token in tokens if token != _MARK]
