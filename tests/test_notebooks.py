"""The notebooks run top to bottom (their committed outputs come from such a run)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the [test] extra to execute notebooks")
nbclient = pytest.importorskip("nbclient", reason="install the [test] extra to execute notebooks")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: it imports the checkout under test (not whatever
    # galorex an editable install points at), and runs single-threaded, so another busy process on
    # a small machine cannot oversubscribe its cores and stall a cell past the timeout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_plot_cell_has_its_figure_in_the_committed_outputs(path):
    nb = nbformat.read(path, as_version=4)
    plot_cells = [c for c in nb.cells if c.cell_type == "code" and ("plt." in c.source or ".plot(" in c.source)]
    for cell in plot_cells:
        kinds = {k for o in cell.get("outputs", []) for k in o.get("data", {})}
        assert "image/png" in kinds, f"{path.name}: a plotting cell has no figure in its outputs:\n{cell.source[:200]}"
