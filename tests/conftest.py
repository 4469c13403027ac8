"""Shared test set-up: 4 simulated CPU devices (sharding code runs on CPU), strict rank and dtype promotion
(so the package works for users who turn them on, as equinox does), and fixture locations.

The fixtures of the original TensorFlow bilm-tf live in ``../shared/fixtures`` beside the checkout
(override with ELMO_JAX_FIXTURES). Tests that need them skip when absent, unless
ELMO_JAX_REQUIRE_FIXTURES=1 (set by .ci/run), which turns their absence into a failure.
"""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")  # no silent broadcasting between ranks
jax.config.update("jax_numpy_dtype_promotion", "strict")  # no silent float64/bfloat16 mixing

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(os.environ.get("ELMO_JAX_FIXTURES", ROOT.parent / "shared" / "fixtures"))
BENCH = pathlib.Path(os.environ.get("ELMO_JAX_BENCH", ROOT.parent / "shared" / "bench"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        message = f"fixture {path} is absent (set ELMO_JAX_FIXTURES to the shared fixtures folder)"
        if os.environ.get("ELMO_JAX_REQUIRE_FIXTURES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def elmo_tiny() -> pathlib.Path:
    """The tiny real biLM of allenai/allennlp's test fixtures with outputs of the original bilm-tf."""
    return _need(FIXTURES / "elmo_tiny")


@pytest.fixture(scope="session")
def bench_dir() -> pathlib.Path:
    """../shared/bench: make_weights.py writes random weights in the exact published layout."""
    return _need(BENCH / "make_weights.py").parent


@pytest.fixture(scope="session")
def tiny_model(elmo_tiny):
    from elmo_jax import BiLM

    return BiLM.from_hdf5(elmo_tiny / "options.json", elmo_tiny / "lm_weights.hdf5")
