"""Modern finance text for the built-in model's second training stage, mixed into the base corpus.

    python3 scripts/build_supplement.py WORK_DIR/corpus WORK_DIR/supplement [--copies 8]

The base corpus (``../shared/corpus/build_corpus.sh``) is dictionary, 19th-century commentary, Austen and
Wikipedia leads: it has almost no everyday financial English (6 "interest rates", 2 "money in the bank" in
11.3M tokens), so the model never learned that sense of 'bank', 'deposit' or 'interest'. This adds the English
user manuals of three personal-finance programs, modern prose about bank accounts, deposits, loans and
interest, all under the GNU Free Documentation License:

  Debian gnucash-docs      GnuCash Tutorial and Concepts Guide, GnuCash Help (GnuCash Documentation Team)
  Debian kmymoney-common   The KMyMoney Handbook (the KMyMoney authors, KDE)
  Debian skrooge-common    The Skrooge Handbook (the Skrooge authors, KDE)

Fetches them with ``apt-get download`` (no web, no install) into SUPPLEMENT/pkgs, turns the DocBook paragraphs
into sentences with the base corpus's own normalizer, sentence splitter and tokenizer (``corpus_text.py``),
drops sentences already in the base corpus or repeated, holds out 5% and writes:

  SUPPLEMENT/finance/train.txt        the supplement's training sentences (one tokenized sentence per line)
  SUPPLEMENT/finance/heldout.txt      its held-out sentences (for perplexity on modern finance text)
  SUPPLEMENT/mix/part-*.txt           base shard k + its share of --copies shuffled copies of train.txt
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

# (Debian package, folder of the English DocBook manual in it, its file pattern)
MANUALS = (("gnucash-docs", "usr/share/help/C/gnucash-guide", "*.xml"),
           ("gnucash-docs", "usr/share/help/C/gnucash-help", "*.xml"),
           ("kmymoney-common", "usr/share/doc/HTML/en/kmymoney", "*.docbook"),
           ("skrooge-common", "usr/share/doc/HTML/en/skrooge", "*.docbook"))
PACKAGES = tuple(dict.fromkeys(package for package, _, _ in MANUALS))
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
# Entities of KDE's shared DTD (kdoctools, not in the packages) that the KDE manuals use in sentences.
_KDE_ENTITIES = {"kmymoney": "KMyMoney", "skrooge": "Skrooge", "kde": "KDE", "Qt": "Qt", "ie": "i.e.",
                 "eg": "e.g.", "etc": "etc.", "Ctrl": "Ctrl", "Shift": "Shift", "Alt": "Alt", "Enter": "Enter",
                 "Tab": "Tab", "Up": "Up", "Down": "Down", "Left": "Left", "Right": "Right", "Esc": "Esc",
                 "Del": "Del", "RMB": "right mouse button", "LMB": "left mouse button", "PDF": "PDF", "XML": "XML",
                 "HTML": "HTML", "Linux": "Linux", "Windows": "Windows", "Mac": "Mac", "macOS": "macOS",
                 "UNIX": "UNIX", "URL": "URL", "GUI": "GUI", "SQL": "SQL", "CSV": "CSV", "FAQ": "FAQ"}


def entity_table(manual_dir: str) -> dict[str, str]:
    """name -> text of the manual's own entities (its .dtd files and index.docbook), references expanded."""
    table = dict(_XML_ENTITIES, **_KDE_ENTITIES)
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


def fetch_packages(pkg_dir: str) -> tuple[str, list[str]]:
    """Download and unpack PACKAGES under pkg_dir; returns the unpacked root and the .deb files unpacked."""
    debs, root = os.path.join(pkg_dir, "debs"), os.path.join(pkg_dir, "root")
    os.makedirs(debs, exist_ok=True)
    missing = [p for p in PACKAGES if not glob.glob(os.path.join(debs, f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    unpacked = [max(glob.glob(os.path.join(debs, f"{package}_*.deb"))) for package in PACKAGES]
    for deb in unpacked:
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root, sorted(os.path.basename(deb) for deb in unpacked)


def n_tokens(sentences) -> int:
    """Tokens in whitespace-tokenized sentences."""
    return sum(len(s.split()) for s in sentences)


def supplement_sentences(root: str, corpus_text, min_tokens: int, max_tokens: int) -> dict[str, list[str]]:
    """{manual folder: its tokenized sentences in document order}, no sentence twice over all manuals."""
    seen, out = set(), {}
    for package, folder, pattern in MANUALS:
        manual_dir = os.path.join(root, folder)
        if not os.path.isdir(manual_dir):
            raise SystemExit(f"build_supplement: {manual_dir}: not found in {package}; expected the English "
                             f"DocBook manual there")
        entities, sentences = entity_table(manual_dir), out.setdefault(folder, [])
        for path in sorted(glob.glob(os.path.join(manual_dir, pattern))):
            if os.path.basename(path) in SKIP_FILES:
                continue
            for paragraph in docbook_paragraphs(path, entities):
                for sentence in corpus_text.split_sentences(corpus_text.normalize(paragraph)):
                    tokens = corpus_text.tokenize(sentence)
                    line = " ".join(tokens)
                    if corpus_text.good_sentence(tokens, min_tokens, max_tokens) and line not in seen:
                        seen.add(line)
                        sentences.append(line)
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
    root, debs = fetch_packages(os.path.join(args.out_dir, "pkgs"))
    per_manual = supplement_sentences(root, corpus_text, min_tokens=3, max_tokens=200)
    base = [read_lines(path) for path in base_shards]
    in_base = set().union(*map(set, base))
    for path in glob.glob(os.path.join(args.corpus_dir, "heldout", "*.txt")):
        in_base.update(read_lines(path))
    per_manual = {folder: [s for s in lines if s not in in_base] for folder, lines in per_manual.items()}
    sentences = [s for lines in per_manual.values() for s in lines]

    rng = random.Random(args.seed)
    rng.shuffle(sentences)
    n_heldout = round(len(sentences) * args.heldout_frac)
    heldout, train = sentences[:n_heldout], sentences[n_heldout:]
    os.makedirs(os.path.join(args.out_dir, "finance"), exist_ok=True)
    write_lines(os.path.join(args.out_dir, "finance", "train.txt"), train)
    write_lines(os.path.join(args.out_dir, "finance", "heldout.txt"), heldout)

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

    stats = {"packages": debs, "copies": args.copies,
             "sentences_per_manual": {folder: len(lines) for folder, lines in per_manual.items()},
             "tokens_per_manual": {folder: n_tokens(lines) for folder, lines in per_manual.items()},
             "train_sentences": len(train), "train_tokens": n_tokens(train),
             "heldout_sentences": len(heldout), "heldout_tokens": n_tokens(heldout),
             "base_tokens": sum(map(n_tokens, base)),
             "bank_tokens_in_train": sum(s.lower().split().count("bank") for s in train)}
    with open(os.path.join(args.out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out_dir, "SOURCES.txt"), "w", encoding="utf-8") as f:
        f.write(f"Second-stage text of the built-in model, mixed into the base corpus ({args.copies} copies):\n")
        f.writelines(f"  Debian {deb}\n" for deb in debs)
        f.write("English manuals: GnuCash Tutorial and Concepts Guide and GnuCash Help ((c) 2001-2021 GnuCash "
                "Documentation Team, GFDL 1.1 or later); The KMyMoney Handbook and The Skrooge Handbook (their "
                "authors, KDE; GFDL 1.2 or later). No invariant sections.\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
