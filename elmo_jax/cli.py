"""The ``elmo-jax`` command line: convert, embed, and (from elmo_jax.train) train, perplexity, export."""

from __future__ import annotations

import argparse
import sys

from .characters import TokenError
from .options import OptionsError
from .weights import WeightsError

USER_ERRORS = (OptionsError, WeightsError, TokenError, OSError, ValueError)


def add_convert_parser(subparsers) -> None:
    """Add the ``convert`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert weights: published HDF5 -> orbax checkpoint, or back (--to hdf5)",
        description="Convert between the published bilm-tf/AllenNLP HDF5 layout and an orbax checkpoint "
        "directory (params + options.json). The round trip is exact. --to checkpoint (default) reads --options "
        "and --weights and writes --checkpoint; --to hdf5 reads --checkpoint and writes --weights and --options "
        "(without the training fields). `python convert_weights.py` takes the same arguments.",
    )
    parser.add_argument("--options", required=True,
                        help="options.json (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--weights", required=True,
                        help="HDF5 weights (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--checkpoint", required=True,
                        help="orbax checkpoint directory (written for --to checkpoint, read for --to hdf5)")
    parser.add_argument("--to", choices=("checkpoint", "hdf5"), default="checkpoint",
                        help="direction: checkpoint (default) or hdf5")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> None:
    """``elmo-jax convert``: HDF5 + options.json -> orbax checkpoint, or back with ``--to hdf5``."""
    from .bilm import BiLM
    from .weights import save_checkpoint, save_hdf5, save_options

    if args.to == "checkpoint":
        model = BiLM.from_hdf5(args.options, args.weights)
        save_checkpoint(args.checkpoint, model.params, model.options)
        print(f"wrote orbax checkpoint {args.checkpoint} from {args.weights}")
    else:
        model = BiLM.from_checkpoint(args.checkpoint)
        save_hdf5(model.params, model.options, args.weights)
        save_options(model.options, args.options)
        print(f"wrote {args.weights} and {args.options} from {args.checkpoint}")


def build_parser() -> argparse.ArgumentParser:
    """The ``elmo-jax`` parser: subcommands embed, convert, train, perplexity, export (the README's order)."""
    parser = argparse.ArgumentParser(
        prog="elmo-jax",
        description="ELMo in JAX: embed text with a published or the built-in biLM, convert weights, pretrain, "
        "evaluate and export biLMs.",
        epilog="Run 'elmo-jax COMMAND --help' for a command's options. Bad input (missing or corrupt files, "
        "options that do not match the weights, unwritable output) is a one-line error on stderr with exit "
        "status 2.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        from .embed_cli import add_embed_parser
    except ImportError:
        pass
    else:
        add_embed_parser(subparsers)
    add_convert_parser(subparsers)
    try:
        from .train.commands import register
    except ImportError:
        pass
    else:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``elmo-jax`` with ``argv`` (default: sys.argv[1:]); returns the exit status (0, 2 bad input, 130 ^C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"elmo-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elmo-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
