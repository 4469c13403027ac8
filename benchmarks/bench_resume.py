"""Resume and per-host data costs of training on real text.

    python benchmarks/bench_resume.py resume --corpus /tmp/corpus --at 10 5000
    python benchmarks/bench_resume.py host-data --corpus /tmp/corpus --batches 768 [--pin-cores] [--beside]

``resume``: trains a tiny biLM (2 layers of 64 cells, projection 16, a small char CNN; batch 64 x 20 tokens,
the corpus's own vocabulary) on CORPUS/train/*.txt for real for ``--train-steps`` steps (default: the smallest
``--at``), and keeps a copy of the run directory at each ``--at`` step. A later step is reached without
training: the run's data stream is read on to it (batches built, as training would read them) and its step
and data position set, so its checkpoint holds what a run trained to that step holds (data cursor, LSTM
carry, optimiser state, all of the same sizes), only with other values. Then, in rounds, each copy is resumed
in a fresh process (``elmo-jax train --out COPY --resume --steps 1 --devices 1``) and the time from starting
the process to its first step's log line is taken. "cursor" is the checkpoint as written (it holds the data
cursor); "replay" is the same checkpoint with its data cursor removed, as a checkpoint written before cursors
existed (the stream is replayed up to the step). It also times, in this process, placing the data stream at
the step (build the iterator and its first batch) from the cursor and by replay. By default the resumed
processes share JAX's persistent compilation cache (filled by one untimed resume), so that compiling, the
largest part of a start on CPU (~10 s here), is the same for all and the rest can be compared.

``host-data``: host data time per step of one process that builds every row of the global batch, and of each of
2 local processes (``jax.distributed``, one CPU device each) that build only their own rows: the time to build
the batch (read, encode, copy) and to agree on the long-token bound (``trainer.long_token_bounds``, an
all-gather between the processes), averaged over ``--batches`` batches after one; also the CPU time of building
(``build_cpu_ms``: the building thread's own time, which a process waiting for a core shared with the other
does not count; on separate hosts wall and CPU time agree); the 2 processes once with an
all-gather a batch and once with one for ``--ahead`` batches, as the trainer does (``BoundedBatches``, which the
trainer also uses with one process: the one process is timed both ways). Building includes each batch's cursor
(``get_state``), which ``BoundedBatches`` keeps.
``--pin-cores`` puts each process on a core of its own (the one process on core 0), as separate hosts would be;
without it the processes share the machine's cores with each other's runtime threads.
``--beside`` adds a control: two independent one-process runs side by side, each building every row, so that one
process's time is also measured while the other core is busy too; two processes of one run are compared with it
to separate what the split saves from what running both cores at once costs on the machine.

Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TINY = {
    "char_cnn": {"embedding": {"dim": 4}, "filters": [[1, 8], [2, 8], [3, 16]], "n_highway": 1,
                 "activation": "relu", "max_characters_per_token": 50, "n_characters": 261},
    "lstm": {"dim": 64, "projection_dim": 16, "n_layers": 2, "cell_clip": 3.0, "proj_clip": 3.0,
             "use_skip_connections": True},
    "unroll_steps": 20, "batch_size": 64, "n_negative_samples_batch": 64, "dropout": 0.1, "all_clip_norm_val": 10.0,
}


def _vocab_size(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def make_runs(corpus: str, steps: list[int], train_steps: int, out: str) -> tuple[dict[int, str], float]:
    """The tiny model trained ``train_steps`` steps, then its data stream read on to each step in ``steps``
    (sorted), the run directory copied at each; returns {step: copy} and the seconds taken."""
    import jax
    import jax.numpy as jnp

    from elmo_jax.options import BiLMOptions
    from elmo_jax.train.trainer import TrainConfig, Trainer

    vocab = os.path.join(corpus, "vocab.txt")
    options = BiLMOptions.from_dict({**TINY, "n_tokens_vocab": _vocab_size(vocab)})
    config = TrainConfig(options, os.path.join(corpus, "train", "*.txt"), vocab, n_steps=max(steps),
                         log_every=10**9, checkpoint_every=10**9, max_to_keep=1)
    run = os.path.join(out, "run")
    trainer = Trainer(config, run, devices=jax.devices()[:1], log_stream=open(os.devnull, "w"))
    copies, start = {}, time.perf_counter()
    trainer.train(train_steps)
    done = train_steps
    for step in sorted(steps):
        if step < done:
            raise SystemExit(f"--at {step} is before --train-steps {train_steps}")
        if step > done:  # read the stream on to the step, as training would, and save there
            batches = trainer._data_stream()
            for _ in range(step - done):
                next(batches)
            trainer.state = trainer.state._replace(step=jnp.int32(step), data_position=jnp.int32(step))
            trainer.save()
            done = step
        copies[step] = os.path.join(out, f"at{step}")
        shutil.copytree(run, copies[step])
    return copies, time.perf_counter() - start


def without_cursor(run: str, out: str) -> str:
    """A copy of a run directory whose latest checkpoint has no data cursor (as written before cursors existed)."""
    shutil.copytree(run, out)
    checkpoints = os.path.join(out, "checkpoints")
    latest = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    shutil.rmtree(os.path.join(checkpoints, str(latest), "data"))
    return out


def time_to_first_step(run: str, scratch: str, cache: str | None) -> float:
    """Seconds from starting ``elmo-jax train --resume --steps 1`` on a fresh copy of ``run`` to its first log line
    (``cache``: JAX's persistent compilation cache directory, or None for none)."""
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    shutil.copytree(run, scratch)
    env = dict(os.environ)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "elmo_jax.cli", "train", "--out", scratch, "--resume",
                                "--steps", "1", "--log-every", "1", "--devices", "1"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = None
    for line in process.stdout:
        if line.startswith("step ") and elapsed is None:
            elapsed = time.perf_counter() - start
    _, err = process.communicate()
    if process.returncode or elapsed is None:
        raise SystemExit(f"resume of {scratch} failed ({process.returncode}): {err.strip().splitlines()[-1:]}")
    return elapsed


def stream_positioning(run: str, step: int) -> dict[str, float]:
    """Seconds to place the run's data stream at ``step`` and build its next batch: from its cursor, by replay."""
    import orbax.checkpoint as ocp

    from elmo_jax.train.data import LMDataset, load_vocabulary
    from elmo_jax.train.trainer import load_config

    config = load_config(run)
    t = config.options.training
    manager = ocp.CheckpointManager(os.path.join(run, "checkpoints"))
    cursor = manager.restore(manager.latest_step(), args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    vocab = load_vocabulary(config.vocab_file)
    out = {}
    for how in ("cursor", "replay"):
        data = LMDataset(config.train_prefix, vocab, t.batch_size, t.unroll_steps, seed=config.seed)
        start = time.perf_counter()
        batches = data.batches(state=cursor) if how == "cursor" else data.batches(start=step)
        next(batches)
        out[how] = time.perf_counter() - start
    return out


def resume_main(args) -> dict:
    out = tempfile.mkdtemp(prefix="bench_resume_")
    try:
        copies, train_s = make_runs(args.corpus, args.at, args.train_steps or min(args.at), out)
        old = {step: without_cursor(run, os.path.join(out, f"old{step}")) for step, run in copies.items()}
        times: dict[str, list[float]] = {f"{how}@{step}": [] for step in copies for how in ("cursor", "replay")}
        scratch, cache = os.path.join(out, "scratch"), None if args.no_compile_cache else os.path.join(out, "cache")
        if cache is not None:  # an untimed resume fills the cache: compilation is then the same for every one
            time_to_first_step(copies[min(copies)], scratch, cache)
        for _ in range(args.rounds):  # interleaved, so load on the machine falls on each alike
            for step in copies:
                times[f"cursor@{step}"].append(time_to_first_step(copies[step], scratch, cache))
                times[f"replay@{step}"].append(time_to_first_step(old[step], scratch, cache))
        result = {"bench": "resume", "trained_steps": args.train_steps or min(args.at),
                  "make_runs_s": round(train_s, 1), "batch": TINY["batch_size"], "unroll": TINY["unroll_steps"],
                  "compile_cache": cache is not None,
                  "start_to_first_step_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
                  "start_to_first_step_all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                  "stream_positioning_s": {step: {k: round(v, 4) for k, v in stream_positioning(run, step).items()}
                                           for step, run in copies.items()}}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))
    return result


