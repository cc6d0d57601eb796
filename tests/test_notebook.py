"""notebooks/colab_demo.ipynb runs end to end on CPU (tiny sizes) and writes its figures."""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests import train_helpers as th

FIGURES = ("pretraining_loss.png", "spectrogram.png", "attention_maps.png")

pytestmark = pytest.mark.notebook


def test_the_colab_demo_executes_and_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("ASDA_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("ASDA_NOTEBOOK_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("ASDA_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PYTHONPATH", f"{th.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(th.ROOT / "notebooks" / "colab_demo.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(th.ROOT)}}).execute()
    for name in FIGURES:
        with Image.open(tmp_path / "figures" / name) as image:
            assert image.size[0] > 200 and image.size[1] > 100, name
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "test accuracy after 4 steps" in printed
    assert (tmp_path / "run" / "finetune" / "eval.json").exists()
