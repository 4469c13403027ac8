import json
import sys

import pytest

from elmo_jax.tokenize import MOSES_MISSING, TOKENIZERS, get_tokenizer

NO_SACREMOSES = "sacremoses is not installed (pip install 'elmo-jax[moses]')"

# Lines of the 1B Word Benchmark (from bilm-tf's test fixture sentences.json), each with a raw sentence
# written for it, in the typography of news text (curly quotes, dashes), that must give exactly that line.
BENCHMARK_LINES = [
    ("Don’t!", "Don 't !"),
    ("It wasn't the most seaworthy of prizes.", "It wasn 't the most seaworthy of prizes ."),
    (
        (
            "Authorities previously served search warrants at Murray’s Las Vegas home and his businesses in "
            "Las Vegas and Houston."
        ),
        (
            "Authorities previously served search warrants at Murray 's Las Vegas home and his businesses in "
            "Las Vegas and Houston ."
        ),
    ),
    (
        (
            "Elk calling — a skill that hunters perfected long ago to lure game with the promise of a little "
            "romance — is now its own sport."
        ),
        (
            "Elk calling -- a skill that hunters perfected long ago to lure game with the promise of a little "
            "romance -- is now its own sport ."
        ),
    ),
    (
        (
            "“There is more intelligence now being gathered,” the official said, adding that such efforts "
            "would continue for some time."
        ),
        (
            '" There is more intelligence now being gathered , " the official said , adding that such efforts '
            "would continue for some time ."
        ),
    ),
    (
        (
            "When Ms. Winfrey invited Suzanne Somers to share her controversial views about bio-identical "
            "hormone treatment on her syndicated show in 2009, it won Ms. Winfrey a rare dollop of unflattering "
            "press, including a Newsweek cover story titled “Crazy Talk: Oprah, Wacky Cures & You”."
        ),
        (
            "When Ms. Winfrey invited Suzanne Somers to share her controversial views about bio-identical "
            "hormone treatment on her syndicated show in 2009 , it won Ms. Winfrey a rare dollop of unflattering "
            'press , including a Newsweek cover story titled " Crazy Talk : Oprah , Wacky Cures & You . "'
        ),
    ),
    (
        (
            "Fish, ranked 98th in the world, fired 22 aces en route to a 6-3, 6-7 (5/7), 7-6 (7/4) win over "
            "seventh-seeded Argentinian David Nalbandian."
        ),
        (
            "Fish , ranked 98th in the world , fired 22 aces en route to a 6-3 , 6-7 ( 5 / 7 ) , 7-6 ( 7 / 4 ) "
            "win over seventh-seeded Argentinian David Nalbandian ."
        ),
    ),
    (
        (
            "AMMAN (Reuters) - King Abdullah of Jordan will meet U.S. President Barack Obama in Washington on "
            "April 21 to lobby on behalf of Arab states for a stronger U.S. role in Middle East peacemaking, "
            "palace officials said on Sunday."
        ),
        (
            "AMMAN ( Reuters ) - King Abdullah of Jordan will meet U.S. President Barack Obama in Washington on "
            "April 21 to lobby on behalf of Arab states for a stronger U.S. role in Middle East peacemaking , "
            "palace officials said on Sunday ."
        ),
    ),
]

