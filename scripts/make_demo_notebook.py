"""Build demo.ipynb, the teaching notebook, from its source demo.py (jupytext's percent format): read it with
jupytext, run it with nbclient, and save it with its outputs (pictures included) so that it reads well on GitHub
without running.

Edit the cells in demo.py, never in demo.ipynb.
Run: python scripts/make_demo_notebook.py [--no-execute] [--output demo.ipynb]
It prints how long each section took; tests/test_notebook.py runs the notebook again in CI. Both run it with the
embedded model only, whatever else lies in weights/.
"""

import argparse
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

from sd.files import atomic_output

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "demo.py"  # the notebook's cells, in jupytext's percent format
EMBEDDED_MODEL = "weights/sd-shapes.safetensors"  # the model the committed notebook and CI run
CELL_TIMEOUT = 600  # seconds for one cell; the whole notebook takes a few minutes on a 2-core CPU
# Where jupytext notes how the text was laid out (jupytext.cell_metadata._JUPYTEXT_CELL_METADATA): meaningless in
# the .ipynb, and they would change it whenever a blank line in demo.py does.
JUPYTEXT_CELL_KEYS = ("lines_to_next_cell", "lines_to_end_of_cell_marker", "cell_marker")


def build(source: Path = SOURCE) -> nbformat.NotebookNode:
    """The notebook of demo.py, not run: its cells and its header's kernelspec, without jupytext's bookkeeping
    (the "jupytext" notebook metadata, the cells' layout notes) and with stable ids, so that rebuilding gives a
    small diff."""
    nb = jupytext.read(source)
    nb.metadata.pop("jupytext", None)
    for i, cell in enumerate(nb.cells):
        for key in JUPYTEXT_CELL_KEYS:
            cell.metadata.pop(key, None)
        cell["id"] = f"cell-{i:02d}"
    return nb


def section_of(nb: nbformat.NotebookNode) -> list[str]:
    """The section heading each cell falls under ("setup" before the first)."""
    sections, current = [], "setup"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = cell.source.splitlines()[0][3:]
        sections.append(current)
    return sections


def execute(nb: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT) -> dict[str, float]:
    """Run every cell in order (a cell that raises stops the run with CellExecutionError); returns seconds per
    section, and strips the timing metadata nbclient leaves on each cell.

    The working directory is a temporary one whose weights/ holds only the embedded model, so the notebook runs as
    in CI even where the SD 1.5 weights lie in the repository's weights/ (on a CPU they would take hours). The
    kernel is this interpreter (ipykernel's spec for sys.executable, first on JUPYTER_PATH), not whatever "python3"
    kernel a user-wide Jupyter set-up names, and it imports this repository's sd (first on PYTHONPATH)."""
    from ipykernel.kernelspec import write_kernel_spec

    saved = {name: os.environ.get(name) for name in ("JUPYTER_PATH", "PYTHONPATH")}
    with tempfile.TemporaryDirectory() as scratch:
        cwd = Path(scratch) / "repo"
        (cwd / "weights").mkdir(parents=True)
        shutil.copy(ROOT / EMBEDDED_MODEL, cwd / EMBEDDED_MODEL)  # 21 MB
        write_kernel_spec(str(Path(scratch) / "kernels" / "python3"))
        os.environ["JUPYTER_PATH"] = scratch
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    seconds: dict[str, float] = {}
    for section, cell in zip(section_of(nb), nb.cells):
        timing = cell.metadata.pop("execution", None)
        if timing and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            begin, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            seconds[section] = seconds.get(section, 0.0) + (end - begin).total_seconds()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "demo.ipynb")
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    args = parser.parse_args()
    nb = build()
    if not args.no_execute:
        start = time.perf_counter()
        seconds = execute(nb)
        for section, s in seconds.items():
            print(f"{s:7.1f} s  {section}")
        print(f"{time.perf_counter() - start:7.1f} s  in all (with the kernel's start)")
    nbformat.validate(nb)
    with atomic_output(args.output) as tmp:  # the committed notebook is replaced whole or not at all
        nbformat.write(nb, str(tmp))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
