"""``elmo-jax embed``: a file of tokenized sentences -> HDF5 in the layout of AllenNLP's ``elmo`` command."""

from __future__ import annotations

import argparse
import gc
import os
import time


def add_embed_parser(subparsers) -> None:
    """Add the ``embed`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "embed",
        help="embed a file of tokenized sentences into HDF5 (AllenNLP `elmo` layout)",
        description="Embed INPUT (one sentence per line, UTF-8, whitespace-tokenized unless --tokenizer moses; '-' = "
        "stdin) into OUTPUT, an HDF5 file. --layout allennlp (default) writes what AllenNLP's `elmo` command writes: "
        "one dataset per 0-based line index (\"0\", \"1\", ...) and 'sentence_to_index' (a JSON string mapping each "
        "distinct line to its last index); --layout packed writes one chunked dataset of all tokens' vectors with "
        "per-line offsets and texts. Shapes use layers = n_layers + 1 and dim = 2 * projection_dim of the model. "
        "Stateless: a sentence's vectors never depend on its neighbours (--batch-size changes them by float rounding "
        "at most). Without --model, --options or --weights the built-in English model is used. OUTPUT is written "
        "under a temporary name and renamed when complete; a progress bar goes to stderr (--quiet: none). Bad input "
        "(missing or corrupt files, a line that is not UTF-8, an empty line unless --empty-lines skip, an unknown "
        "--layout, --output-dtype or --tokenizer, an OUTPUT that is a directory or one of the input files) is a "
        "one-line error with exit status 2, before any work where it can be seen then.",
    )
    parser.add_argument("input", help="input text file (one sentence per line), or - for stdin")
    parser.add_argument("output", help="output HDF5 file (replaced if it exists, unless it is an input)")
    parser.add_argument("--model", help="any published model: a directory with options.json and a .hdf5 (bilm-tf, "
                                        "AllenNLP), an NLPL .zip or its directory, an ELMoForManyLangs model "
                                        "directory, or an `elmo-jax convert` checkpoint")
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
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="lanes: sentences run side by side in the packed biLSTM (default by device kind: 256 on "
                             "a CPU, 128 for an LSTM of over 1024 cells, 1024 per accelerator); speed and memory "
                             "only")
    parser.add_argument("--block-steps", type=_positive, default=None,
                        help="time steps per compiled biLSTM block (default 32 on a CPU, 64 elsewhere); speed only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (default float32; bfloat16 for GPU/TPU, outputs stay float32)")
    parser.add_argument("--output-dtype", default="float32", metavar="{float32,float16}",
                        help="dtype of the stored vectors: float32 (default) or float16 (half the file)")
    parser.add_argument("--layout", default="allennlp", metavar="{allennlp,packed}",
                        help="allennlp (default): one dataset per line, as AllenNLP's `elmo` command; packed: one "
                             "chunked dataset of all tokens' vectors with per-line offsets (scales to any corpus). "
                             "elmo_jax.open_embeddings reads both")
    parser.add_argument("--tokenizer", default="whitespace", metavar="{whitespace,moses}",
                        help="whitespace (default): lines are already tokenized; moses: raw text, tokenized as the "
                             "1B Word Benchmark that the published English models were trained on (needs "
                             "sacremoses: pip install 'elmo-jax[moses]'); see docs/tokenization.md")
    parser.add_argument("--empty-lines", choices=("error", "skip"), default="error",
                        help="error (default): stop at the first empty line, naming it; skip: give it a dataset "
                             "with 0 tokens")
    parser.add_argument("--vocab", help="vocabulary file (one token per line) whose token vectors are computed "
                                        "once and kept; speed only, the numbers are unchanged")
    parser.add_argument("--distributed", action="store_true",
                        help="several processes or hosts: start the same command in every process (JAX's "
                             "multi-controller runtime, configured as for `elmo-jax train --distributed`); each "
                             "embeds its share of the lines on its local devices and writes its part beside OUTPUT, "
                             "which then reads like a one-process run")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bar on stderr")
    parser.set_defaults(func=run_embed)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_ARENAS = 2
NEVER_TRIM_BYTES = 2**31 - 1  # mallopt takes an int
TRIM_EVERY_SECONDS = 2.0
TRIM_WARM_UP_SECONDS = 10.0  # resident memory this long into a run is its working set
TRIM_GROWTH_BYTES = 64 << 20  # resident memory this far above the working set: hand free pages back


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc/self/statm), or None where that cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reuse_freed_memory(trim_every: float | None = TRIM_EVERY_SECONDS, trim_growth: int = TRIM_GROWTH_BYTES,
                       warm_up: float = TRIM_WARM_UP_SECONDS) -> bool:
    """glibc: serve large allocations from the heap and keep what is freed for the next ones, in 2 arenas; a daemon
    thread hands free pages back to the system (``malloc_trim``) every ``trim_every`` seconds (None: never) at which
    resident memory lies ``trim_growth`` bytes or more above what it was ``warm_up`` seconds into the run (every
    time, where /proc/self/statm cannot be read).

    The embed's large blocks are made and freed over and over: each block program's run takes a 55.6 MB temporary
    (the built-in model, 256 lanes), each char-CNN insert of 1,024 tokens 41 MB, each gather 25 MB of output.
    Served by mmap (glibc's rule for 32 MB or more; 4 MB or more with the threshold fixed there before), each is
    fresh memory that the kernel faults in and zeroes: 10,000 lines took ~1M page faults and 1.6-1.9 s of system
    time. Kept on the heap, 0.16-0.45M faults and 0.7-1.0 s: the whole process 6.34-6.64 s against 6.64-6.80 s, at
    a peak RSS of 793-845 MB against 706-726 MB. Two arenas shared by all threads, as XLA's workers make the blocks
    that the writer thread frees. Left alone, the heap's free fragments creep up with the corpus (100,000 lines: from
    1,350 MB 4 s in to 1,470 MB at the end, the token table's gates included), which ``malloc_trim`` returns. Each
    trim also hands back the blocks that lie free at that moment, 200-300 MB that the next program runs fault in
    again (on these VMs fresh memory costs ~1-2 ms a MB): trimmed every 2 s as before, 10,000 lines ran 0.17-0.27 s
    slower (3 alternating pairs); now they are not trimmed at all, and 100,000 lines once or twice.
    Process-wide, so only the CLI sets it. Returns whether it was set (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = all([libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES),
                    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)])
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    if done and trim_every:
        import threading

        def trim_forever():
            time.sleep(warm_up)
            working_set = resident_bytes()
            while True:
                time.sleep(trim_every)
                resident = resident_bytes()
                if working_set is None or resident is None or resident >= working_set + trim_growth:
                    trim(0)

        threading.Thread(target=trim_forever, name="malloc_trim", daemon=True).start()
    return done


