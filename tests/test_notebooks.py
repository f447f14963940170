"""Every notebook under notebooks/ runs top to bottom (nbclient) against a tiny checkpoint; a failing cell fails."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed (pip install '.[notebooks]')")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed (pip install '.[notebooks]')")
pytest.importorskip("matplotlib", reason="the notebooks extra is not installed (pip install '.[notebooks]')")

import checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# which tiny checkpoint each notebook runs on (the notebooks' own defaults are the published models)
CHECKPOINT_OF = {
    "01_quickstart": "chat-e2b",
    "02_vision": "media-e2b",
    "03_audio": "media-e2b",
    "04_inside_the_moe": "chat-26b",
    "05_long_context_memory": "text-e2b",
}


@pytest.fixture(scope="module")
def tiny(chat_checkpoint, text_checkpoint, multimodal_checkpoint, tmp_path_factory):
    def media_chat():
        out = tmp_path_factory.mktemp("media-chat-e2b")
        shutil.copytree(multimodal_checkpoint("e2b", audio=True), out, dirs_exist_ok=True)
        return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)

    makers = {"chat-e2b": lambda: chat_checkpoint("e2b"), "chat-26b": lambda: chat_checkpoint("26b"),
              "text-e2b": lambda: text_checkpoint("e2b"), "media-e2b": media_chat}
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = makers[kind]()
        return made[kind]

    return get


def test_every_notebook_is_covered_and_committed_without_outputs():
    assert {p.stem for p in NOTEBOOKS} == set(CHECKPOINT_OF)
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"
        assert "MLX_GEMMA4_MODEL" in "".join(c.source for c in book.cells), f"{path.name} ignores MLX_GEMMA4_MODEL"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_GEMMA4_MODEL", str(tiny(CHECKPOINT_OF[path.stem])))
    monkeypatch.setenv("MLX_GEMMA4_MAX_TOKENS", "12")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) when a cell fails
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
