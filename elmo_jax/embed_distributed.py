"""``elmo-jax embed IN OUT --distributed``: each process embeds its share of IN's lines, process 0 merges.

The same command runs in every process (JAX's multi-controller runtime, set up as for ``train --distributed``).
Process k of n embeds lines [k * total // n, (k + 1) * total // n) on its local devices into
OUT.parts/part-0000k-of-0000n-RUN.hdf5; process 0 then writes OUT over the parts (``embed_output.merge_parts``),
and OUT reads like a one-process run. RUN names the run, so a failed run never changes the parts of an older
OUT (which stays as it was); after a success the older parts are removed.

No device collectives: the processes meet in the coordination service's key-value store. A failure must not
reach JAX's own paths: jax.distributed aborts a process (SIGABRT, a multi-line log) when its connect times
out, when the coordination service has found a dead peer (no heartbeat for 100 s) and when the service goes
away, and its shutdown barrier at exit waits for every process, dead ones too. So: connecting is given up
after ELMO_JAX_EMBED_CONNECT_TIMEOUT s (default 120), a process with no sign of life for
ELMO_JAX_EMBED_PEER_TIMEOUT s (default 30) counts as dead, and after any failure every process prints a
one-line error and leaves with os._exit(2), process 0 (which hosts the service) last. If process 0 itself
dies, JAX aborts the others at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
import threading
import time
import traceback

import jax

_KEY = "elmo_jax/embed/"  # the key-value store's namespace for this command


class DistributedEmbedError(ValueError):
    """``--distributed`` cannot start: stdin input, bad settings, or no multi-process runtime."""


def embed_distributed(args, program_cache: str | None = None) -> None:
    """Embed ``args.input`` into ``args.output`` with all processes (see the module docstring for the steps);
    ``args`` as ``embed_cli.run_embed`` checked them (``args.output`` among them); ``program_cache``: the
    ``Embedder``'s."""
    from .characters import Vocabulary
    from .embed import Embedder, count_lines
    from .embed_output import merge_parts
    from .weights import write_atomic

    if args.input == "-":
        raise DistributedEmbedError("--distributed reads INPUT from a file that every process can read, not stdin")
    total = count_lines(args.input)
    peer_timeout = _seconds("ELMO_JAX_EMBED_PEER_TIMEOUT", 30, most=60)  # detection + exit stay within JAX's 100 s
    _connect(_seconds("ELMO_JAX_EMBED_CONNECT_TIMEOUT", 120, most=290))  # JAX aborts after 300 s
    k, n = jax.process_index(), jax.process_count()
    peers = _Peers(k, n, peer_timeout)
    try:
        run = peers.agree("run", time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
        parts = [f"{args.output}.parts/part-{j:05d}-of-{n:05d}-{run}.hdf5" for j in range(n)]
        with contextlib.suppress(FileExistsError):  # OUT's folder must exist, as for one process
            os.mkdir(os.path.dirname(parts[k]))
        vocab = Vocabulary.from_file(args.vocab, require_specials=False).words if args.vocab else None
        embedder = Embedder(args.options, args.weights, model=args.model, batch_size=args.batch_size,
                            dtype=args.dtype, vocab=vocab, block_steps=args.block_steps, devices=jax.local_devices(),
                            program_cache=program_cache)
        started = time.perf_counter()
        stats = embedder.embed_file(args.input, parts[k], mode=args.mode, empty_lines=args.empty_lines,
                                    progress=not args.quiet and k == 0, tokenizer=args.tokenizer, layout=args.layout,
                                    output_dtype=args.output_dtype, model_name=args.model or args.weights or "built-in",
                                    lines=(k * total // n, (k + 1) * total // n))
        peers.report(sentences=stats["sentences"], tokens=stats["tokens"], compilations=embedder.compilations)
        if k == 0:
            reports = peers.gather()
            write_atomic(args.output, lambda tmp: merge_parts(tmp, parts, layout=args.layout))
            _remove_older_parts(parts)
    except BaseException as error:  # noqa: BLE001 - bad input, a bug, ^C: the others must know, all leave
        peers.fail(error)
    peers.finish()
    if k == 0:
        print(f"wrote {args.output}: {sum(r['sentences'] for r in reports)} sentences, "
              f"{sum(r['tokens'] for r in reports)} tokens in {time.perf_counter() - started:.1f} s "
              f"({max(r['compilations'] for r in reports)} compilations)")


def _seconds(variable: str, default: float, most: float) -> float:
    text = os.environ.get(variable, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not 0 < value <= most:
        raise DistributedEmbedError(f"{variable}={text!r}: expected seconds, more than 0 and at most {most:g}")
    return value


def _connect(timeout: float) -> None:
    """``initialize_distributed()``, given up after timeout s with a one-line error (JAX itself would abort)."""
    from .train.trainer import initialize_distributed

    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "the coordinator")
    message = (f"--distributed: not all processes met at {address} within {timeout:g} s; start the same command "
               f"in every process with JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
               f"JAX_PROCESS_ID set")
    watchdog = threading.Timer(timeout, _leave, [message])
    watchdog.daemon = True
    watchdog.start()
    try:
        initialize_distributed()
    except RuntimeError as error:  # TrainError (settings), JaxRuntimeError (e.g. the port is taken)
        raise DistributedEmbedError(f"--distributed: {error}") from None
    finally:
        watchdog.cancel()


def _leave(message: str) -> None:
    """Print the one-line error and end the process now, past JAX's shutdown barrier (see the module docstring)."""
    print(f"elmo-jax embed: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def _remove_older_parts(parts: list[str]) -> None:
    """Remove the parts (and temporary files) of older runs beside this run's; OUT no longer needs them."""
    folder, keep = os.path.dirname(parts[0]), {os.path.basename(p) for p in parts}
    for name in os.listdir(folder):
        if name not in keep and re.fullmatch(r"(\.tmp-.*-)?part-\d+-of-\d+-.*\.hdf5", name):
            with contextlib.suppress(OSError):  # best effort: OUT is written already
                os.remove(os.path.join(folder, name))


class _Peers:
    """The processes' meeting point in the key-value store, and the way out after a failure.

    Keys: "run" (process 0's run name), "status/k" (process k's counts or error), "result" (process 0: OUT is
    written), "alive/k" (process k > 0 ticks every second from a thread), "abort" (process 0: the run failed)
    and "left/k" (process k > 0 is leaving). Process 0's thread watches the ticks and the statuses.
    """

    def __init__(self, k: int, n: int, timeout: float):
        from jax._src.distributed import global_state

        self.client, self.k, self.n, self.timeout = global_state.client, k, n, timeout
        self.own_error: str | None = None
        self.seen = {j: (None, time.monotonic()) for j in range(1, n)}  # last tick and when it changed
        self.aborting = threading.Lock()  # held for good by the first abort
        threading.Thread(target=self._watch, daemon=True, name="elmo-jax-peers").start()

    def agree(self, key: str, proposal: str) -> str:
        """Process 0's proposal, in every process."""
        if self.k == 0:
            self.client.key_value_set(_KEY + key, proposal)
        return self._wait_for(key)

    def report(self, **counts) -> None:
        self.client.key_value_set(f"{_KEY}status/{self.k}", json.dumps(counts))

    def gather(self) -> list[dict]:
        """Process 0: every process's counts, once all have reported."""
        while len(statuses := self._statuses()) < self.n:
            time.sleep(0.2)
        return [statuses[j] for j in range(self.n)]

    def finish(self) -> None:
        """Process 0: OUT is written; the others wait for that."""
        if self.k == 0:
            self.client.key_value_set(_KEY + "result", "ok")
        self._wait_for("result")

    def fail(self, error: BaseException) -> None:
        """This process's work failed: report it, leave with the others; never returns."""
        from .cli import USER_ERRORS, Terminated

        if isinstance(error, USER_ERRORS):
            self.own_error = str(error)
        elif isinstance(error, Terminated):
            self.own_error = "terminated (SIGTERM)"
        elif isinstance(error, KeyboardInterrupt):
            self.own_error = "interrupted"
        else:  # a bug: keep the traceback
            traceback.print_exception(error)
            self.own_error = f"{type(error).__name__}: {error}"
        try:
            if self.k == 0:
                self._abort(f"process 0 of {self.n} failed: {self.own_error}")
            self.client.key_value_set(f"{_KEY}status/{self.k}", json.dumps({"error": self.own_error}))
            time.sleep(self.timeout + 15)  # process 0 answers with "abort" within seconds, and _watch leaves
        finally:
            _leave(self.own_error)

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(_KEY + key)
        except jax.errors.JaxRuntimeError as error:
            if "NOT_FOUND" in str(error):
                return None
            raise

    def _wait_for(self, key: str) -> str:
        while (value := self._get(key)) is None:  # _watch leaves if the run fails meanwhile
            time.sleep(0.2)
        return value

    def _statuses(self) -> dict[int, dict]:
        """Process 0: the reports so far; a failure aborts the run."""
        statuses = {int(key.rsplit("/", 1)[1]): json.loads(value)
                    for key, value in self.client.key_value_dir_get(_KEY + "status/")}
        for j, status in sorted(statuses.items()):
            if "error" in status:
                self._abort(f"process {j} of {self.n} failed: {status['error']}")
        return statuses

    def _watch(self) -> None:
        try:
            for tick in itertools.count():  # until os._exit or the end of the process
                if self.k > 0:
                    self.client.key_value_set(f"{_KEY}alive/{self.k}", str(tick), allow_overwrite=True)
                    if (message := self._get("abort")) is not None:
                        self.client.key_value_set(f"{_KEY}left/{self.k}", "")
                        _leave(self.own_error or message)
                else:
                    self._check_ticks()
                    self._statuses()
                time.sleep(1)
        except Exception:  # noqa: BLE001 - the client has shut down: the process is ending
            return

    def _check_ticks(self) -> None:
        now, ticks = time.monotonic(), dict(self.client.key_value_dir_get(_KEY + "alive/"))
        for j, (last, since) in self.seen.items():
            tick = ticks.get(f"{_KEY}alive/{j}")
            if tick != last:
                self.seen[j] = (tick, now)
            elif now - since > self.timeout:
                self._abort(f"process {j} of {self.n} stopped (no sign of life for {self.timeout:g} s)")

    def _abort(self, message: str) -> None:
        """Process 0: tell the others to leave, wait until they have (or are dead), then leave; never returns."""
        with self.aborting:
            try:
                self.client.key_value_set(_KEY + "abort", message)
                deadline = time.monotonic() + 10
                waiting = set(self.seen)
                while waiting and time.monotonic() < deadline:
                    left = dict(self.client.key_value_dir_get(_KEY + "left/"))
                    waiting = {j for j in waiting if f"{_KEY}left/{j}" not in left
                               and time.monotonic() - self.seen[j][1] <= self.timeout}
                    time.sleep(0.2)
                time.sleep(0.5)  # the service lives in this process: let the others finish exiting first
            finally:
                _leave(self.own_error or message)
