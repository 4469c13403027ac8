"""The README's quickstart runs as written (with the fixture model in place of the placeholder paths)."""

import re

from tests.conftest import ROOT


def test_quickstart_runs(elmo_tiny):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    placeholder = '"options.json", "weights.hdf5"'
    assert placeholder in code
    code = code.replace(placeholder, f'"{elmo_tiny / "options.json"}", "{elmo_tiny / "lm_weights.hdf5"}"')
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    assert namespace["out"].activations.shape == (3, 2, 8, 32)
    assert namespace["rep"].representations[0].shape == (2, 6, 32)
    assert namespace["vectors"].shape == (3, 3, 32)
    assert namespace["layers"].shape == (3, 6, 256)  # the built-in model
