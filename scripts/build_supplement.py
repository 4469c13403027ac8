"""Modern finance text for the built-in model's second training stage, mixed into the base corpus.

    python3 scripts/build_supplement.py WORK_DIR/corpus WORK_DIR/supplement [--copies 8]

The base corpus (``../shared/corpus/build_corpus.sh``) is dictionary, 19th-century commentary, Austen and
Wikipedia leads: it has almost no everyday financial English (6 "interest rates", 2 "money in the bank" in
11.3M tokens), so the model never learned that sense of 'bank', 'deposit' or 'interest'. This adds the English
GnuCash manuals (Debian ``gnucash-docs``: the Tutorial and Concepts Guide and the Help; GFDL 1.1+, GnuCash
Documentation Team), modern prose about bank accounts, deposits, loans and interest.

Fetches ``gnucash-docs`` with ``apt-get download`` (no web, no install) into SUPPLEMENT/pkgs, turns the DocBook
paragraphs into sentences with the base corpus's own normalizer, sentence splitter and tokenizer
(``corpus_text.py``), drops sentences already in the base corpus or repeated, holds out 5% and writes:

  SUPPLEMENT/gnucash/train.txt        the supplement's training sentences (one tokenized sentence per line)
  SUPPLEMENT/gnucash/heldout.txt      its held-out sentences (for perplexity on modern finance text)
  SUPPLEMENT/mix/part-*.txt           base shard k + 1/n of --copies shuffled copies of train.txt, per shard
  SUPPLEMENT/stats.json, SUPPLEMENT/SOURCES.txt

The vocabulary stays the base corpus's (the softmax is the same): new words are <UNK> targets, their characters
still reach the char CNN. Standard library only; about 20 seconds.
"""

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys

PACKAGE = "gnucash-docs"
MANUALS = ("gnucash-guide", "gnucash-help")
# Licence text, legal notice and DTDs are not prose of the manuals.
SKIP_FILES = {"fdl-appendix.xml", "legal.xml"}
# Elements whose content is code, screen text, pictures or index terms, not sentences.
DROP_ELEMENTS = ("screen", "programlisting", "literallayout", "synopsis", "mediaobject", "screenshot",
                 "inlinemediaobject", "indexterm", "figure", "informalfigure", "remark", "comment")
# Elements that end a paragraph; other tags are inline (emphasis, guimenu, ...) and become spaces.
BLOCK_ELEMENTS = ("para", "simpara", "title", "listitem", "entry", "term", "glossterm", "glossdef", "note",
                  "tip", "warning", "caution", "important", "step", "row", "section", "sect1", "sect2", "sect3",
                  "chapter", "appendix", "itemizedlist", "orderedlist", "variablelist", "table", "tgroup",
                  "informaltable", "glossentry", "example", "procedure", "blockquote")

_ENTITY_DECL = re.compile(r'<!ENTITY\s+([\w.-]+)\s+"([^"]*)"\s*>', re.DOTALL)
_ENTITY_REF = re.compile(r"&([\w.-]+);")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_DOCTYPE = re.compile(r"<!DOCTYPE[^\[>]*(\[.*?\])?\s*>", re.DOTALL)
_CDATA = re.compile(r"<!\[CDATA\[.*?\]\]>", re.DOTALL)
_DROP = re.compile(r"<(" + "|".join(DROP_ELEMENTS) + r")\b[^>]*?(?<!/)>.*?</\1\s*>", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:" + "|".join(BLOCK_ELEMENTS) + r")\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")
_XML_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": " ", "mdash": " -- ",
                 "ndash": "-", "hellip": "...", "copy": "(c)", "reg": "", "trade": "", "eacute": "\u00e9"}


def entity_table(manual_dir: str) -> dict[str, str]:
    """name -> text of the manual's own entities (its .dtd files and index.docbook), references expanded."""
    table = dict(_XML_ENTITIES)
    for path in sorted(glob.glob(os.path.join(manual_dir, "*.dtd"))) + [os.path.join(manual_dir, "index.docbook")]:
        with open(path, encoding="utf-8") as f:
            for name, value in _ENTITY_DECL.findall(_COMMENT.sub(" ", f.read())):
                table[name] = value
    for _ in range(5):  # entities refer to entities ("&app;" -> "<application>&appname;</application>")
        table = {name: expand_entities(value, table) for name, value in table.items()}
    return table


def expand_entities(text: str, table: dict[str, str]) -> str:
    """Replace each &name; by its text; unknown entities become a space."""
    return _ENTITY_REF.sub(lambda m: table.get(m.group(1), " "), text)


