"""The ``elmo-jax train | perplexity | export`` subcommands.

Wiring: ``elmo_jax/cli.py`` calls ``register(subparsers)`` on its ``argparse`` subparsers and then
``args.func(args)``. Each function returns 0 on success; bad input (missing files, bad options,
unwritable run dir, ...) prints one line ``elmo-jax <command>: error: <message>`` to stderr and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..characters import TokenError
from ..options import BiLMOptions, OptionsError
from ..weights import WeightsError


def _errors() -> tuple:
    """The user errors a command reports in one line; imported when one is raised (the trainer loads on use)."""
    from .data import DataError
    from .trainer import TrainError

    return DataError, TrainError, OptionsError, WeightsError, TokenError, OSError, ValueError


def register(subparsers) -> None:
    """Add the train, perplexity and export subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train", help="pretrain (or fine-tune) a biLM as bilm-tf does",
        description="Pretrain a biLM on sharded text (one tokenized sentence per line) with bilm-tf's data, loss "
        "and optimiser (bilm-tf's train_elmo.py; --resume for restart.py). A new run needs --train-prefix, "
        "--vocab and --options; the options' batch_size is the global batch, split over --devices. --out gets "
        "checkpoints/, config.json and metrics.jsonl. With --resume, the run's saved config.json is used and "
        "--vocab, --options, --init-weights, --seed, --log-every, --checkpoint-every and --learning-rate are "
        "ignored; --resume with --train-prefix continues the run on other data (bilm-tf's restart.py with a new "
        "--train_prefix). --resume of a run killed before its first checkpoint starts it from its beginning (with "
        "its config.json, or without one from the flags of a new run), and says so.")
    p.add_argument("--train-prefix", help="glob of training shards, e.g. 'data/*.txt' (quote it); required unless "
                                          "--resume. With --resume: continue the run (params, optimiser, step) on "
                                          "these shards instead, read from their start with a fresh LSTM state; "
                                          "the run's config.json then names them")
    p.add_argument("--vocab", help="vocabulary file, one token per line, frequency-sorted, <S> </S> <UNK> first, "
                                   "n_tokens_vocab lines; required unless --resume")
    p.add_argument("--options", help="options.json (bilm-tf layout, with bilm-tf's training fields such as "
                                     "n_tokens_vocab, batch_size and unroll_steps); required unless --resume")
    p.add_argument("--out", required=True, help="run directory: checkpoints, config.json, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out exactly (params, "
                                                         "optimiser, LSTM state, each batch row's place in the data), "
                                                         "at once whatever the step; with none yet, start the run "
                                                         "from its beginning")
    p.add_argument("--steps", type=int, help="a new run's total steps (default: n_epochs * n_train_tokens / "
                                             "(batch_size * unroll_steps)); with --resume, this many more steps "
                                             "(default: up to the run's total)")
    p.add_argument("--init-weights", help="fine-tune: start from this HDF5 biLM, which must match --options (the "
                                          "softmax starts fresh)")
    p.add_argument("--devices", type=int, help="use the first N local devices (default: all); batch_size must "
                                               "divide evenly over them")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first, in every process (on a managed cluster "
                        "it finds its peers; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default 0)")
    p.add_argument("--log-every", type=int, default=100, help="log and append metrics every N steps (default 100)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint every N steps (default 1000)")
    p.add_argument("--learning-rate", type=float, default=0.2, help="Adagrad learning rate (default 0.2)")
    p.add_argument("--shard-softmax", action="store_true",
                   help="a new run's softmax and its Adagrad state split by rows over the devices instead of copied "
                   "to each (for vocabularies too large for one device; the same numbers). A new run's setting; "
                   "--resume keeps the run's")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the forward and backward pass (default float32); params, optimiser state "
                        "and the loss stay float32. A new run's setting; --resume keeps the run's")
    p.set_defaults(func=train_command)

    p = subparsers.add_parser(
        "perplexity", help="test perplexity with the full softmax (bilm-tf's run_test)",
        description="Full-softmax perplexity of a trained biLM on test shards, as bilm-tf's run_test.py: one "
        "unshuffled pass in windows of --batch-size rows x --unroll-steps tokens, LSTM state carried, the last "
        "partial batch dropped. Prints JSON on stdout: forward, backward and mean perplexity (exp of the mean over "
        "batches of the mean of the directions' losses; bilm-tf's AVERAGE PERPLEXITY), and batches. The softmax "
        "comes from a run directory (published HDF5 files have none).")
    p.add_argument("--test-prefix", required=True, help="glob of test shards, e.g. 'heldout/*.txt' (quote it)")
    p.add_argument("--vocab", required=True, help="the training vocabulary file")
    p.add_argument("--run-dir", help="training run directory (params and softmax of its latest checkpoint); "
                                     "required")
    p.add_argument("--options", help="options.json to use instead of the run's (n_tokens_vocab defaults to the "
                                     "run's)")
    p.add_argument("--weights", help="HDF5 biLM weights to evaluate instead of the run's biLM params, with the "
                                     "run's softmax")
    p.add_argument("--shard-softmax", action="store_true",
                   help="split the softmax by rows over the devices instead of copying it to each (a vocabulary too "
                   "large for one device); on by default for a run trained with --shard-softmax")
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch (default 256, as bilm-tf)")
    p.add_argument("--unroll-steps", type=int, default=1, help="tokens per window (default 1, as bilm-tf)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host, as train --distributed: every process's devices evaluate, each process reads "
                        "only its rows of each batch; process 0 prints the JSON")
    p.set_defaults(func=perplexity_command)

    p = subparsers.add_parser(
        "export", help="write a run's biLM as weights.hdf5 + options.json",
        description="Export the biLM (no softmax) of a run's latest checkpoint in the published HDF5 layout, "
        "loadable by elmo_jax, AllenNLP and bilm-tf (bilm-tf's dump_weights.py, plus the options.json). With "
        "--vocab and --token-embeddings, also bilm-tf's dump_token_embeddings.")
    p.add_argument("run_dir", help="training run directory (its latest checkpoint is exported)")
    p.add_argument("--weights", required=True, help="output HDF5 weights (no softmax)")
    p.add_argument("--options", required=True, help="output options.json (n_characters 262, training fields kept)")
    p.add_argument("--vocab", help="vocabulary file (one token per line) whose token embeddings to write; "
                                   "needs --token-embeddings")
    p.add_argument("--token-embeddings", help="output HDF5 of token embeddings: dataset 'embedding', (n_words, "
                                              "projection_dim), row i = line i of --vocab; needs --vocab")
    p.set_defaults(func=export_command)


