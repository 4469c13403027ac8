"""Training throughput: tokens/s of the jitted train step and its fraction of the measured fp32 matmul peak;
the step time at several vocabulary sizes side by side; the bytes a data-parallel step all-reduces.

    python benchmarks/bench_train.py --config 2x1024_128 --batch 8 --unroll 20 --n-negative 1024 \
        --vocab-size 20000 793471 --steps 4 --allreduce-config 2x4096_512

Random init and random batches (no data files): the step is the real one (``elmo_jax.train.trainer``),
data-parallel over all devices (or ``--devices N``; on CPU one device by default). The peak is measured in the
same run with a large fp32 ``jnp.matmul``. Model FLOPs per token count multiply-adds as 2 FLOPs: char CNN,
highway, projection and stacked LSTM (input and recurrent gates, projection) for each direction's stream, plus
the sampled softmax (true + negative rows); training = 3x forward (backward pass ~ 2x forward).

With several ``--vocab-size`` values, each size's model is built and compiled first, then the timed steps
alternate between the sizes in rounds (so load on the machine falls on every size alike), and the last line
gives each size's step time and the ratio of the largest size's to the smallest's. ``--dense`` also times
the dense softmax update (the gradient of every softmax row, then optax: the step before the row-sparse one).

``--allreduce-config``: bytes all-reduced per step by that config at the largest ``--vocab-size``, on a mesh of 4
simulated CPU devices: "dense" is the update before the row-sparse softmax (the gradient of every param,
the (V, P) softmax included, then optax), "rows" the trainer's step; each counted from array sizes and from the
all-reduce ops of the compiled program (compiled only: nothing of that size is allocated). Also the trainer's
step with the softmax split by rows (``--shard-softmax``): its collectives, and the TrainState's bytes on each
device with the softmax replicated and split.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from peak import matmul_peak

jax.config.update("jax_num_cpu_devices", 4)  # the all-reduce count's mesh; the step is timed on --devices

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


def _abstract_batch(batch: int, unroll: int) -> dict:
    ints = jax.ShapeDtypeStruct((batch, unroll), jnp.int32)
    out = {name + suffix: ints for name in ("token_ids", "next_token_id") for suffix in ("", "_reverse")}
    chars = jax.ShapeDtypeStruct((batch, unroll, 50), jnp.int32)
    out.update({name: chars for name in ("char_ids", "char_ids_reverse")})
    return out


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective op in a compiled HLO module's text (once per op)."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        found = re.search(r"= (.*?)\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(",
                          line)
        if found:
            shapes = re.findall(r"(\w+)\[([\d,]*)\]", found.group(1))
            size = sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])) for dtype, dims in shapes)
            out[found.group(2)] = out.get(found.group(2), 0) + size
    return out


def allreduce_report(name: str, batch: int, unroll: int, vocab_size: int, n_negative: int) -> dict:
    """Bytes all-reduced per data-parallel step, dense softmax update vs row-sparse, from sizes and compiled HLO."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from elmo_jax.options import BiLMOptions
    from elmo_jax.train.trainer import (_init_fn, _make_optimizer, dense_train_step, softmax_table_rows,
                                        state_shardings, train_step)

    options = BiLMOptions.from_dict(options_dict(name, batch, unroll, vocab_size, n_negative))
    settings = (0.2, 1.0, 10.0)
    state = jax.eval_shape(_init_fn(options, settings), jax.random.PRNGKey(0), None)
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    softmax = state.params["softmax"]
    directions = 2 if options.training.bidirectional else 1
    rows = directions * (batch * unroll + n_negative)  # the most distinct rows a step touches
    dense_bytes, softmax_bytes = nbytes(state.params), nbytes(softmax)
    softmax_rows_bytes = sum(rows * a.size // a.shape[0] * a.dtype.itemsize for a in jax.tree.leaves(softmax))
    rows_bytes = dense_bytes - softmax_bytes + softmax_rows_bytes
    mesh = Mesh(np.asarray(jax.devices("cpu")[:4]), ("data",))
    replicated, by_batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    shardings = state_shardings(state, mesh)  # the trainer's: the LSTM carry split by rows, the rest replicated
    # the trainer's step with the softmax and its accumulator split by rows (--shard-softmax; padded rows)
    sharded_state = jax.eval_shape(_init_fn(options, settings, softmax_table_rows(options, True)),
                                   jax.random.PRNGKey(0), None)
    sharded = state_shardings(sharded_state, mesh, shard_softmax=True)
    rows_step = functools.partial(train_step, options=options, optimizer=_make_optimizer(*settings))
    compiled, per_device = {}, {}
    for kind, step, placed, where in (
            ("dense", functools.partial(dense_train_step, options=options, settings=settings), state, shardings),
            ("rows", rows_step, state, shardings), ("rows_sharded_softmax", rows_step, sharded_state, sharded)):
        program = jax.jit(step, in_shardings=(where, by_batch, replicated), out_shardings=(where, replicated),
                          donate_argnums=0)
        hlo = program.lower(placed, _abstract_batch(batch, unroll), None).compile().as_text()
        compiled[kind] = collective_bytes(hlo)
        per_device[kind] = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                               for a, s in zip(jax.tree.leaves(placed), jax.tree.leaves(where)))
    result = {
        "allreduce_config": name, "vocab_size": vocab_size, "batch": batch, "unroll": unroll, "n_negative": n_negative,
        "softmax_rows_touched_at_most": rows,
        "allreduce_bytes_dense_from_sizes": dense_bytes, "allreduce_bytes_rows_from_sizes": rows_bytes,
        "softmax_allreduce_bytes_dense_from_sizes": softmax_bytes,
        "softmax_allreduce_bytes_rows_from_sizes": softmax_rows_bytes,
        "allreduce_bytes_dense_compiled": compiled["dense"].get("all-reduce", 0),
        "allreduce_bytes_rows_compiled": compiled["rows"].get("all-reduce", 0),
        "other_collectives_bytes_rows_compiled": {k: v for k, v in compiled["rows"].items() if k != "all-reduce"},
        "collectives_bytes_rows_sharded_softmax_compiled": compiled["rows_sharded_softmax"],
        "state_bytes_per_device_replicated": per_device["rows"],
        "state_bytes_per_device_sharded_softmax": per_device["rows_sharded_softmax"],
    }
    print(json.dumps(result))
    return result


