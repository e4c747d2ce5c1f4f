"""kernels/xla_ffi_abi.py against the XLA FFI header that the installed jax ships: a tiny C program,
compiled with gcc against ``jax.ffi.include_dir()``, prints every offset, size and enum value the
Numba handler uses; each must equal its named constant."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tinyinterp.kernels import xla_ffi_abi as abi

jax = pytest.importorskip("jax")
HEADER = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")


def _measured(tmp_path) -> dict[str, int]:
    """{key of abi.C_EXPRESSIONS: the value its C expression has under the installed header}."""
    lines = [f'  printf("%s=%lld\\n", "{key}", (long long)({expr}));'
             for key, expr in abi.C_EXPRESSIONS.items()]
    src = tmp_path / "abi.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include \"xla/ffi/api/c_api.h\"\n"
                   "int main(void) {\n" + "\n".join(lines) + "\n  return 0;\n}\n")
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-I", jax.ffi.include_dir(), str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split("=") for line in out.splitlines())}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed: cannot compile the "
                    "header check (install gcc to run it; CI has it)")
def test_named_offsets_match_the_installed_header(tmp_path):
    assert os.path.exists(HEADER), f"jax {jax.__version__} ships no {HEADER}"
    measured = _measured(tmp_path)
    assert set(measured) == set(abi.C_EXPRESSIONS)
    wrong = {key: (getattr(abi, key.split()[0]), measured[key], abi.C_EXPRESSIONS[key])
             for key in measured if getattr(abi, key.split()[0]) != measured[key]}
    assert not wrong, f"constant: (named value, header's value, C expression): {wrong}"


def test_every_constant_is_checked():
    """No named offset escapes the header check (every upper-case int constant has a C
    expression)."""
    constants = {n for n, v in vars(abi).items() if n.isupper() and isinstance(v, int)}
    checked = {key.split()[0] for key in abi.C_EXPRESSIONS}
    assert constants == checked
