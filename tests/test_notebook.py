"""demo.ipynb, the teaching notebook: the committed copy is what scripts/make_demo_notebook.py builds, with every code
cell's output and no errors; and the notebook runs again from top to bottom in the repository root (a few minutes on
a 2-core CPU with the embedded model), every code cell giving output and every section its pictures."""

import copy
import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demo.ipynb"
CELL_TIMEOUT = 600  # seconds; the slowest cell (training) takes about a minute


def load_builder():
    spec = importlib.util.spec_from_file_location("make_demo_notebook", ROOT / "scripts" / "make_demo_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(str(NOTEBOOK), as_version=4)


def test_committed_notebook_is_what_the_builder_writes(committed):
    built = load_builder().build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], \
        "demo.ipynb differs from scripts/make_demo_notebook.py: edit the script and run it"


def test_committed_notebook_has_every_output_and_no_error(committed):
    nbformat.validate(committed)
    for i, cell in enumerate(code_cells(committed)):
        assert cell.outputs, f"code cell {i} has no output: rebuild with python scripts/make_demo_notebook.py"
        assert cell.execution_count is not None, f"code cell {i} was not run"
        for output in cell.outputs:
            assert output.output_type != "error", f"code cell {i}: {output.get('ename')}: {output.get('evalue')}"
            assert output.get("name") != "stderr", f"code cell {i} wrote to stderr: {output.get('text', '')[:300]}"
    sections = [c for c in committed.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert sum(images(cell) for cell in code_cells(committed)) >= len(sections) - 1  # "Where next" has none
    assert "weights/sd-shapes.safetensors" in "".join(o.get("text", "") for o in code_cells(committed)[0].outputs), \
        "build the committed notebook with the embedded model, which CI runs too (move the SD 1.5 weights aside)"
    assert NOTEBOOK.stat().st_size < 1_500_000  # pictures at modest size and dpi: the file stays light on GitHub


def test_notebook_runs_top_to_bottom(committed, tmp_path, monkeypatch):
    # The kernel runs this interpreter (ipykernel's own spec for sys.executable), not whatever "python3" kernel a
    # user-wide Jupyter set-up names: JUPYTER_PATH comes first in the kernel search.
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(str(tmp_path / "kernels" / "python3"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))

    nb = copy.deepcopy(committed)
    for cell in code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    # Raises CellExecutionError, naming the cell and the exception, as soon as a cell raises.
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    for i, (ran, kept) in enumerate(zip(code_cells(nb), code_cells(committed))):
        assert ran.outputs, f"code cell {i} gave no output"
        assert not [o for o in ran.outputs if o.output_type == "error"], f"code cell {i} gave an error output"
        assert images(ran) == images(kept), f"code cell {i} drew {images(ran)} pictures, the committed one {images(kept)}"
