"""demo.ipynb, the teaching notebook: the committed copy holds the cells of its source demo.py (jupytext's percent
format), with every code cell's output and no errors; and the notebook runs again from top to bottom (about two
minutes on a 2-core CPU with the embedded model), every code cell giving output and every picture drawn again."""

import copy
import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demo.ipynb"
SOURCE = ROOT / "demo.py"
MAX_BYTES = 1_500_000  # pictures at modest size and dpi keep the file light to read on GitHub


def load_builder():
    spec = importlib.util.spec_from_file_location("make_demo_notebook", ROOT / "scripts" / "make_demo_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def pictures(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


@pytest.fixture(scope="module")
def builder():
    return load_builder()


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(str(NOTEBOOK), as_version=4)


def test_committed_notebook_is_its_source(committed):
    compile(SOURCE.read_text(encoding="utf-8"), str(SOURCE), "exec")  # plain Python: magics commented, as jupytext does
    source = jupytext.read(SOURCE)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in source.cells], \
        "demo.ipynb differs from its source demo.py: edit demo.py and run python scripts/make_demo_notebook.py"


def test_committed_notebook_has_every_output_and_no_error(committed):
    nbformat.validate(committed)
    for i, cell in enumerate(code_cells(committed)):
        assert cell.outputs, f"code cell {i} has no output: rebuild with python scripts/make_demo_notebook.py"
        assert cell.execution_count is not None, f"code cell {i} was not run"
        for output in cell.outputs:
            assert output.output_type != "error", f"code cell {i}: {output.get('ename')}: {output.get('evalue')}"
            assert output.get("name") != "stderr", f"code cell {i} wrote to stderr: {output.get('text', '')[:300]}"
    setup_output = "".join(output.get("text", "") for output in code_cells(committed)[0].outputs)
    assert "weights/sd-shapes.safetensors" in setup_output  # built with the embedded model, as CI runs it
    sections = [c for c in committed.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert sum(pictures(cell) for cell in code_cells(committed)) >= len(sections) - 1  # "Where next" has none
    assert NOTEBOOK.stat().st_size < MAX_BYTES


def test_notebook_runs_top_to_bottom(builder, committed):
    nb = copy.deepcopy(committed)
    for cell in code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    # nbclient with a "python3" kernel of this interpreter, a per-cell timeout, the embedded model in weights/;
    # raises CellExecutionError, naming the cell and its exception, as soon as a cell raises.
    builder.execute(nb)

    for i, (ran, kept) in enumerate(zip(code_cells(nb), code_cells(committed))):
        assert ran.outputs, f"code cell {i} gave no output"
        assert not [o for o in ran.outputs if o.output_type == "error"], f"code cell {i} gave an error output"
        assert pictures(ran) == pictures(kept), f"code cell {i} drew {pictures(ran)} pictures, the committed one {pictures(kept)}"
