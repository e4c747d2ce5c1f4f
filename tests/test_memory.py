"""tinyinterp.memory: glibc malloc settings, applied only when asked (tune_malloc), with an opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tinyinterp import memory

CHECK = ("import tinyinterp, tinyinterp.memory as m; tinyinterp.HookedTransformer; "
         "before = m._applied; m.tune_malloc(); print(before, m._applied)")


def _applied_in_fresh_process(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TINYINTERP_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", CHECK], env=environ, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_applied_only_when_asked_unless_opted_out():
    glibc = memory.keep_freed_memory()  # False with another C library: then nothing is applied
    assert _applied_in_fresh_process() == f"None {glibc}"  # importing changes nothing
    assert _applied_in_fresh_process(TINYINTERP_MALLOC="default") == "None False"
    assert _applied_in_fresh_process(MALLOC_TRIM_THRESHOLD_="131072") == "None False"  # glibc's own wins


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.keep_freed_memory() is False