# Rules of the benchmark's own scripts that today's Moses and sacremoses changed or never had. Each
# expected line is what the benchmark's normalize-punctuation.perl -l en | tokenizer.perl -l en printed.
BENCHMARK_RULES = [
    ("Hello, world! It's $5.50 (or so).", "Hello , world ! It 's $ 5.50 ( or so ) ."),  # no &apos; escaping
    ("AT&T <rocks> | 'quotes' \"double\" [x]", "AT & T < rocks > | ' quotes ' \" double \" [ x ]"),
    (
        "'We are delighted,' said Mr. Smith, who lives in the U.S.",  # quote at the line's start; final U.S.
        "' We are delighted , ' said Mr. Smith , who lives in the U.S.",
    ),
    ("He said: 'No way.'", "He said : ' No way . '"),
    ("The 1990's were great; the '90s too.", "The 1990 's were great ; the ' 90s too ."),
    (
        "The U.S. economy grew 3.5% in Jan. 2009, according to No. 10 Downing St.",  # no "Jan" prefix
        "The U.S. economy grew 3.5 % in Jan . 2009 , according to No. 10 Downing St.",
    ),
    ("A,B,C,D,E were the options.", "A , B,C , D,E were the options ."),  # one pass of the comma rule
    (
        "Prices rose 1,200 points, or 5,3 per cent, to 12,000.",
        "Prices rose 1,200 points , or 5,3 per cent , to 12,000 .",
    ),
    ("``Quoted text'' is old style.", '" Quoted text " is old style .'),
    ("‘Single’ and “double” quotes… — end", "' Single ' and \" double \" quotes ... -- end"),
    ("ChangZhuo Chen (陳昌倬) said “no”.", 'ChangZhuo Chen ( 陳昌倬 ) said " no . "'),
    ("Cafe\u0301, nai\u0308ve.", "Caf\u00e9 , na\u00efve ."),  # NFC
    ("He left. then came back.", "He left. then came back ."),  # a lower-case word follows
    ("He left.\t then came back.", "He left . then came back ."),  # two whitespace characters: Perl's empty word
    ("<p>Hello, world</p>", "<p>Hello, world</p>"),  # a tag line is copied untouched
]


@pytest.fixture(scope="module")
def moses():
    pytest.importorskip("sacremoses", reason=NO_SACREMOSES)
    return get_tokenizer("moses")


def test_whitespace_is_str_split():
    tokenize = get_tokenizer("whitespace")
    assert tokenize is str.split
    assert tokenize(" Hello ,  world\t!\n") == ["Hello", ",", "world", "!"]


def test_names():
    assert TOKENIZERS == ("whitespace", "moses")


def test_unknown_name_is_a_one_line_value_error():
    with pytest.raises(ValueError) as err:
        get_tokenizer("spacy")
    assert str(err.value) == "tokenizer must be one of 'whitespace', 'moses', found 'spacy'"


def test_moses_without_sacremoses_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacremoses", None)  # makes `import sacremoses` fail
    with pytest.raises(ValueError) as err:
        get_tokenizer("moses")
    assert str(err.value) == MOSES_MISSING == "--tokenizer moses needs sacremoses: pip install 'elmo-jax[moses]'"


@pytest.mark.parametrize(("raw", "expected"), BENCHMARK_LINES)
def test_moses_gives_lines_of_the_benchmark(moses, raw, expected):
    assert moses(raw) == expected.split(" ")


@pytest.mark.parametrize(("raw", "expected"), BENCHMARK_RULES)
def test_moses_follows_the_benchmark_scripts(moses, raw, expected):
    assert moses(raw) == expected.split(" ")


@pytest.mark.parametrize("blank", ["", "   ", "\n", " \t \n"])
def test_moses_blank_line_has_no_tokens(moses, blank):
    assert moses(blank) == []


def test_moses_is_built_once_and_keeps_a_trailing_newline_out(moses):
    assert get_tokenizer("moses").args == moses.args  # the same cached sacremoses object
    assert moses("Don't!\n") == ["Don", "'t", "!"]
    assert moses("I'm here \uffff now.") == ["I", "'m", "here", "now", "."]  # the internal marker is dropped


def test_moses_round_trips_the_benchmark_fixture_sentences(moses, elmo_tiny):
    sacremoses = pytest.importorskip("sacremoses", reason=NO_SACREMOSES)
    detokenize = sacremoses.MosesDetokenizer(lang="en").detokenize
    lines = [line for batch in json.loads((elmo_tiny / "sentences.json").read_text()) for line in batch]
    assert len(lines) == 30
    for line in lines:
        assert moses(detokenize(line.split(" "))) == line.split(" "), line
