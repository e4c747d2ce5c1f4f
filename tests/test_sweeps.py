"""Issue 23: the kernels and the sweeps on two devices (forced CPU devices, in a child process:
JAX fixes its device count when it starts). tests/two_devices.py holds the checks; one child
process runs them all, so JAX starts and the kernels load once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMEOUT_S = 600  # a hard bound: a hung child is killed and the tests fail


def _child_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    return env


@pytest.fixture(scope="module")
def two_device_results() -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "two_devices.py")], env=_child_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["check"]] = row
    if not rows:
        pytest.fail(f"the two-device child printed no results (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
    return rows


def _names() -> list[str]:
    source = (HERE / "two_devices.py").read_text()
    return [line.split("def ")[1].split("(")[0] for line, prev in
            zip(source.splitlines()[1:], source.splitlines(), strict=False)
            if prev.strip() == "@check"]


@pytest.mark.parametrize("name", _names())
def test_two_devices(two_device_results, name):
    row = two_device_results.get(name)
    assert row is not None, f"check {name} did not report (the child stopped before it)"
    assert row["ok"], row["error"]
