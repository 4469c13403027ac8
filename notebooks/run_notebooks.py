"""Execute the notebooks of this folder, as CI does; with --write, save their fresh outputs in place.

    python3 notebooks/run_notebooks.py                  # run all, report times, write nothing
    python3 notebooks/run_notebooks.py --write          # run all and commit-ready outputs in place
    python3 notebooks/run_notebooks.py --write 01_quickstart.ipynb

Each notebook runs in a fresh ``python3`` kernel from this folder (so relative paths such as ``data/`` and
``../benchmarks`` resolve), stops at the first error, and uses matplotlib's inline backend, which is
non-interactive and stores figures as PNG. ``tests/test_notebooks.py`` calls ``execute`` without writing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT_S = 300
# Non-interactive: figures become PNG outputs, nothing tries to open a window (CI has no display).
MPL_BACKEND = "module://matplotlib_inline.backend_inline"


def notebooks() -> list[pathlib.Path]:
    """The notebooks of this folder, in order."""
    return sorted(HERE.glob("*.ipynb"))


def execute(path: str | os.PathLike, timeout: int = CELL_TIMEOUT_S,
            record_timing: bool = False) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in a fresh kernel; raises nbclient's CellExecutionError on the first error.

    Returns the executed notebook (outputs filled in, the file untouched) and the seconds it took.
    ``record_timing`` keeps each cell's start and end times in its metadata (left out of committed files).
    """
    path = pathlib.Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            record_timing=record_timing, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=dict(os.environ, MPLBACKEND=MPL_BACKEND))
    return nb, time.perf_counter() - start


def _print_cell_times(nb: nbformat.NotebookNode) -> None:
    for index, cell in enumerate(nb.cells):
        timing = cell.metadata.pop("execution", None)
        if cell.cell_type == "code" and timing:
            start, end = (datetime.datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            first_line = cell.source.splitlines()[0] if cell.source else ""
            print(f"  cell {index:2d}: {(end - start).total_seconds():6.1f} s  {first_line[:70]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the notebooks (CI's check); --write saves outputs.")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every *.ipynb here)")
    parser.add_argument("--write", action="store_true", help="write the executed notebooks back in place")
    parser.add_argument("--cell-times", action="store_true", help="print each code cell's run time (not written)")
    args = parser.parse_args(argv)
    paths = [pathlib.Path(p) if os.sep in p or os.path.exists(p) else HERE / p for p in args.notebooks] or notebooks()
    for path in paths:
        nb, seconds = execute(path, record_timing=args.cell_times)
        if args.cell_times:
            _print_cell_times(nb)
        if args.write:
            nbformat.write(nb, path)
        size = path.stat().st_size / 1e3
        print(f"{path.name}: {seconds:.0f} s{f', written ({size:.0f} kB)' if args.write else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
