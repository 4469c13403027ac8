"""Jitted programs whose traces are kept across processes.

A process that embeds with warm XLA compilation cache still traces every program and lowers it to StableHLO before
the cache can answer: ~0.3 s of the main thread at the start of ``elmo-jax embed`` on a CPU (the built-in model's 5
programs), while the devices wait for the first block. ``Program`` keeps each program's lowered form on disk
(``jax.export``, keyed by everything its trace depends on), and a later process calls that instead of tracing: its
lowering is a copy of the stored module, and XLA's compilation cache compiles it as before.

Without a directory a ``Program`` is ``jax.jit`` with a count of the signatures it was called with.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Callable

import jax

from .weights import write_atomic

_SUFFIX = ".jaxexport"


def _digest_sources() -> str:
    """sha256 of this package's Python sources and of the JAX and jaxlib versions (~1 ms)."""
    digest = hashlib.sha256(f"jax {jax.__version__} jaxlib {jax.lib.__version__}".encode())
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


# read with the package's modules, not when an Embedder is made: a source edited later in a long process (a notebook)
# would otherwise key the traces of the code still running under the edited code's digest
_SOURCE_DIGEST = _digest_sources()


def source_digest() -> str:
    """What a kept trace was made with: the package's sources as this process imported them, and JAX's version."""
    return _SOURCE_DIGEST


@contextlib.contextmanager
def _no_lapack_initialization():
    """Lower a kept program without JAX's set-up of LAPACK for exported CPU programs (importing SciPy's LAPACK:
    0.14 s of ``elmo-jax embed``'s start on the CPU here); a kept program calls no LAPACK (``Program._make``). Where
    this JAX has no such step, nothing changes."""
    module = sys.modules.get("jax._src.export._export")
    original = getattr(module, "_ensure_backends_initialized", None)
    if original is None:
        yield
        return
    module._ensure_backends_initialized = lambda platforms: None
    try:
        yield
    finally:
        module._ensure_backends_initialized = original


def _register_namedtuples(treedef) -> None:
    """Let ``jax.export`` serialize the NamedTuples (e.g. ``lstm.LSTMState``) of a pytree's structure, each under
    its module and name."""
    node = treedef.node_data()
    if node is not None and issubclass(node[0], tuple) and hasattr(node[0], "_fields"):
        kind = node[0]
        try:
            jax.export.register_namedtuple_serialization(kind, serialized_name=f"{kind.__module__}.{kind.__qualname__}")
        except ValueError:  # registered before
            pass
    for child in treedef.children():
        _register_namedtuples(child)


class Program:
    """``jax.jit(fun, static_argnames, donate_argnums)`` that counts new signatures and can keep traces on disk.

    Args:
      fun: the function to jit; every value its trace depends on beyond its arguments must be in ``salt``.
      name: the program's name in its files' keys.
      directory: where traces are kept (``jax.export`` blobs, one file a signature); None: none are kept.
      salt: text that changes whenever ``fun``'s trace could (the model's options, the devices, the code:
        ``source_digest``).
      on_new: called with no argument once per new signature, whether it is traced or loaded.
      platform: the platform the programs run on (``jax.export``'s ``platforms``).

    Call it as the jitted function, static arguments by keyword. A kept file that cannot be read is traced again
    and replaced.
    """

    def __init__(self, fun: Callable, *, name: str, static_argnames: tuple[str, ...] = (),
                 donate_argnums: tuple[int, ...] = (), directory: str | None = None, salt: str = "",
                 on_new: Callable[[], None] | None = None, platform: str | None = None):
        self._jitted = jax.jit(fun, static_argnames=static_argnames, donate_argnums=donate_argnums)
        self._name, self._donate, self._directory = name, donate_argnums, directory
        self._salt, self._on_new, self._platform = salt, on_new, platform
        self._calls: dict[tuple, Callable] = {}
        # each (sharding, ndim) seen -> the first one seen equivalent to it: an exported program's outputs may carry
        # another sharding object than its inputs for the same layout (one device: P() for P('data'))
        self._shardings: dict[tuple, tuple] = {}
        self.loaded = 0  # signatures whose trace came from the directory

    @property
    def signatures(self) -> int:
        """The signatures it was called with: one program each."""
        return len(self._calls)

    def __call__(self, *args, **static):
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, tuple(map(self._leaf_signature, leaves)), tuple(sorted(static.items())))
        call = self._calls.get(signature)
        if call is not None:
            return call(*args)
        call, kept = self._make(args, static, signature)
        self._calls[signature] = call
        if self._on_new is not None:
            self._on_new()
        if not kept:
            return call(*args)
        with _no_lapack_initialization():  # the first call lowers it
            return call(*args)

    def _leaf_signature(self, leaf) -> tuple:
        """What a trace sees of an argument: shape, dtype, weak type and, for a device array, its sharding (the
        first one seen that is equivalent to it)."""
        signature = (leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False))
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return signature
        key = (sharding, leaf.ndim)
        if key not in self._shardings:
            self._shardings[key] = next((k for k in self._shardings if k[1] == leaf.ndim and
                                         k[0].is_equivalent_to(sharding, leaf.ndim)), key)
        first = self._shardings[key][0]
        return (*signature, str(first), len(first.device_set))

    def _make(self, args: tuple, static: dict, signature: tuple) -> tuple[Callable, bool]:
        """The callable of a new signature, and whether it is a kept program (loaded, or traced and written)."""
        jitted = functools.partial(self._jitted, **static)
        if self._directory is None:
            return jitted, False
        key = hashlib.sha256(repr((self._salt, self._platform, str(signature))).encode()).hexdigest()
        path = os.path.join(self._directory, f"{self._name}-{key}{_SUFFIX}")
        exported = self._read(path, signature[0])
        if exported is not None:
            self.loaded += 1
            return jax.jit(exported.call, donate_argnums=self._donate), True
        exported = jax.export.export(self._jitted, platforms=None if self._platform is None else
                                     (self._platform,))(*args, **static)
        if "lapack" in exported.mlir_module():  # never the Embedder's: keep it only in this process's jit
            return jitted, False
        self._write(path, exported)
        return jax.jit(exported.call, donate_argnums=self._donate), True

    @staticmethod
    def _read(path: str, treedef):
        _register_namedtuples(treedef)  # those of the arguments; a program returns no other
        try:
            with open(path, "rb") as handle:
                return jax.export.deserialize(bytearray(handle.read()))
        except Exception:  # absent, unreadable or from another version: trace again
            return None

    @staticmethod
    def _write(path: str, exported) -> None:
        """Write the blob atomically (``weights.write_atomic``: a reader never sees part of one). Best effort: a
        directory that cannot be written only means the next process traces again."""
        _register_namedtuples(exported.in_tree)
        _register_namedtuples(exported.out_tree)
        blob = exported.serialize()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as out:
                out.write(blob)

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, write)
        except OSError:
            pass