def host_data_worker(args) -> dict:
    """One process's host data time per step (run by host_data_main, alone or as one of 2 processes)."""
    import jax

    from elmo_jax.sharding import by_batch, data_mesh
    from elmo_jax.train.data import LMDataset, load_vocabulary
    from elmo_jax.train.trainer import row_devices, host_rows, initialize_distributed, long_token_bounds

    if args.processes > 1:
        initialize_distributed()
    rows = host_rows(by_batch(data_mesh(jax.devices())), args.batch)
    row_groups = row_devices(rows, args.batch, jax.device_count())  # each device's long tokens, as the trainer
    vocab = load_vocabulary(os.path.join(args.corpus, "vocab.txt"))
    data = LMDataset(os.path.join(args.corpus, "train", "*.txt"), vocab, args.batch, args.unroll, rows=rows)
    batches = data.batches()
    long_token_bounds([next(batches)], row_groups, jax.device_count())  # the first shard's read, the all-gather's
    build = agree = build_cpu = 0.0
    for first in range(0, args.batches, args.ahead):  # as the trainer's BoundedBatches: bounds for `ahead` at once
        start, start_cpu = time.perf_counter(), time.thread_time()
        # each batch with its cursor, as BoundedBatches keeps them (a checkpoint after any of them continues exactly)
        read = [(next(batches), batches.get_state()) for _ in range(min(args.ahead, args.batches - first))]
        middle = time.perf_counter()
        build_cpu += time.thread_time() - start_cpu
        long_token_bounds([batch for batch, _ in read], row_groups, jax.device_count())
        build, agree = build + middle - start, agree + time.perf_counter() - middle
    result = {"process": jax.process_index(), "rows": len(rows), "ahead": args.ahead,
              "build_ms": 1e3 * build / args.batches, "build_cpu_ms": 1e3 * build_cpu / args.batches,
              "bound_ms": 1e3 * agree / args.batches, "sentences_encoded": data.stats["sentences_encoded"]}
    if args.result:  # a file, not stdout: Gloo prints there from C++ and can split any line
        with open(args.result, "w") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result))
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_data_main(args) -> dict:
    result = {"bench": "host_data", "batch": args.batch, "unroll": args.unroll, "batches": args.batches,
              "pin_cores": args.pin_cores}
    if args.pin_cores and not shutil.which("taskset"):
        raise SystemExit("--pin-cores needs taskset (util-linux)")
    scratch = tempfile.mkdtemp(prefix="bench_host_data_")
    # (processes launched side by side, processes in the run, ahead): the last is the control, two independent
    # one-process runs at once, so one process's time is also taken with both cores busy, as the 2 processes' is
    # (1, 1, ahead) is the trainer's own path with one process: it reads `ahead` batches at a time there too
    configs = [(1, 1, 1), (1, 1, args.ahead), (2, 2, 1), (2, 2, args.ahead)] + ([(2, 1, 1)] if args.beside else [])
    for launch, n, ahead in configs:
        port, launched = _free_port(), []
        for index in range(launch):
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(2 // n)}
            if n > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                           JAX_PROCESS_ID=str(index))
            pin = ["taskset", "-c", str(index % os.cpu_count())] if args.pin_cores else []
            launched.append(subprocess.Popen(
                [*pin, sys.executable, __file__, "host-data-worker", "--processes", str(n), "--corpus", args.corpus,
                 "--batch", str(args.batch), "--unroll", str(args.unroll), "--batches", str(args.batches),
                 "--ahead", str(ahead), "--result", os.path.join(scratch, f"{index}.json")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        workers = []
        for index, process in enumerate(launched):
            _, err = process.communicate(timeout=1800)
            if process.returncode:
                raise SystemExit(f"host-data worker failed: {err.strip().splitlines()[-1:]}")
            with open(os.path.join(scratch, f"{index}.json")) as f:
                workers.append(json.load(f))
        name = f"{n}_process" + ("" if ahead == 1 else f"_bounds_{ahead}_ahead") + ("_beside_another" * (launch > n))
        result[name] = [{k: round(v, 3) if isinstance(v, float) else v for k, v in w.items()} for w in workers]
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("resume", help="process start to first step after --resume, early vs late step")
    p.add_argument("--corpus", default="/tmp/corpus", help="built by ../shared/corpus/build_corpus.sh")
    p.add_argument("--at", type=int, nargs="+", default=[10, 5000], help="steps to resume at")
    p.add_argument("--train-steps", type=int, help="steps trained for real (default: the smallest --at)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile in every resumed process (default: a persistent compilation cache, warmed once)")
    p.set_defaults(func=resume_main)
    for name in ("host-data", "host-data-worker"):
        p = sub.add_parser(name, help="host data time per step, 1 process vs 2" if name == "host-data" else None)
        p.add_argument("--corpus", default="/tmp/corpus")
        p.add_argument("--batch", type=int, default=64, help="global batch (rows)")
        p.add_argument("--unroll", type=int, default=20)
        p.add_argument("--batches", type=int, default=400)
        p.add_argument("--processes", type=int, default=1)
        p.add_argument("--ahead", type=int, help="batches whose bounds one all-gather agrees on (the 2-process run's "
                       "second measurement; default: the trainer's BOUNDS_AHEAD)")
        p.add_argument("--result", help=argparse.SUPPRESS if name == "host-data" else "write the result here")
        p.add_argument("--pin-cores", action="store_true",
                       help="each process on a core of its own (taskset), as hosts of their own would be")
        p.add_argument("--beside", action="store_true",
                       help="also time one process building every row while a second, independent one does the same "
                       "(both cores busy, as in the 2-process run)")
        p.set_defaults(func=host_data_main if name == "host-data" else host_data_worker)
    args = parser.parse_args(argv)
    if getattr(args, "ahead", 0) is None:
        from elmo_jax.train.trainer import BOUNDS_AHEAD
        args.ahead = BOUNDS_AHEAD
    return args.func(args)


if __name__ == "__main__":
    main()
