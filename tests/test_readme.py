"""The README's quickstart runs as written (with the fixture model in place of the placeholder paths)."""

import re

import jax

from tests.conftest import ROOT


def test_quickstart_runs(elmo_tiny):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    placeholder = '"options.json", "weights.hdf5"'
    assert placeholder in code
    code = code.replace(placeholder, f'"{elmo_tiny / "options.json"}", "{elmo_tiny / "lm_weights.hdf5"}"')
    assert '"ru.model"' in code  # an ELMoForManyLangs model: the random-weight test fixture stands in
    code = code.replace('"ru.model"', repr(str(ROOT / "tests" / "fixtures" / "efml_tiny" / "model")))
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    assert namespace["out"].activations.shape == (3, 2, 8, 32)
    assert namespace["rep"].representations[0].shape == (2, 6, 32)
    assert namespace["vectors"].shape == (3, 3, 32)
    assert namespace["layers"].shape == (3, 6, 256)  # the built-in model
    assert namespace["ru_ids"].shape == (1, 3, 51) and namespace["ru_vectors"].shape == (3, 3, 32)


def test_pmap_example_runs():
    """The README's pmap training loop runs as written on the 4 simulated devices and lowers the loss."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"### ELMo inside your own `pmap`.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float; the package does not
        exec(compile(code, "README.md pmap example", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.shape == (4,) and float(loss[0]) < 0.69  # below log(2), where the zero classifier starts
    assert len(set(map(float, loss))) == 1  # pmean: every device holds the same value
