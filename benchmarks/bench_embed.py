"""Embedding speed of elmo_jax's Embedder, side by side with AllenNLP in the same run.

    python benchmarks/bench_embed.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 200 \\
        --compare-allennlp [--compare-tf]

Random weights at the published sizes are written by ../shared/bench/make_weights.py (exact original
layout). Prints one JSON line with tokens/s, compilations, compile time, peak memory, the model's
FLOP/s and its fraction of the machine's float32 matmul peak measured in this run; with
--compare-allennlp also AllenNLP's tokens/s on the same sentences and batch size, the speed ratio and
the max abs difference of all activations. Timing covers char ids + biLM of every batch of a pass
(as the AllenNLP harness), fastest of --repeats passes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from elmo_jax import BiLMOptions
from elmo_jax.embed import Embedder

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_BENCH = pathlib.Path(os.environ.get("ELMO_JAX_BENCH", ROOT.parent / "shared" / "bench"))


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a jitted n x n matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def token_layer_flops(options: BiLMOptions) -> float:
    """FLOPs of char CNN + highway + projection for one token."""
    c = options.char_cnn
    cnn = sum(2 * (c.max_characters_per_token - w + 1) * w * c.char_embedding_dim * n for w, n in c.filters)
    highway = c.n_highway * 2 * (2 * c.n_filters * c.n_filters)
    return cnn + highway + 2 * c.n_filters * options.lstm.projection_dim


def lstm_flops(options: BiLMOptions) -> float:
    """FLOPs of all LSTM layers, both directions, for one time step of one sentence."""
    lstm = options.lstm
    return 2 * lstm.n_layers * (2 * (2 * lstm.projection_dim) * 4 * lstm.dim + 2 * lstm.dim * lstm.projection_dim)


def make_weights(size: str, directory: pathlib.Path) -> pathlib.Path:
    target = directory / size
    if not (target / "weights.hdf5").exists():
        subprocess.run([sys.executable, str(SHARED_BENCH / "make_weights.py"), "--size", size, "--out", str(target)],
                       check=True, stdout=sys.stderr)
    return target


def run_peer(script: str, python: str, weights: pathlib.Path, sentences: str, args, out: str) -> dict:
    """Run a peer harness of ../shared/bench (ref_allennlp.py or ref_tf.py) on the same sentences and batch size."""
    command = [python, str(SHARED_BENCH / script), "--options", str(weights / "options.json"),
               "--weights", str(weights / "weights.hdf5"), "--sentences", sentences, "--batch-size",
               str(args.batch_size), "--threads", str(os.cpu_count()), "--repeats", str(args.repeats), "--out", out]
    if args.max_sentences:
        command += ["--max-sentences", str(args.max_sentences)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2x4096_512_2048cnn_2xhighway",
                        choices=["2x4096_512_2048cnn_2xhighway", "2x2048_256_2048cnn_1xhighway",
                                 "2x1024_128_2048cnn_1xhighway", "small"])
    parser.add_argument("--sentences", default=str(SHARED_BENCH / "sentences.txt"))
    parser.add_argument("--max-sentences", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dedupe-report", action="store_true")
    parser.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "elmo-jax-bench-weights"))
    parser.add_argument("--compare-allennlp", action="store_true")
    parser.add_argument("--allennlp-python", default="/tmp/elmo-bench-venv/bin/python",
                        help="python of the venv made by ../shared/bench/setup.sh")
    parser.add_argument("--compare-tf", action="store_true", help="also run bilm-tf's graph (ref_tf.py)")
    parser.add_argument("--tf-python", default="/tmp/elmo-bench-tf-venv/bin/python",
                        help="python of the venv made by ../shared/bench/setup.sh --tf")
    args = parser.parse_args()

    weights = make_weights(args.size, pathlib.Path(args.weights_dir))
    with open(args.sentences, encoding="utf-8") as f:
        sentences = [line.split() for line in f.read().splitlines()][: args.max_sentences]
    n_tokens = sum(map(len, sentences))

    peak = matmul_peak_flops()
    load_start = time.perf_counter()
    embedder = Embedder(weights / "options.json", weights / "weights.hdf5", batch_size=args.batch_size,
                        dtype=args.dtype)
    load_seconds = time.perf_counter() - load_start

    start = time.perf_counter()
    outputs = list(embedder.embed_sentences(sentences))  # first pass: compiles every shape it meets
    first_pass = time.perf_counter() - start
    passes = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in embedder.embed_sentences(sentences):
            pass
        passes.append(time.perf_counter() - start)
    seconds = min(passes)

    # FLOPs actually needed: the LSTM for every token and <S>/</S>, the token layer once per distinct
    # token of each batch (what dedupe leaves), padding not counted.
    options = embedder.options
    distinct, n_batches = 0, 0
    window = args.batch_size * embedder.window_batches
    for first in range(0, len(sentences), window):  # the Embedder's batches: each window longest first
        chunk = sentences[first : first + window]
        order = sorted(range(len(chunk)), key=lambda p: -len(chunk[p]))
        for start in range(0, len(order), args.batch_size):
            distinct += len({t for p in order[start : start + args.batch_size] for t in chunk[p]}) + 2
            n_batches += 1
    flops = lstm_flops(options) * (n_tokens + 2 * len(sentences)) + token_layer_flops(options) * distinct
    result = {
        "impl": "elmo_jax",
        "size": args.size,
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "sentences": len(sentences),
        "tokens": n_tokens,
        "batches": n_batches,
        "distinct_tokens_per_batch": round(distinct / n_batches, 1),
        "seconds": round(seconds, 4),
        "seconds_all": [round(s, 4) for s in passes],
        "tokens_per_s": round(n_tokens / seconds, 1),
        "compilations": embedder.compilations,
        "compile_seconds": round(first_pass - seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "model_gflop_per_token": round(flops / n_tokens / 1e9, 3),
        "model_gflops": round(flops / seconds / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(flops / seconds / peak, 3),
    }
    peers = [("allennlp", "ref_allennlp.py", args.allennlp_python)] if args.compare_allennlp else []
    peers += [("tf", "ref_tf.py", args.tf_python)] if args.compare_tf else []
    for name, script, python in peers:
        with tempfile.TemporaryDirectory() as tmp:
            reference = run_peer(script, python, weights, args.sentences, args, os.path.join(tmp, "ref.hdf5"))
            with h5py.File(os.path.join(tmp, "ref.hdf5"), "r") as f:
                diff = max(float(np.abs(f[str(i)][...] - out).max()) for i, out in enumerate(outputs))
        result.update({
            f"{name}_tokens_per_s": reference["tokens_per_s"],
            f"{name}_seconds_all": reference["seconds_all"],
            f"speedup_vs_{name}": round(result["tokens_per_s"] / reference["tokens_per_s"], 2),
            f"max_abs_diff_vs_{name}": diff,
        })
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
