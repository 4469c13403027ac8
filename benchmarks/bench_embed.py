"""Embedding speed of elmo_jax, side by side with AllenNLP and bilm-tf in the same run.

Three measurements (one JSON line each):

    # the model: warm passes of Embedder.embed_sentences over the same sentences, vs the peers' warm passes
    python benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 300 --compare-allennlp

    # the main job: `elmo-jax embed IN OUT` timed as a whole process (start-up, compilation, writing), built-in
    # model, vs the peers' warm model-only throughput on the same sentences and weights
    python benchmarks/bench_embed.py --whole-process --size builtin --sentences heldout.txt --max-sentences 10000 \\
        --compare-allennlp --compare-tf

    # the host side alone: reading, tokenizing, char ids, dedupe, lane packing, output assembly and writing,
    # with a stand-in device step that returns zeros
    python benchmarks/bench_embed.py --host-only --size builtin --sentences heldout.txt --max-sentences 100000

Random weights at the published sizes come from ../shared/bench/make_weights.py (exact original layout);
``--size builtin`` is the model shipped in the package. "Peak" is a 2048 x 2048 float32 matmul measured in
this process. FLOPs count the biLSTM steps a sentence needs: one a token and direction, the packed slots' ``n``
steps (the state after <S> / </S> is the same for every sentence and computed once a block; before 2026-12-04's
sentence start state, ``n + 1``; padding not counted), each step's FLOPs the model's (on a CPU the Embedder computes
the first layer's input half once per distinct token, not once per step, since 2026-12-04's token gates; the count
stays the model's, as a model-FLOPs utilization does), and, where reported, the char CNN + highway once per
distinct token. On a GPU, ``--dtype both`` measures float32 and
bfloat16 in one command, each against the matmul peak measured in its own dtype:

    python benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 20000 --dtype both

ELMoForManyLangs at its published size (the package's cnn_50_100_512_4096_sample.json: word_dim 100, char_dim
50, 2048 filters, 2 highway, 2x4096_512), random weights written by the original package's own code
(../shared/bench/make_efml_model.py, ~2 min the first time), against the original ``sents2elmo`` at batch 64:

    python benchmarks/bench_embed.py --size efml --max-sentences 200 --compare-efml
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from elmo_jax import BiLM, BiLMOptions
from elmo_jax.embed import Embedder
from elmo_jax.lanes import slot_steps
from elmo_jax.pretrained import default_model_files
from peak import matmul_peak

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_BENCH = pathlib.Path(os.environ.get("ELMO_JAX_BENCH", ROOT.parent / "shared" / "bench"))
SIZES = ["builtin", "2x4096_512_2048cnn_2xhighway", "2x2048_256_2048cnn_1xhighway", "2x1024_128_2048cnn_1xhighway",
         "small", "efml"]


def first_lines(path: str, n: int) -> list[str]:
    """The first ``n`` non-blank lines of ``path``, cycled if it has fewer."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return (lines * (-(-n // len(lines))))[:n]


def token_layer_flops(options: BiLMOptions) -> float:
    """FLOPs of char CNN + highway + projection for one token."""
    c = options.char_cnn
    cnn = sum(2 * (c.max_characters_per_token - w + 1) * w * c.char_embedding_dim * n for w, n in c.filters)
    highway = c.n_highway * 2 * (2 * c.n_filters * c.n_filters)
    return cnn + highway + 2 * (options.tokens.word_dim + c.n_filters) * options.lstm.projection_dim


def slot_tokens(sentences) -> int:
    """The biLSTM steps (a step of all layers, both directions) that the sentences need: their packed slots'."""
    return int(slot_steps(np.fromiter(map(len, sentences), np.int64)).sum())


def lstm_flops(options: BiLMOptions) -> float:
    """FLOPs of all LSTM layers, both directions, for one time step of one sentence."""
    lstm = options.lstm
    return 2 * lstm.n_layers * (2 * (2 * lstm.projection_dim) * 4 * lstm.dim + 2 * lstm.dim * lstm.projection_dim)


