"""Training throughput: tokens/s of the jitted train step and its fraction of the measured fp32 matmul peak.

    python benchmarks/bench_train.py --config 2x1024_128 --batch 8 --unroll 20 --vocab-size 10000 --steps 5

Random init and random batches (no data files): the step is the real one (``elmo_jax.train.trainer``),
data-parallel over all devices (or ``--devices N``). The peak is measured in the same run with a large
fp32 ``jnp.matmul``. Model FLOPs per token count multiply-adds as 2 FLOPs: char CNN, highway, projection
and stacked LSTM (input and recurrent gates, projection) for each direction's stream, plus the sampled
softmax (true + negative rows); training = 3x forward (backward pass ~ 2x forward).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = {
    "2x1024_128": {"dim": 1024, "projection_dim": 128, "n_highway": 1,
                   "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]},
    "2x4096_512": {"dim": 4096, "projection_dim": 512, "n_highway": 2,
                   "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]},
}


def options_dict(name: str, batch: int, unroll: int, vocab_size: int, n_negative: int) -> dict:
    """bilm-tf options.json of a named config with the benchmark's batch, unroll and vocabulary."""
    c = CONFIGS[name]
    return {
        "char_cnn": {"embedding": {"dim": 16}, "filters": c["filters"], "n_highway": c["n_highway"],
                     "activation": "relu", "max_characters_per_token": 50, "n_characters": 261},
        "lstm": {"dim": c["dim"], "projection_dim": c["projection_dim"], "n_layers": 2, "cell_clip": 3.0,
                 "proj_clip": 3.0, "use_skip_connections": True},
        "n_tokens_vocab": vocab_size, "unroll_steps": unroll, "batch_size": batch,
        "n_negative_samples_batch": n_negative, "dropout": 0.1, "all_clip_norm_val": 10.0, "bidirectional": True,
    }


def forward_flops_per_token(options) -> float:
    """Forward FLOPs per window position (both directions' streams)."""
    cnn, lstm, t = options.char_cnn, options.lstm, options.training
    chars, f, p, d = cnn.max_characters_per_token, cnn.n_filters, lstm.projection_dim, lstm.dim
    conv = sum(2 * (chars - w + 1) * w * cnn.char_embedding_dim * n for w, n in cnn.filters)
    highway = cnn.n_highway * 2 * (2 * f * f)
    projection = 2 * f * p
    lstm_flops = lstm.n_layers * 2 * (2 * p * 4 * d + d * p)  # input + recurrent gates (2P x 4D), projection
    softmax = 2 * p * (t.n_negative_samples_batch + 1)
    directions = 2 if t.bidirectional else 1
    return directions * (conv + highway + projection + lstm_flops + softmax)


def matmul_peak(n: int, repeats: int = 5, dtype=jnp.float32) -> float:
    """Measured FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def random_batch(rng: np.random.Generator, batch: int, unroll: int, vocab_size: int) -> dict[str, np.ndarray]:
    """A batch with the shapes and dtypes of data.LMDataset's (random ids; char ids of random 'words')."""
    out = {}
    for suffix in ("", "_reverse"):
        out["token_ids" + suffix] = rng.integers(0, vocab_size, (batch, unroll), dtype=np.int32)
        out["next_token_id" + suffix] = rng.integers(0, vocab_size, (batch, unroll), dtype=np.int32)
        chars = np.full((batch, unroll, 50), 261, np.int32)  # padding within words
        lengths = rng.integers(1, 12, (batch, unroll))
        for i, j in np.ndindex(batch, unroll):
            chars[i, j, 0], chars[i, j, lengths[i, j] + 1] = 259, 260  # begin / end of word (+1 shifted)
            chars[i, j, 1 : lengths[i, j] + 1] = rng.integers(98, 123, lengths[i, j])
        out["char_ids" + suffix] = chars
    return out


def main(argv=None) -> dict:
    from jax.sharding import Mesh

    from elmo_jax.options import BiLMOptions
    from elmo_jax.train.trainer import _compiled, long_token_bound

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2x1024_128")
    parser.add_argument("--batch", type=int, default=128, help="global batch (rows)")
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=793471)
    parser.add_argument("--n-negative", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--devices", type=int, help="use the first N devices (default all)")
    parser.add_argument("--peak-n", type=int, help="matmul size for the peak (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of the step (params stay float32); the peak is measured in it too")
    args = parser.parse_args(argv)

    options = BiLMOptions.from_dict(options_dict(args.config, args.batch, args.unroll, args.vocab_size,
                                                 args.n_negative))
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    init, step = _compiled(options, (0.2, 1.0, 10.0), mesh, args.dtype)
    state = init(jax.random.PRNGKey(0), None)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, args.batch, args.unroll, args.vocab_size) for _ in range(2)]
    bounds = [long_token_bound(b) for b in batches]  # as the Trainer does, per batch
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batches = [jax.device_put(b, by_batch) for b in batches]

    start = time.perf_counter()
    state, metrics = step(state, batches[0], None, bounds[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, batches[i % 2], None, bounds[i % 2])
    loss = float(jax.device_get(metrics["loss"]))  # waits for the last step
    elapsed = time.perf_counter() - start

    tokens_per_s = args.steps * args.batch * args.unroll / elapsed
    model_flops = 3 * forward_flops_per_token(options) * tokens_per_s
    peak_n = args.peak_n or (8192 if devices[0].platform == "gpu" else 2048)
    peak = matmul_peak(peak_n, dtype=jnp.dtype(args.dtype)) * len(devices)
    result = {
        "config": args.config, "dtype": args.dtype, "device": str(devices[0].device_kind), "n_devices": len(devices),
        "batch": args.batch, "unroll": args.unroll, "vocab_size": args.vocab_size, "n_negative": args.n_negative,
        "steps": args.steps,
        "first_step_s": round(compile_s, 2), "step_ms": round(1000 * elapsed / args.steps, 2),
        "tokens_per_s": round(tokens_per_s, 1), "model_tflops_per_s": round(model_flops / 1e12, 5),
        "peak_tflops_per_s": round(peak / 1e12, 4), "fraction_of_peak": round(model_flops / peak, 4),
        "loss": round(loss, 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
