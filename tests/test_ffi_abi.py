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


def test_every_target_has_one_entry_for_the_kernel_the_table_names():
    """kernels/targets.py is the one table: each target's entry in kernels/ffi.py runs the
    FfiKernel description that the table names, and the descriptions are consistent."""
    import ast
    import inspect

    from tinyinterp.kernels import attention, block, ffi, targets

    assert tuple(ffi.ENTRIES) == targets.TARGETS
    modules = {"attention": attention, "block": block}
    for target, (module, name) in targets.KERNELS.items():
        call = ast.parse(inspect.getsource(ffi.ENTRIES[target])).body[0].body[0].value
        assert ast.unparse(call.args[-1]) == f"{module}.{name}", target
        kernel = getattr(modules[module], name)
        assert 0 <= kernel.split < len(kernel.args) + len(kernel.rets), target
        assert all(r >= 1 for r in kernel.args + kernel.rets), target
