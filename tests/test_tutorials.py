"""Every lesson in tutorials/ runs as a plain script and its own assertions hold.

Lessons are jupytext percent-format .py files; each is run in a fresh interpreter (as a learner
would: `python tutorials/NN_name.py`), with its figures sent to a temporary folder through
TINYINTERP_TUTORIAL_OUT. New lessons are picked up by the glob, no change here needed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


def test_there_are_lessons():
    assert LESSONS, f"no tutorials/*.py lessons found under {ROOT / 'tutorials'}"


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_as_a_script(lesson, tmp_path):
    # tinyinterp as installed (as the tests import it; the repository root is not put on the path,
    # where the top-level kernels/ folder would shadow other packages of that name)
    env = {**os.environ, "TINYINTERP_TUTORIAL_OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(lesson)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (f"{lesson.name} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    figures = list(tmp_path.glob("*.png"))
    if figures:  # lessons that draw write real images where they say
        assert all(f.stat().st_size > 1000 for f in figures)


def test_every_lesson_is_listed_in_the_tutorials_readme():
    readme = (ROOT / "tutorials" / "README.md").read_text()
    missing = [p.name for p in LESSONS if p.name not in readme]
    assert not missing, f"tutorials/README.md does not list {missing}"


@pytest.mark.slow
def test_lesson_runs_as_a_notebook(tmp_path, monkeypatch):
    """The notebook form executes: the cheapest lesson, converted by jupytext and run cell by
    cell in a Jupyter kernel by nbclient (what opening it in Jupyter and running all does)."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    lesson = ROOT / "tutorials" / "01_model_from_the_inside.py"
    notebook = jupytext.read(lesson)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code_cells) > 5 and any(c.cell_type == "markdown" for c in notebook.cells)
    monkeypatch.setenv("TINYINTERP_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell (an assert included)
    printed = "".join(out.get("text", "") for c in code_cells for out in c.get("outputs", [])
                      if out.get("output_type") == "stream")
    assert "all checks hold" in printed
    assert len(list(tmp_path.glob("*.png"))) >= 3
