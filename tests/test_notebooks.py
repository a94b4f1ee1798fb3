"""Both notebooks run top to bottom (in their quick mode) without an error."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["training.ipynb", "inference.ipynb"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("SLM_QUICK", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name == "inference.ipynb":
        assert "identical: True" in text and "speedup" in text
    else:
        assert "best validation loss" in text and "--- seed 2" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot was drawn