def docbook_paragraphs(path: str, entities: dict[str, str]) -> list[str]:
    """The text blocks (paragraphs, list items, titles, table cells) of one DocBook XML file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for pattern in (_COMMENT, _DOCTYPE, _CDATA):
        text = pattern.sub(" ", text)
    text = expand_entities(text, entities)
    text = _DROP.sub(" ", text)
    text = _BLOCK_TAG.sub("\n\n", text)
    text = _TAG.sub(" ", text)
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def fetch_package(pkg_dir: str) -> str:
    """Download and unpack gnucash-docs under pkg_dir; returns the unpacked root."""
    debs, root = os.path.join(pkg_dir, "debs"), os.path.join(pkg_dir, "root")
    os.makedirs(debs, exist_ok=True)
    if not glob.glob(os.path.join(debs, f"{PACKAGE}_*.deb")):
        subprocess.run(["apt-get", "download", PACKAGE], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    deb = max(glob.glob(os.path.join(debs, f"{PACKAGE}_*.deb")))
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


def supplement_sentences(root: str, corpus_text, min_tokens: int, max_tokens: int) -> list[str]:
    """Tokenized sentences of the English GnuCash manuals, in document order, without repeats."""
    seen, out = set(), []
    for manual in MANUALS:
        manual_dir = os.path.join(root, "usr/share/help/C", manual)
        if not os.path.isdir(manual_dir):
            raise SystemExit(f"build_supplement: {manual_dir}: not found in {PACKAGE}; expected the English "
                             f"DocBook manual there")
        entities = entity_table(manual_dir)
        for path in sorted(glob.glob(os.path.join(manual_dir, "*.xml"))):
            if os.path.basename(path) in SKIP_FILES:
                continue
            for paragraph in docbook_paragraphs(path, entities):
                for sentence in corpus_text.split_sentences(corpus_text.normalize(paragraph)):
                    tokens = corpus_text.tokenize(sentence)
                    line = " ".join(tokens)
                    if corpus_text.good_sentence(tokens, min_tokens, max_tokens) and line not in seen:
                        seen.add(line)
                        out.append(line)
    return out


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_lines(path: str, lines: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus_dir", help="the base corpus (build_corpus.sh's OUT_DIR: train/part-*.txt)")
    ap.add_argument("out_dir")
    ap.add_argument("--copies", type=int, default=8, help="copies of the supplement in the mix (default 8)")
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=20181025)
    ap.add_argument("--corpus-text", default=os.path.join(here, "..", "..", "shared", "corpus"),
                    help="folder of the base corpus's corpus_text.py (default ../shared/corpus)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.corpus_text))
    import corpus_text

    base_shards = sorted(glob.glob(os.path.join(args.corpus_dir, "train", "part-*.txt")))
    if not base_shards:
        raise SystemExit(f"build_supplement: {args.corpus_dir}/train/part-*.txt: no base corpus shards")
    root = fetch_package(os.path.join(args.out_dir, "pkgs"))
    sentences = supplement_sentences(root, corpus_text, min_tokens=3, max_tokens=200)
    base = [read_lines(path) for path in base_shards]
    in_base = set().union(*map(set, base))
    for path in glob.glob(os.path.join(args.corpus_dir, "heldout", "*.txt")):
        in_base.update(read_lines(path))
    sentences = [s for s in sentences if s not in in_base]

    rng = random.Random(args.seed)
    rng.shuffle(sentences)
    n_heldout = round(len(sentences) * args.heldout_frac)
    heldout, train = sentences[:n_heldout], sentences[n_heldout:]
    os.makedirs(os.path.join(args.out_dir, "gnucash"), exist_ok=True)
    write_lines(os.path.join(args.out_dir, "gnucash", "train.txt"), train)
    write_lines(os.path.join(args.out_dir, "gnucash", "heldout.txt"), heldout)

    # Each base shard gets a share of the copies in proportion to its size, so every shard the trainer reads
    # (one at a time, shuffled within) holds the same fraction of supplement.
    copies = []
    for _ in range(args.copies):
        copies.extend(rng.sample(train, len(train)))
    mix_dir = os.path.join(args.out_dir, "mix")
    os.makedirs(mix_dir, exist_ok=True)
    total, done = sum(map(len, base)), 0
    for path, lines in zip(base_shards, base):
        share = copies[round(len(copies) * done / total): round(len(copies) * (done + len(lines)) / total)]
        done += len(lines)
        write_lines(os.path.join(mix_dir, os.path.basename(path)), lines + share)

    n_tokens = sum(len(s.split()) for s in train)
    stats = {"package": PACKAGE, "train_sentences": len(train), "train_tokens": n_tokens,
             "heldout_sentences": len(heldout), "copies": args.copies,
             "base_tokens": sum(len(s.split()) for lines in base for s in lines),
             "bank_tokens": sum(s.lower().split().count("bank") for s in train)}
    with open(os.path.join(args.out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out_dir, "SOURCES.txt"), "w", encoding="utf-8") as f:
        f.write(f"Second-stage text of the built-in model, mixed into the base corpus ({args.copies} copies):\n"
                f"  Debian {os.path.basename(max(glob.glob(os.path.join(args.out_dir, 'pkgs/debs/*.deb'))))}"
                f": GnuCash Tutorial and Concepts Guide, GnuCash Help (English)\n"
                f"Licence: GNU Free Documentation License 1.1 or later, no invariant sections; "
                f"(c) 2001-2021 GnuCash Documentation Team.\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