def model_files(size: str, directory: pathlib.Path, args) -> tuple[pathlib.Path, ...]:
    """(options.json, weights.hdf5) of the built-in model or of random weights at a published size; (model
    directory,) for ELMoForManyLangs."""
    if size == "builtin":
        return tuple(map(pathlib.Path, default_model_files()))
    if size == "efml":
        target = directory / "efml-full"
        if not (target / "encoder.pkl").exists():
            subprocess.run([args.efml_python, str(SHARED_BENCH / "make_efml_model.py"), "--config", "full", "--seed",
                            "12", "--text", str(SHARED_BENCH / "sentences.txt"), "--out", str(target)],
                           check=True, stdout=sys.stderr)
        return (target,)
    target = directory / size
    if not (target / "weights.hdf5").exists():
        subprocess.run([sys.executable, str(SHARED_BENCH / "make_weights.py"), "--size", size, "--out", str(target)],
                       check=True, stdout=sys.stderr)
    return target / "options.json", target / "weights.hdf5"


def run_peer(script: str, python: str, files, sentences: str, args, out: str) -> dict:
    """Run a peer harness of ../shared/bench (ref_allennlp.py, ref_tf.py, ref_efml.py): warm, timed passes."""
    model = ["--model", str(files[0])] if len(files) == 1 else ["--options", str(files[0]), "--weights", str(files[1])]
    command = [python, str(SHARED_BENCH / script), *model, "--sentences", sentences, "--batch-size",
               str(args.peer_batch_size), "--threads", str(os.cpu_count()), "--repeats", str(args.repeats),
               "--out", out]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def requested_peers(args) -> list[tuple[str, str, str]]:
    """(name, harness script, python) of each peer the flags ask for."""
    peers = [("allennlp", "ref_allennlp.py", args.allennlp_python)] if args.compare_allennlp else []
    peers += [("tf", "ref_tf.py", args.tf_python)] if args.compare_tf else []
    peers += [("efml", "ref_efml.py", args.efml_python)] if args.compare_efml else []
    return peers


def compare_peer(peer: tuple[str, str, str], args, files, sentence_file: str, read_ours) -> dict:
    """A peer's tokens/s and its max abs difference from ours (read_ours(i) -> array i)."""
    name, script, python = peer
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_peer(script, python, files, sentence_file, args, os.path.join(tmp, "ref.hdf5"))
        with h5py.File(os.path.join(tmp, "ref.hdf5"), "r") as f:
            diff = max(float(np.abs(f[key][...] - read_ours(int(key))).max()) for key in f if key.isdigit())
    return {f"{name}_tokens_per_s": reference["tokens_per_s"], f"{name}_seconds_all": reference["seconds_all"],
            f"max_abs_diff_vs_{name}": diff}


def compare_peers(args, files, sentence_file: str, read_ours) -> dict:
    """Each requested peer's tokens/s and its max abs difference from ours (read_ours(i) -> array i)."""
    out = {}
    for peer in requested_peers(args):
        out.update(compare_peer(peer, args, files, sentence_file, read_ours))
    return out


def route_gathers(embedder: Embedder, route: str) -> None:
    """An experiment on the Embedder's private gather (the package has no such option yet), for a GPU, where
    copying the gathered outputs to the host bounded the Embedder (README, Performance):
    - device: as the package does, the host copies each gather when it reads it (``np.asarray``);
    - copy_async: each gather's copy to the host starts as soon as it is dispatched (``copy_to_host_async``);
    - pinned_host: each gather is put into the device's pinned host memory as soon as it is dispatched.
    """
    if route == "device":
        return
    gather = embedder._gather

    def routed(*args):
        out = gather(*args)
        if route == "copy_async":
            out.copy_to_host_async()
            return out
        return jax.device_put(out, out.sharding.with_memory_kind("pinned_host"))

    embedder._gather = routed


