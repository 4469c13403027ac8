"""The ``elmo-jax`` command line: convert, embed, and (from elmo_jax.train) train, perplexity, export."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .characters import TokenError
from .options import OptionsError
from .weights import WeightsError

USER_ERRORS = (OptionsError, WeightsError, TokenError, OSError, ValueError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``timeout``, ``kill``), raised in the main thread by the installed command,
    so that it ends as ^C does: temporary files removed, no output that looks complete, the other processes of a
    ``--distributed`` run told."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def add_convert_parser(subparsers) -> None:
    """Add the ``convert`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert weights: any published model -> orbax checkpoint, or to the bilm-tf HDF5 layout (--to hdf5)",
        description="Store a model in elmo_jax's own format (an orbax checkpoint directory: params, options.json "
        "and, for ELMoForManyLangs, its dictionaries), or write the bilm-tf/AllenNLP HDF5 layout. The source is "
        "--model PATH (any family: an options.json + .hdf5 directory, an NLPL .zip or its directory, an "
        "ELMoForManyLangs model directory), or --options with --weights, or --checkpoint for --to hdf5. The "
        "round trip is exact. --to hdf5 fits the bilm-tf family only (ELMoForManyLangs models have their own "
        "char dictionary and a word embedding). `python convert_weights.py` takes the same arguments.",
    )
    parser.add_argument("--model", help="any published model to read (BiLM.from_pretrained)")
    parser.add_argument("--options", help="options.json (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--weights", help="HDF5 weights (read for --to checkpoint, written for --to hdf5)")
    parser.add_argument("--checkpoint", help="orbax checkpoint directory (written for --to checkpoint, read for "
                                             "--to hdf5 without --model)")
    parser.add_argument("--to", choices=("checkpoint", "hdf5"), default="checkpoint",
                        help="what to write: checkpoint (default) or hdf5")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> None:
    """``elmo-jax convert``: any model -> orbax checkpoint, or -> HDF5 + options.json with ``--to hdf5``."""
    from .bilm import BiLM
    from .weights import save_checkpoint, save_hdf5, save_options

    pair = (args.options is not None, args.weights is not None)
    if args.to == "checkpoint":
        if args.checkpoint is None:
            raise ValueError("--to checkpoint needs --checkpoint DIR to write")
        if pair != ((False, False) if args.model else (True, True)):
            raise ValueError("give the model to read as --model PATH, or as --options and --weights")
        model = BiLM.from_pretrained(args.model) if args.model else BiLM.from_hdf5(args.options, args.weights)
        save_checkpoint(args.checkpoint, model.params, model.options, model.characters, model.family)
        print(f"wrote orbax checkpoint {args.checkpoint} from {args.model or args.weights} ({model.family})")
    else:
        if pair != (True, True):
            raise ValueError("--to hdf5 needs --options and --weights to write")
        if (args.model is None) == (args.checkpoint is None):
            raise ValueError("--to hdf5 reads --model PATH or --checkpoint DIR (one of them)")
        model = BiLM.from_pretrained(args.model) if args.model else BiLM.from_checkpoint(args.checkpoint)
        save_hdf5(model.params, model.options, args.weights)
        save_options(model.options, args.options)
        print(f"wrote {args.weights} and {args.options} from {args.model or args.checkpoint}")


def build_parser() -> argparse.ArgumentParser:
    """The ``elmo-jax`` parser: subcommands embed, convert, train, perplexity, export (the README's order)."""
    parser = argparse.ArgumentParser(
        prog="elmo-jax",
        description="ELMo in JAX: embed text with a published or the built-in biLM, convert weights, pretrain, "
        "evaluate and export biLMs.",
        epilog="Run 'elmo-jax COMMAND --help' for a command's options. Bad input (missing or corrupt files, "
        "options that do not match the weights, unwritable output) is a one-line error on stderr with exit "
        "status 2; ^C or SIGTERM ends a command with status 130 or 143, leaving no partial output.",
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
    return run_command(build_parser().parse_args(argv))


def run_command(args) -> int:
    """Run parsed ``elmo-jax`` arguments; returns the exit status (0, 2 bad input, 130 ^C, 143 SIGTERM)."""
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"elmo-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"elmo-jax {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"elmo-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def console() -> None:
    """The installed ``elmo-jax`` command: ``main``, and after a one-process embed, an exit that
    skips tearing the interpreter and JAX's runtime down (freeing the device ring, tables and compiled programs
    one by one: 0.15-0.2 s of a 6.4 s run of 10,000 lines). Its output file is complete by then (written, closed
    and renamed), or after an error its temporary file removed. SIGTERM ends it as ^C does (``Terminated``), not at
    once with its temporary files left behind."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    args = build_parser().parse_args()
    code = run_command(args)
    if args.command == "embed" and not args.distributed:  # whatever the outcome: a file HDF5 failed to close
        sys.stdout.flush()  # (weights.write_atomic) is then never freed, which would crash it
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
