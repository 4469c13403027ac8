"""``elmo-jax embed``: a file of tokenized sentences -> HDF5 in the layout of AllenNLP's ``elmo`` command."""

from __future__ import annotations

import argparse


def add_embed_parser(subparsers) -> None:
    """Add the ``embed`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "embed",
        help="embed a file of tokenized sentences into HDF5 (AllenNLP `elmo` layout)",
        description="Embed INPUT (one whitespace-tokenized sentence per line, UTF-8; '-' = stdin) into OUTPUT, an "
        "HDF5 file with one float32 dataset per 0-based line index (\"0\", \"1\", ...) and 'sentence_to_index' "
        "(a JSON string mapping each distinct line to its first index), as AllenNLP's `elmo` command writes. "
        "Shapes use layers = n_layers + 1 and dim = 2 * projection_dim of the model. Stateless: a sentence's "
        "vectors never depend on its neighbours (--batch-size changes them by float rounding at most). Without "
        "--options and --weights the built-in English model is used. OUTPUT is written under a temporary name and "
        "renamed when complete; progress goes to stderr. Bad input (missing or corrupt files, a line that is not "
        "UTF-8, an empty line unless --empty-lines skip) is a one-line error with exit status 2.",
    )
    parser.add_argument("input", help="input text file (one tokenized sentence per line), or - for stdin")
    parser.add_argument("output", help="output HDF5 file (replaced if it exists)")
    parser.add_argument("--options", help="options.json of the biLM; give it with --weights, or neither for the "
                                          "built-in English model (default)")
    parser.add_argument("--weights", help="HDF5 weights of the biLM, bilm-tf / AllenNLP layout; give it with "
                                          "--options, or neither for the built-in English model (default)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--all", dest="mode", action="store_const", const="all",
                       help="all layers: (layers, n_tokens, dim) per sentence (default)")
    modes.add_argument("--top", dest="mode", action="store_const", const="top", help="top layer: (n_tokens, dim)")
    modes.add_argument("--average", dest="mode", action="store_const", const="average",
                       help="average of the layers: (n_tokens, dim)")
    modes.add_argument("--token", dest="mode", action="store_const", const="token",
                       help="context-free token layer: (n_tokens, dim)")
    parser.set_defaults(mode="all")
    parser.add_argument("--batch-size", type=_positive, default=64,
                        help="sentences per batch (default 64); speed and memory only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (default float32; bfloat16 for GPU/TPU, outputs stay float32)")
    parser.add_argument("--empty-lines", choices=("error", "skip"), default="error",
                        help="error (default): stop at the first empty line, naming it; skip: give it a dataset "
                             "with 0 tokens")
    parser.add_argument("--vocab", help="vocabulary file (one token per line) whose token vectors are computed "
                                        "once and cached; speed only, the numbers are unchanged")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=run_embed)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


def run_embed(args) -> None:
    """``elmo-jax embed``: embed ``args.input`` into the HDF5 file ``args.output`` and print a one-line summary."""
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