def enable_compilation_cache() -> str | None:
    """Keep compiled programs between runs in ELMO_JAX_COMPILATION_CACHE (default ~/.cache/elmo_jax/xla; empty:
    off), so that a run after the first one of a model, lane count and device kind does not compile (~1-2 s), and
    their traces in its folder ``programs`` (``Embedder``'s ``program_cache``), so that it does not trace them
    either (~0.3 s). Returns that folder, or None where the cache is off or the user set JAX's own."""
    import jax

    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "elmo_jax", "xla")
    directory = os.environ.get("ELMO_JAX_COMPILATION_CACHE", default)
    if not directory or jax.config.jax_compilation_cache_dir not in (None, directory):  # off, or the user's own
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return os.path.join(directory, "programs")


def run_embed(args) -> None:
    """``elmo-jax embed``: embed ``args.input`` into the HDF5 file ``args.output`` and print a one-line summary."""
    from .characters import Vocabulary
    from .embed import Embedder
    from .embed_output import check_output_options
    from .tokenize import get_tokenizer
    from .weights import check_output_path

    if (args.options is None) != (args.weights is None):
        raise ValueError("--options and --weights go together (leave both out for the built-in English model)")
    if args.model is not None and args.options is not None:
        raise ValueError("give the model as --model PATH or as --options and --weights, not both")
    check_output_options(args.layout, args.output_dtype)
    check_output_path(args.output, inputs=(args.input, args.vocab, args.options, args.weights))
    get_tokenizer(args.tokenizer)  # an unknown name or a missing sacremoses fails before any work
    reuse_freed_memory()
    program_cache = enable_compilation_cache()
    # what start-up made (JAX and its modules: ~100,000 objects) lives to the end: no collection walks it again (the
    # cyclic collector took 0.21 s of 10,000 lines, 0.12 s of it in two full collections; 0.065 s frozen)
    gc.freeze()
    if args.distributed:
        from .embed_distributed import embed_distributed

        embed_distributed(args, program_cache)
        return
    vocab = Vocabulary.from_file(args.vocab, require_specials=False).words if args.vocab else None
    embedder = Embedder(args.options, args.weights, model=args.model, batch_size=args.batch_size, dtype=args.dtype,
                        vocab=vocab, block_steps=args.block_steps, program_cache=program_cache)
    stats = embedder.embed_file(args.input, args.output, mode=args.mode, empty_lines=args.empty_lines,
                                progress=not args.quiet, tokenizer=args.tokenizer, layout=args.layout,
                                output_dtype=args.output_dtype, model_name=args.model or args.weights or "built-in")
    print(f"wrote {args.output}: {stats['sentences']} sentences, {stats['tokens']} tokens in {stats['seconds']:.1f} s "
          f"({embedder.compilations} compilations)")
