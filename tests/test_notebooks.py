"""The notebooks in notebooks/ run top to bottom without an error, so they cannot rot.

Each runs in a fresh kernel from the notebooks folder, as ``notebooks/run_notebooks.py`` does (that script
with ``--write`` refreshes the committed outputs); nothing is written back here. Every cell has a time
limit, and the first error fails the test with the cell and its traceback.
"""

import importlib.util
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks():
    names = {path.name for path in NOTEBOOKS.glob("*.ipynb")}
    assert {"01_quickstart.ipynb", "02_elmo_in_your_model.ipynb", "03_pretrain_and_export.ipynb"} <= names


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_notebook_runs(path):
    before = path.read_bytes()
    nb, _ = _runner().execute(path)
    assert path.read_bytes() == before  # executed in memory only
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.get("execution_count") for cell in code_cells)
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert not errors
