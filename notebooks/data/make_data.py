"""Rebuild train.txt, heldout.txt and vocab.txt of this folder from the project's corpus (see README.md).

    python3 make_data.py --corpus /work/corpus

Keeps only the public-domain sources of the corpus's held-out set (one tokenized sentence per line,
its source in heldout.sources), sentences of 4-40 tokens, shuffled with a fixed seed; the vocabulary is
every training word seen at least twice, by decreasing count, after <S>, </S>, <UNK> (bilm-tf's layout).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import random

PUBLIC_DOMAIN = ("austen", "henry", "spurgeon", "web_bible", "scofield")
N_HELDOUT = 400
MIN_COUNT = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="folder with heldout/heldout.txt and heldout.sources")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    args = parser.parse_args()
    corpus, out = pathlib.Path(args.corpus), pathlib.Path(args.out)

    sources = (corpus / "heldout.sources").read_text(encoding="utf-8").splitlines()
    lines = (corpus / "heldout" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    if len(sources) != len(lines):
        raise SystemExit(f"{corpus}: heldout.sources has {len(sources)} lines, heldout.txt {len(lines)}")
    rows = [(s, line) for s, line in zip(sources, lines) if s in PUBLIC_DOMAIN and 4 <= len(line.split()) <= 40]
    random.Random(0).shuffle(rows)
    heldout, train = rows[:N_HELDOUT], rows[N_HELDOUT:]

    for name, part in (("train.txt", train), ("heldout.txt", heldout)):
        (out / name).write_text("".join(line + "\n" for _, line in part), encoding="utf-8")
    counts = collections.Counter(token for _, line in train for token in line.split())
    words = [w for w, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= MIN_COUNT]
    (out / "vocab.txt").write_text("".join(w + "\n" for w in ["<S>", "</S>", "<UNK>", *words]), encoding="utf-8")

    for name, part in (("train", train), ("heldout", heldout)):
        by_source = collections.Counter(s for s, _ in part)
        print(f"{name}: {len(part)} sentences, {sum(len(line.split()) for _, line in part)} tokens, "
              + ", ".join(f"{s} {by_source[s]}" for s in PUBLIC_DOMAIN))
    print(f"vocab: {len(words) + 3} tokens (count >= {MIN_COUNT}, with <S> </S> <UNK>)")


if __name__ == "__main__":
    main()