def timed_passes(embedder: Embedder, sentences, mode: str, repeats: int) -> tuple[list, float, list[float]]:
    """(the first pass's outputs, its seconds, the seconds of ``repeats`` warm passes) of embed_sentences; the
    first pass compiles and fills the token table."""
    start = time.perf_counter()
    outputs = list(embedder.embed_sentences(sentences, mode=mode))
    first_pass = time.perf_counter() - start
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in embedder.embed_sentences(sentences, mode=mode):
            pass
        passes.append(time.perf_counter() - start)
    return outputs, first_pass, passes


def model_benchmark(args, files, sentences, sentence_file) -> dict:
    """Warm passes of embed_sentences (compiled in a first pass): the model's speed and its fraction of peak."""
    peak = matmul_peak(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    embedder = Embedder(*files, batch_size=args.lanes, block_steps=args.block_steps, dtype=args.dtype)
    route_gathers(embedder, args.gathers)
    outputs, first_pass, passes = timed_passes(embedder, sentences, args.mode, args.repeats)
    seconds = min(passes)
    options, n_tokens = embedder.options, sum(map(len, sentences))
    bilstm = lstm_flops(options) * slot_tokens(sentences)
    distinct = len({t for s in sentences for t in s}) + 2
    result = {
        "what": "model, warm passes", "size": args.size, "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(), "dtype": args.dtype, "mode": args.mode, "gathers": args.gathers,
        "lanes": embedder.lanes,
        "block_steps": embedder.block_steps, "sentences": len(sentences), "tokens": n_tokens,
        "seconds": round(seconds, 4), "seconds_all": [round(s, 4) for s in passes],
        "tokens_per_s": round(n_tokens / seconds, 1), "first_pass_seconds": round(first_pass, 2),
        "compilations": embedder.compilations,
        "bilstm_gflop_per_token": round(bilstm / n_tokens / 1e9, 4),
        "bilstm_gflops": round(bilstm / seconds / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "bilstm_fraction_of_peak": round(bilstm / seconds / peak, 3),
        "token_layer_gflop_first_pass": round(token_layer_flops(options) * distinct / 1e9, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    result.update(compare_peers(args, files, sentence_file, lambda i: outputs[i]))
    return result


def whole_process_benchmark(args, files, sentences, sentence_file) -> dict:
    """`elmo-jax embed IN OUT` as a user runs it, timed from process start to exit: the best of ``--repeats`` runs,
    each into a new directory (the peers' figure is their best warm pass of as many); all runs are reported. A run
    after the first one on a machine loads its programs' traces and compiled code from the CLI's caches, as a
    user's second run does. With peers, our runs are spread between theirs (e.g. ours, AllenNLP, ours, bilm-tf,
    ours; "order"): each peer takes minutes, and this machine's speed moves in phases of minutes, which all our runs
    back to back could fall in."""
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--quiet", "--layout", args.layout, "--output-dtype", args.output_dtype, "--dtype", args.dtype]
        if args.size != "builtin":
            flags += ["--model", str(files[0])] if len(files) == 1 else ["--options", str(files[0]), "--weights",
                                                                           str(files[1])]
        if args.lanes:
            flags += ["--batch-size", str(args.lanes)]
        # the child's own peak RSS: GNU time waits for it alone. A child's ru_maxrss from getrusage(RUSAGE_CHILDREN)
        # would include this process's size when it forked (Linux keeps the larger), ~2.6 GB here at 100,000 lines
        timer = shutil.which("time")
        timed = [timer, "-f", "maxrss_kb=%M"] if timer else []
        runs = []  # (seconds, peak RSS in KB, summary line, output file) of each run
        peers, compared, order = requested_peers(args), {}, []
        # our runs in len(peers) + 1 groups as even as can be, a peer after each group but the last
        groups = [len(g) for g in np.array_split(np.arange(args.repeats), len(peers) + 1)]
        for group, peer in itertools.zip_longest(groups, peers):
            for _ in range(group or 0):
                out = os.path.join(tmp, str(len(runs)), "out.hdf5")
                os.makedirs(os.path.dirname(out))
                start = time.perf_counter()
                done = subprocess.run([*timed, sys.executable, "-m", "elmo_jax.cli", "embed", sentence_file, out,
                                       *flags], check=True, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                found = re.findall(r"^maxrss_kb=(\d+)$", done.stderr, re.MULTILINE)
                runs.append((seconds, int(found[-1]) if found else None, done.stdout.strip().splitlines()[-1], out))
                order.append("elmo_jax")
            if peer is not None:
                from elmo_jax.embed_output import open_embeddings

                with open_embeddings(runs[0][3]) as ours:
                    compared.update(compare_peer(peer, args, files, sentence_file,
                                                 lambda i: np.asarray(ours[i], np.float32)))
                order.append(peer[0])
        seconds, _, summary, out = min(runs)
        found = all(rss is not None for _, rss, _, _ in runs)
        peak_rss_kb = max(rss for _, rss, _, _ in runs) if found else resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss
        compilations = int(re.search(r"\((\d+) compilations\)", summary).group(1))
        n_tokens = sum(map(len, sentences))
        options = BiLM.from_pretrained(files[0]).options if len(files) == 1 else BiLMOptions.from_path(files[0])
        result = {
            "what": "elmo-jax embed, whole process", "size": args.size, "device": jax.devices()[0].device_kind,
            "layout": args.layout, "output_dtype": args.output_dtype, "sentences": len(sentences),
            "tokens": n_tokens, "seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1),
            "seconds_all": [round(run[0], 2) for run in runs], "compilations": compilations, "summary": summary,
            "peak_rss_mb": round(peak_rss_kb / 1024),
            "peak_rss_of": "the process, the most of all runs (GNU time)" if found else
            "getrusage(RUSAGE_CHILDREN): at least this benchmark's own size",
            "file_mb": round(os.path.getsize(out) / 2**20, 1),
            "bilstm_fraction_of_peak": round(lstm_flops(options) * slot_tokens(sentences) / seconds / peak, 3),
            "matmul_peak_gflops": round(peak / 1e9, 1),
        }
        if peers:
            result.update(compared, order=order)
    return result


def host_benchmark(args, files, sentences, sentence_file) -> dict:
    """The host side alone, with a stand-in device step (zeros): embed_file as a whole pass (``--sink file``), or
    reading, tokenizing and everything up to the arrays the writer would get (``--sink none``: no disk)."""
    from elmo_jax.embed import _read_lines
    from elmo_jax.tokenize import get_tokenizer

    embedder = Embedder(*files, batch_size=args.lanes, block_steps=args.block_steps, stand_in_device=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.sink == "file":
            stats = embedder.embed_file(sentence_file, os.path.join(tmp, "out.hdf5"), progress=False,
                                        layout=args.layout, output_dtype=args.output_dtype, mode=args.mode)
        else:
            split = get_tokenizer("whitespace")
            stats = {"sentences": 0, "tokens": 0}
            lines = (split(text) for _, text in _read_lines(sentence_file))
            for rows, lengths in embedder.embed_rows(lines, args.mode, output_dtype=args.output_dtype,
                                                     validate=False):
                stats["sentences"] += len(lengths)
                stats["tokens"] += len(rows)
        seconds = time.perf_counter() - start
    return {"what": "host side alone (stand-in device step)", "size": args.size, "sink": args.sink,
            "layout": args.layout if args.sink == "file" else None, "mode": args.mode,
            "output_dtype": args.output_dtype, "lanes": embedder.lanes, "sentences": stats["sentences"],
            "tokens": stats["tokens"], "seconds": round(seconds, 2),
            "tokens_per_s": round(stats["tokens"] / seconds, 1),
            "output_gb_per_s": round(stats["tokens"] * embedder.options.output_dim
                                     * (embedder.options.n_representation_layers if args.mode == "all" else 1)
                                     * np.dtype(args.output_dtype).itemsize / seconds / 1e9, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="builtin", choices=SIZES)
    parser.add_argument("--sentences", default=str(SHARED_BENCH / "sentences.txt"),
                        help="one tokenized sentence per line")
    parser.add_argument("--max-sentences", type=int, default=200, help="the first N sentences (cycled if fewer)")
    parser.add_argument("--whole-process", action="store_true", help="time `elmo-jax embed IN OUT` as a process")
    parser.add_argument("--host-only", action="store_true", help="time the host side with a stand-in device step")
    parser.add_argument("--lanes", type=int, default=None, help="Embedder batch_size (lanes); default by device")
    parser.add_argument("--block-steps", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32",
                        help="compute dtype; both: float32, then bfloat16 (one JSON line each; for a GPU)")
    parser.add_argument("--layout", choices=["allennlp", "packed"], default="allennlp")
    parser.add_argument("--output-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--mode", choices=["all", "top", "average", "token"], default="all",
                        help="the layers returned, by the model and --host-only benchmarks (the peers return all)")
    parser.add_argument("--gathers", choices=["device", "copy_async", "pinned_host"], default="device",
                        help="the model benchmark: how the gathered outputs reach the host (an experiment, see "
                             "route_gathers)")
    parser.add_argument("--sink", choices=["file", "none"], default="file",
                        help="--host-only: write the HDF5 file (default), or stop at the writer's input (no disk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-batch-size", type=int, default=64)
    parser.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "elmo-jax-bench-weights"))
    parser.add_argument("--compare-allennlp", action="store_true")
    parser.add_argument("--allennlp-python", default="/tmp/elmo-bench-venv/bin/python",
                        help="python of the venv made by ../shared/bench/setup.sh")
    parser.add_argument("--compare-tf", action="store_true", help="also run bilm-tf's graph (ref_tf.py)")
    parser.add_argument("--tf-python", default="/tmp/elmo-bench-tf-venv/bin/python",
                        help="python of the venv made by ../shared/bench/setup.sh --tf")
    parser.add_argument("--compare-efml", action="store_true",
                        help="also run the original ELMoForManyLangs (ref_efml.py; needs --size efml)")
    parser.add_argument("--efml-python", default="/tmp/elmo-bench-efml-venv/bin/python",
                        help="python of the venv made by ../shared/bench/setup.sh --efml")
    args = parser.parse_args()
    if (args.size == "efml") != args.compare_efml and (args.compare_efml or args.compare_allennlp or args.compare_tf):
        parser.error("--compare-efml goes with --size efml, and --compare-allennlp/--compare-tf with the others")
    if args.mode != "all" and (args.compare_efml or args.compare_allennlp or args.compare_tf):
        parser.error("--compare-* compares all layers: leave --mode at all")

    files = model_files(args.size, pathlib.Path(args.weights_dir), args)
    lines = first_lines(args.sentences, args.max_sentences)
    with tempfile.TemporaryDirectory() as tmp:
        sentence_file = os.path.join(tmp, "sentences.txt")
        with open(sentence_file, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        sentences = [line.split() for line in lines]
        run = host_benchmark if args.host_only else whole_process_benchmark if args.whole_process else model_benchmark
        for dtype in ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]:
            result = run(argparse.Namespace(**{**vars(args), "dtype": dtype}), files, sentences, sentence_file)
            for name in ("allennlp", "tf", "efml"):
                if f"{name}_tokens_per_s" in result:
                    result[f"speedup_vs_{name}"] = round(result["tokens_per_s"] / result[f"{name}_tokens_per_s"], 2)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
