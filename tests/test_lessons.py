"""Every lesson runs top to bottom as a notebook, from a directory that is not the repository.

jupytext turns the percent-format `.py` into a notebook in memory and nbclient executes it in a
`python3` kernel (ipykernel), as Jupyter would after `make notebooks`. The working directory is a
fresh temporary folder, so a lesson that finds its data relative to the working directory fails.
"""

import re
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def test_lessons_exist():
    assert LESSONS, "no lessons found"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_as_notebook(lesson, tmp_path, monkeypatch):
    # The kernel inherits this environment: a headless backend (plt.show() returns at once),
    # one thread per lesson, this checkout's package first on the path, and a fresh IPython
    # profile (no user startup files, no history written to the home directory).
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / ".ipython"))
    notebook = jupytext.read(lesson)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": tmp_path}}
    )
    try:
        client.execute()
        return
    except CellExecutionError:
        pass  # fail below, outside the handler, so that the report is the failing cell only
    cell, error = next(
        (cell, output)
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    )
    traceback = ANSI_ESCAPE.sub("", "\n".join(error.traceback))
    pytest.fail(
        f"{lesson.name}: cell In[{cell.execution_count}] failed in {tmp_path}:\n"
        f"{cell.source}\n{'-' * 40}\n{traceback}",
        pytrace=False,
    )
