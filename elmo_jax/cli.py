"""The ``elmo-jax`` command line: convert, embed, and (from elmo_jax.train) train, perplexity, export."""

from __future__ import annotations

import argparse
import sys

from .characters import TokenError
from .options import OptionsError
from .weights import WeightsError

USER_ERRORS = (OptionsError, WeightsError, TokenError, OSError, ValueError)


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert weights: published HDF5 -> orbax checkpoint, or back (--to hdf5)",
        description="Convert between the published bilm-tf/AllenNLP HDF5 layout and an orbax checkpoint "
        "directory (params + options.json). The round trip is exact.",
    )
    parser.add_argument("--options", required=True, help="options.json (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--weights", required=True, help="HDF5 weights (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--checkpoint", required=True, help="orbax checkpoint directory (written or read)")
    parser.add_argument("--to", choices=("checkpoint", "hdf5"), default="checkpoint", help="direction (default checkpoint)")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> None:
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
    parser = argparse.ArgumentParser(prog="elmo-jax", description="ELMo in JAX: embed text, convert weights, pretrain.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_parser(subparsers)
    try:
        from .embed_cli import add_embed_parser
    except ImportError:
        pass
    else:
        add_embed_parser(subparsers)
    try:
        from .train.commands import register
    except ImportError:
        pass
    else:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
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