def dense_step_fn(options, settings: tuple, mesh):
    """step(state, batch, vocab_char_ids, long_token_rows) of dense_train_step, jitted as the trainer jits its own."""
    from jax.sharding import NamedSharding, PartitionSpec

    from elmo_jax.train.trainer import TrainState, dense_train_step

    replicated, by_batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    shardings = TrainState(replicated, replicated, replicated, by_batch, replicated, replicated)
    programs = {}

    def step(state, batch, vocab_char_ids, long_token_rows=None):
        if long_token_rows not in programs:
            one = functools.partial(dense_train_step, options=options, settings=settings,
                                    long_token_rows=long_token_rows)
            programs[long_token_rows] = jax.jit(one, in_shardings=(shardings, by_batch, replicated),
                                                out_shardings=(shardings, replicated), donate_argnums=0)
        return programs[long_token_rows](state, batch, vocab_char_ids)

    return step


def main(argv=None) -> dict:
    from jax.sharding import Mesh

    from elmo_jax.options import BiLMOptions
    from elmo_jax.train.trainer import _compiled, row_devices, long_token_bound

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2x1024_128")
    parser.add_argument("--batch", type=int, default=128, help="global batch (rows)")
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, nargs="+", default=[793471],
                        help="one or more vocabulary sizes, timed side by side (default 793471)")
    parser.add_argument("--n-negative", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="the timed steps of each size come in this many rounds")
    parser.add_argument("--dense", action="store_true",
                        help="also time the dense softmax update (the step before the row-sparse one) at each size")
    parser.add_argument("--devices", type=int, help="use the first N devices (default all; on CPU 1)")
    parser.add_argument("--peak-n", type=int, help="matmul size for the peak (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of the step (params stay float32); the peak is measured in it too")
    parser.add_argument("--allreduce-config", choices=sorted(CONFIGS),
                        help="also report the bytes all-reduced per step by this config at the largest vocabulary")
    parser.add_argument("--allreduce-batch", type=int, help="its global batch (default --batch)")
    args = parser.parse_args(argv)
    if args.dense and args.dtype != "float32":
        parser.error("--dense times the float32 step only")

    devices = jax.devices()
    devices = devices[: args.devices or (1 if devices[0].platform == "cpu" else len(devices))]
    mesh = Mesh(np.asarray(devices), ("data",))
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(0)
    runs = []  # per (update, vocabulary size): its step, state, batches, first step seconds, timed seconds
    for vocab_size in args.vocab_size:
        options = BiLMOptions.from_dict(options_dict(args.config, args.batch, args.unroll, vocab_size,
                                                     args.n_negative))
        init, rows_step = _compiled(options, (0.2, 1.0, 10.0), mesh, args.dtype)
        batches = [random_batch(rng, args.batch, args.unroll, vocab_size) for _ in range(2)]
        # as the Trainer does, per batch, each device's rows bounded apart
        bounds = [long_token_bound(b, row_devices(range(args.batch), args.batch, len(devices)), len(devices))
                  for b in batches]
        batches = [jax.device_put(b, by_batch) for b in batches]
        steps = {"rows": rows_step}
        if args.dense:
            steps["dense"] = dense_step_fn(options, (0.2, 1.0, 10.0), mesh)
        for update, step in steps.items():
            state = init(jax.random.PRNGKey(0), None)
            start = time.perf_counter()
            state, metrics = step(state, batches[0], None, bounds[0])
            jax.block_until_ready(metrics)
            runs.append({"update": update, "vocab_size": vocab_size, "options": options, "state": state,
                         "step": step, "batches": batches, "bounds": bounds,
                         "first_step_s": time.perf_counter() - start, "elapsed": 0.0, "steps": 0})
    for r in range(args.rounds):  # alternate the sizes, so that other load on the machine falls on all alike
        for run in runs:
            n = args.steps // args.rounds + (r < args.steps % args.rounds)
            state, step, batches, bounds = run["state"], run["step"], run["batches"], run["bounds"]
            start = time.perf_counter()
            for i in range(n):
                state, metrics = step(state, batches[i % 2], None, bounds[i % 2])
            run["loss"] = float(jax.device_get(metrics["loss"])) if n else run.get("loss")  # waits for the last step
            run["elapsed"] += time.perf_counter() - start
            run["steps"] += n
            run["state"] = state
    for run in runs:
        del run["state"]  # frees the large softmax tables before the peak and the compiles below

    peak = matmul_peak(jnp.dtype(args.dtype), args.peak_n) * len(devices)
    results = []
    for run in runs:
        tokens_per_s = run["steps"] * args.batch * args.unroll / run["elapsed"]
        model_flops = 3 * forward_flops_per_token(run["options"]) * tokens_per_s
        results.append({
            "config": args.config, "softmax_update": run["update"], "dtype": args.dtype,
            "device": str(devices[0].device_kind), "n_devices": len(devices), "batch": args.batch,
            "unroll": args.unroll, "vocab_size": run["vocab_size"], "n_negative": args.n_negative,
            "steps": run["steps"],
            "first_step_s": round(run["first_step_s"], 2), "step_ms": round(1000 * run["elapsed"] / run["steps"], 2),
            "tokens_per_s": round(tokens_per_s, 1), "model_tflops_per_s": round(model_flops / 1e12, 5),
            "peak_tflops_per_s": round(peak / 1e12, 4), "fraction_of_peak": round(model_flops / peak, 4),
            "loss": round(run["loss"], 4),
        })
        print(json.dumps(results[-1]))
    result = results[0]
    if len(args.vocab_size) > 1:
        small, large = min(args.vocab_size), max(args.vocab_size)
        result = {"step_ms": {}, "ratio_largest_to_smallest": {}}
        for update in dict.fromkeys(r["softmax_update"] for r in results):
            times = {r["vocab_size"]: r["step_ms"] for r in results if r["softmax_update"] == update}
            result["step_ms"][update] = times
            result["ratio_largest_to_smallest"][update] = round(times[large] / times[small], 3)
        print(json.dumps(result))
    if args.allreduce_config:
        result = {**result, **allreduce_report(args.allreduce_config, args.allreduce_batch or args.batch, args.unroll,
                                               max(args.vocab_size), args.n_negative)}
    return result


if __name__ == "__main__":
    main()
