"""Build the word-in-context (WiC) evaluation set from WordNet's example sentences.

    python benchmarks/make_wic.py [--tsv CORPUS/eval/wordnet_examples.tsv] [--out benchmarks/data/wic]

Like WiC (Pilehvar and Camacho-Collados, 2019): each row is a pair of WordNet example sentences that
contain the same lemma with the same part of speech, labelled 1 when both examples belong to the same
synset and 0 when they belong to different synsets. The input is the corpus's
`eval/wordnet_examples.tsv` (columns pos, synset, lemmas (|-separated), example; whitespace-tokenized;
these sentences are never trained on). `../shared/corpus/build_corpus.sh` writes it, and also unpacks
WordNet's morphological exception lists (`pkgs/root/usr/share/wordnet/*.exc`) beside it, which this
script reads.

Rule for the target word:
- Nouns and verbs only, as in WiC (--pos to change it); WordNet's adjective examples are mostly
  two-word phrases ('extreme temperatures') that carry little context.
- Only single-word lemmas (no space); multiword lemmas ('physical object') are skipped.
- A token is the target when, lowercased, it equals the lemma or WordNet's morphology maps it to the
  lemma: the exception list of that part of speech ('ran' -> 'run', 'geese' -> 'goose', 'taken' ->
  'take') or one of morphy's suffix rules ('objects' -> 'object', 'studies' -> 'study', 'parked' ->
  'park', 'larger' -> 'large').
- An example counts for a lemma only when exactly one token matches it; none or several: dropped.
- A sentence that is an example of two synsets of the same lemma is dropped for that lemma (its
  label would be ambiguous).

Pairs and balance: both sentences of a pair have the target in the same written form (same string,
case included: 'objects' with 'objects', 'ran' with 'ran'). Otherwise the form itself leaks the label
(a verb sense tends to be exemplified in one tense), and a context-free vector scored 58% on a
first version of this set that paired inflections; with one form per pair, the token layer gives
the same vector to both sentences and can only score chance, as WiC intends. For each (lemma, pos),
positives are pairs of examples of one synset, negatives pairs of examples of two different
synsets; min(#positives, #negatives, --max-per-label) of each are drawn at random, so every lemma,
and so every split, has as many 1s as 0s and a classifier cannot profit from knowing the lemma.
Split: lemmas (ignoring pos, so 'bank' noun and verb stay together) are shuffled and dealt to dev or
test, each lemma to the split with fewer pairs so far; no lemma is in both. Everything is seeded
(--seed), so the output is the same on every run.

Unlike WiC, no senses are pruned (WiC dropped closely related WordNet senses, by their place in the
network), so this set keeps WordNet's finest distinctions. It has no train split either: the
threshold is tuned on dev, as in WiC's unsupervised baselines.

Output: dev.tsv and test.tsv with header `lemma pos label sentence1 index1 sentence2 index2` (tab
separated; index = 0-based index of the target token in the whitespace-split sentence), and
LICENSE-WordNet.txt (copied from the Debian wordnet-base package's copyright file).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import re
import sys

HEADER = ("lemma", "pos", "label", "sentence1", "index1", "sentence2", "index2")
EXC_FILES = {"noun": "noun.exc", "verb": "verb.exc", "adj": "adj.exc", "adv": "adv.exc"}
# WordNet's morphy detachment rules (morph.c), per part of speech: (suffix, replacement).
SUFFIX_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
             ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


def read_exceptions(wordnet_dir: str) -> dict[str, dict[str, set[str]]]:
    """{pos: {inflected form: {base forms}}} from WordNet's *.exc files."""
    exceptions = {}
    for pos, name in EXC_FILES.items():
        table = collections.defaultdict(set)
        with open(os.path.join(wordnet_dir, name), encoding="utf-8") as f:
            for line in f:
                form, *bases = line.split()
                table[form.replace("_", " ")].update(b.replace("_", " ") for b in bases)
        exceptions[pos] = dict(table)
    return exceptions


def base_forms(token: str, pos: str, exceptions) -> set[str]:
    """Every form WordNet's morphology could map the lowercased token to, the token itself included."""
    forms = {token} | exceptions[pos].get(token, set())
    for suffix, replacement in SUFFIX_RULES[pos]:
        if token.endswith(suffix) and len(token) > len(suffix):
            forms.add(token[: len(token) - len(suffix)] + replacement)
    return forms


def target_index(tokens: list[str], lemma: str, pos: str, exceptions) -> int | None:
    """The one token that is `lemma` (or an inflection of it), or None if no token or several are."""
    hits = [i for i, tok in enumerate(tokens) if lemma in base_forms(tok.lower(), pos, exceptions)]
    return hits[0] if len(hits) == 1 else None


