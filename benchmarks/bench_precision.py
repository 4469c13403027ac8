"""On an accelerator: how far the Embedder's float32 outputs are from the CPU's, with XLA's default matmul
precision and with full float32, and what full float32 costs.

    python benchmarks/bench_precision.py --size 2x4096_512_2048cnn_2xhighway --max-sentences 2000 --mode top

XLA's default precision for float32 matmuls and convolutions on a GPU is TF32-like (an H200 ran an 8192
float32 product at 362 TFLOP/s, over 5x its rated float32), so the Embedder's float32 outputs there may
differ from the CPU's (the originals' numbers) by more than the 1e-5 we promise;
``jax.default_matmul_precision("float32")`` around the calls restores full float32. This measures both, to
choose the default. On a CPU both are full float32 and equal the reference.

Prints one JSON line per precision: tokens/s (best of --repeats warm passes) and the largest absolute
difference from the CPU backend's outputs (the same Embedder on ``jax.devices("cpu")``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from bench_embed import SHARED_BENCH, SIZES, first_lines, model_files, timed_passes
from elmo_jax.embed import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="builtin", choices=[size for size in SIZES if size != "efml"])
    parser.add_argument("--sentences", default=str(SHARED_BENCH / "sentences.txt"))
    parser.add_argument("--max-sentences", type=int, default=2000)
    parser.add_argument("--mode", choices=["all", "top", "average"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "elmo-jax-bench-weights"))
    args = parser.parse_args()

    files = model_files(args.size, pathlib.Path(args.weights_dir), args)
    sentences = [line.split() for line in first_lines(args.sentences, args.max_sentences)]
    n_tokens = sum(map(len, sentences))
    start = time.perf_counter()
    reference = list(Embedder(*files, devices=jax.devices("cpu")).embed_sentences(sentences, mode=args.mode))
    reference_seconds = time.perf_counter() - start
    scale = max(float(np.abs(r).max()) for r in reference)
    for precision in ["default", "float32"]:
        # the precision is read when the Embedder's programs are traced, so every pass runs inside it
        with contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision):
            outputs, _, passes = timed_passes(Embedder(*files), sentences, args.mode, args.repeats)
        diff = max(float(np.abs(ours - theirs).max()) for ours, theirs in zip(outputs, reference))
        print(json.dumps({
            "what": "float32 outputs against the CPU's", "size": args.size, "device": jax.devices()[0].device_kind,
            "precision": precision, "mode": args.mode, "sentences": len(sentences), "tokens": n_tokens,
            "tokens_per_s": round(n_tokens / min(passes), 1), "seconds_all": [round(s, 4) for s in passes],
            "max_abs_diff_vs_cpu": diff, "output_max_abs": round(scale, 3),
            "cpu_reference_seconds": round(reference_seconds, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