def _fail(command: str, message: str) -> None:
    print(f"elmo-jax {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train_command(args: argparse.Namespace) -> int:
    """``elmo-jax train``: a new run from --train-prefix/--vocab/--options, or ``--resume`` of --out; returns 0."""
    try:
        if args.distributed:
            from .trainer import initialize_distributed

            initialize_distributed()
        import jax

        from .trainer import TrainConfig, Trainer, load_config

        new_data = False
        if args.resume and os.path.exists(os.path.join(args.out, "config.json")):
            config = load_config(args.out)
            if args.train_prefix and args.train_prefix != config.train_prefix:
                print(f"elmo-jax train: continuing {args.out} on new data {args.train_prefix} (was "
                      f"{config.train_prefix}), from its start", file=sys.stderr)
                config, new_data = dataclasses.replace(config, train_prefix=args.train_prefix), True
        else:
            missing = [flag for flag, value in (("--train-prefix", args.train_prefix), ("--vocab", args.vocab),
                                                ("--options", args.options)) if not value]
            if missing and args.resume:  # the Trainer starts a run with no checkpoint from its beginning
                _fail("train", f"{args.out}: no config.json to resume (the run never started or was killed before "
                               f"writing it); pass {', '.join(missing)} to start it from its beginning")
            if missing:
                _fail("train", f"{', '.join(missing)} required for a new run (or pass --resume)")
            config = TrainConfig(BiLMOptions.from_path(args.options), args.train_prefix, args.vocab,
                                 learning_rate=args.learning_rate, seed=args.seed, n_steps=args.steps,
                                 log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                                 init_weights=args.init_weights, compute_dtype=args.dtype,
                                 shard_softmax=args.shard_softmax)
        for name in ("steps", "devices", "log_every", "checkpoint_every"):
            value = getattr(args, name)
            if value is not None and value < 1:
                _fail("train", f"--{name.replace('_', '-')} must be >= 1, found {value}")
        devices = None
        if args.devices is not None:
            if jax.process_count() > 1:
                _fail("train", "--devices picks local devices of a one-process run; a multi-host run uses every "
                               "device of every process")
            if args.devices > jax.local_device_count():
                _fail("train", f"--devices {args.devices}: only {jax.local_device_count()} local devices")
            devices = jax.local_devices()[: args.devices]
        trainer = Trainer(config, args.out, resume=args.resume, new_data=new_data, devices=devices)
        trainer.train(args.steps if args.resume else None)
    except _errors() as error:
        _fail("train", str(error))
    return 0


def perplexity_command(args: argparse.Namespace) -> int:
    """``elmo-jax perplexity``: prints the run's full-softmax test perplexities as JSON; returns 0."""
    try:
        if args.distributed:
            from .trainer import initialize_distributed

            initialize_distributed()
        import jax

        from .data import load_vocabulary
        from .evaluate import load_run, perplexity

        if args.run_dir is None:
            _fail("perplexity", "--run-dir is required: the softmax is in the run's checkpoint (published HDF5 "
                                "weights carry no softmax)")
        params, config = load_run(args.run_dir)
        options = config.options
        if args.options:
            found = BiLMOptions.from_path(args.options)
            options = found.replace(training=dataclasses.replace(
                found.training, n_tokens_vocab=found.training.n_tokens_vocab or options.training.n_tokens_vocab))
        if args.weights:
            from ..weights import load_hdf5

            params = {**load_hdf5(args.weights, options), "softmax": params["softmax"]}
        vocab = load_vocabulary(args.vocab, options.training.n_tokens_vocab)
        result = perplexity(params, options, args.test_prefix, vocab, batch_size=args.batch_size,
                            unroll_steps=args.unroll_steps, shard_softmax=args.shard_softmax or config.shard_softmax)
        if jax.process_index() == 0:
            print(json.dumps(result))
    except _errors() as error:
        _fail("perplexity", str(error))
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``elmo-jax export``: writes the run's biLM weights, options.json and optional token embeddings; returns 0."""
    try:
        from .evaluate import export

        if (args.vocab is None) != (args.token_embeddings is None):
            _fail("export", "--vocab and --token-embeddings go together")
        export(args.run_dir, args.weights, args.options, vocab=args.vocab, token_embeddings_out=args.token_embeddings)
    except _errors() as error:
        _fail("export", str(error))
    return 0