def read_examples(tsv: str, exceptions, parts_of_speech=tuple(EXC_FILES)) -> dict[tuple, list[tuple[str, str, int]]]:
    """{(lemma, pos): [(synset, sentence, target index)]}, sorted, ambiguous sentences removed."""
    groups = collections.defaultdict(dict)  # (lemma, pos) -> {sentence: (synsets, index)}
    with open(tsv, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["pos", "synset", "lemmas", "example"]:
            raise SystemExit(f"{tsv}: expected columns pos, synset, lemmas, example; found {header}")
        for line_no, line in enumerate(f, 2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                raise SystemExit(f"{tsv}:{line_no}: expected 4 tab-separated fields, found {len(fields)}")
            pos, synset, lemmas, example = fields
            if pos not in parts_of_speech:
                continue
            tokens = example.split()
            sentence = " ".join(tokens)
            for lemma in sorted({lem.lower() for lem in lemmas.split("|")}):
                if " " in lemma or not lemma:
                    continue  # multiword lemma: not a single target token
                index = target_index(tokens, lemma, pos, exceptions)
                if index is None:
                    continue
                synsets, _ = groups[lemma, pos].setdefault(sentence, (set(), index))
                synsets.add(synset)
    examples = {}
    for key, sentences in groups.items():
        rows = sorted((min(syn), sent, idx) for sent, (syn, idx) in sentences.items() if len(syn) == 1)
        if rows:
            examples[key] = rows
    return examples


def lemma_pairs(rows, rng: random.Random, max_per_label: int) -> list[tuple[int, tuple, tuple]]:
    """Balanced (label, example, example) pairs of one (lemma, pos), target forms equal; [] if a label lacks pairs."""
    positives, negatives = [], []
    for a, b in itertools.combinations(rows, 2):
        if a[1].split()[a[2]] != b[1].split()[b[2]]:
            continue  # different word forms: the context-free token layer could tell them apart
        (positives if a[0] == b[0] else negatives).append((a, b))
    n = min(len(positives), len(negatives), max_per_label)
    pairs = [(1, *p) for p in rng.sample(positives, n)] + [(0, *p) for p in rng.sample(negatives, n)]
    # Random order within the pair, so sentence1 is not always the earlier synset.
    return [(label, *((a, b) if rng.random() < 0.5 else (b, a))) for label, a, b in pairs]


def build(examples, seed: int, max_per_label: int) -> dict[str, list[tuple]]:
    """{'dev': rows, 'test': rows}: balanced pairs, split by lemma, shuffled."""
    rng = random.Random(seed)
    by_lemma = collections.defaultdict(list)
    for lemma, pos in sorted(examples):
        for label, a, b in lemma_pairs(examples[lemma, pos], rng, max_per_label):
            by_lemma[lemma].append((lemma, pos, label, a[1], a[2], b[1], b[2]))
    lemmas = sorted(by_lemma)
    rng.shuffle(lemmas)
    splits = {"dev": [], "test": []}
    for lemma in lemmas:
        smaller = min(splits, key=lambda name: (len(splits[name]), name))
        splits[smaller].extend(by_lemma[lemma])
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_tsv(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(HEADER) + "\n")
        for row in rows:
            f.write("\t".join(str(x) for x in row) + "\n")


def write_licence(copyright_path: str, out_path: str) -> None:
    """The WordNet 3.0 licence paragraph of Debian's copyright file, unindented."""
    with open(copyright_path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^License: WordNet3\.0\n((?: .*\n)+)", text, re.M)
    if match is None:
        raise SystemExit(f"{copyright_path}: no 'License: WordNet3.0' paragraph")
    body = "\n".join("" if line == " ." else line[1:] for line in match.group(1).rstrip("\n").split("\n"))
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("The sentences in dev.tsv and test.tsv are WordNet 3.0's example sentences (the pairs and\n"
                "labels are derived from its synsets by benchmarks/make_wic.py). WordNet's licence:\n\n")
        f.write("WordNet Release 3.0\n\n" + body + "\n")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsv", default="/work/corpus/eval/wordnet_examples.tsv",
                   help="eval/wordnet_examples.tsv of a corpus built by build_corpus.sh")
    p.add_argument("--wordnet-dir", help="WordNet dict dir with *.exc (default: CORPUS/pkgs/root/usr/share/wordnet)")
    p.add_argument("--copyright", help="wordnet-base's Debian copyright file (default: in CORPUS/pkgs)")
    p.add_argument("--out", default=os.path.join(here, "data", "wic"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pos", default="noun,verb", help="comma-separated parts of speech (of noun, verb, adj, adv)")
    p.add_argument("--max-per-label", type=int, default=10, help="pairs of each label per (lemma, pos)")
    args = p.parse_args(argv)
    corpus = os.path.dirname(os.path.dirname(os.path.abspath(args.tsv)))
    wordnet_dir = args.wordnet_dir or os.path.join(corpus, "pkgs", "root", "usr", "share", "wordnet")
    copyright_path = args.copyright or os.path.join(corpus, "pkgs", "root", "usr", "share", "doc", "wordnet-base",
                                                    "copyright")

    parts_of_speech = tuple(args.pos.split(","))
    if not set(parts_of_speech) <= set(EXC_FILES):
        p.error(f"--pos: expected some of {', '.join(EXC_FILES)}; found {args.pos}")
    examples = read_examples(args.tsv, read_exceptions(wordnet_dir), parts_of_speech)
    splits = build(examples, args.seed, args.max_per_label)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in splits.items():
        write_tsv(os.path.join(args.out, f"{name}.tsv"), rows)
        n_pos = sum(row[2] for row in rows)
        print(f"{name}: {len(rows)} pairs ({n_pos} same sense, {len(rows) - n_pos} different), "
              f"{len({row[0] for row in rows})} lemmas", file=sys.stderr)
    write_licence(copyright_path, os.path.join(args.out, "LICENSE-WordNet.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
