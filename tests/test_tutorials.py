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
