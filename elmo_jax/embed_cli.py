"""``elmo-jax embed``: a file of tokenized sentences -> HDF5 in the layout of AllenNLP's ``elmo`` command."""

from __future__ import annotations

import argparse


def add_embed_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a file of tokenized sentences into HDF5 (AllenNLP `elmo` layout)",
        description="Embed INPUT (one whitespace-tokenized sentence per line, UTF-8; '-' = stdin) into OUTPUT, an "
        "HDF5 file with one dataset per line index (\"0\", \"1\", ...) and 'sentence_to_index', as AllenNLP's "
        "`elmo` command writes. Stateless: a sentence's vectors never depend on its neighbours. OUTPUT is "
        "written under a temporary name and renamed when complete.",
    )
    parser.add_argument("input", help="input text file, or - for stdin")
    parser.add_argument("output", help="output HDF5 file")
    parser.add_argument("--options", help="options.json of the biLM (default: the built-in English model)")
    parser.add_argument("--weights", help="HDF5 weights of the biLM, bilm-tf / AllenNLP layout (default: the "
                                          "built-in English model)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--all", dest="mode", action="store_const", const="all",
                       help="all layers: (layers, n_tokens, dim) per sentence (default)")
    modes.add_argument("--top", dest="mode", action="store_const", const="top", help="top layer: (n_tokens, dim)")
    modes.add_argument("--average", dest="mode", action="store_const", const="average",
                       help="average of the layers: (n_tokens, dim)")
    modes.add_argument("--token", dest="mode", action="store_const", const="token",
                       help="context-free token layer: (n_tokens, dim)")
    parser.set_defaults(mode="all")
    parser.add_argument("--batch-size", type=_positive, default=64, help="sentences per batch (default 64)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (default float32; bfloat16 for GPU/TPU, outputs stay float32)")
    parser.add_argument("--empty-lines", choices=("error", "skip"), default="error",
                        help="an empty line is an error naming it (default), or gets a dataset with 0 tokens")
    parser.add_argument("--vocab", help="vocabulary file (one token per line) whose token vectors are cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=run_embed)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


def run_embed(args) -> None:
    from .characters import Vocabulary
    from .embed import Embedder

    if (args.options is None) != (args.weights is None):
        raise ValueError("--options and --weights go together (leave both out for the built-in English model)")
    vocab = Vocabulary.from_file(args.vocab, require_specials=False).words if args.vocab else None
    embedder = Embedder(args.options, args.weights, batch_size=args.batch_size, dtype=args.dtype, vocab=vocab)
    stats = embedder.embed_file(args.input, args.output, mode=args.mode, empty_lines=args.empty_lines,
                                progress=not args.no_progress)
    print(f"wrote {args.output}: {stats['sentences']} sentences, {stats['tokens']} tokens in {stats['seconds']:.1f} s "
          f"({embedder.compilations} compilations)")
