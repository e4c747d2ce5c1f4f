"""kernels/ (installed as tinyinterp.kernels) is importable and usable without JAX, and its modules
import each other relatively and only by public names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")


def test_the_kernel_modules_are_the_expected_ones():
    """The import check below covers every kernel module (a new one is covered automatically)."""
    assert {"attention", "block", "ffi", "simd", "targets", "work", "xla_ffi_abi"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_kernel_module_does_not_import_jax(module):
    code = (f"import sys, tinyinterp.kernels.{module}; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", MODULES)
def test_kernel_modules_import_each_other_relatively_and_publicly(module):
    """`from .simd import vload`, never `from tinyinterp.kernels.simd import ...` nor a private
    name of another kernel module (what is shared is public: kernels/work.py)."""
    tree = ast.parse((KERNELS / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[:2] in (
                ["tinyinterp", "kernels"], ["kernels"])
            assert not absolute, f"{module}.py line {node.lineno}: import kernel modules relatively"
            if node.level > 0:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module}.py line {node.lineno} imports private {private}"
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            assert not any(n.startswith(("tinyinterp", "kernels")) for n in names), names
    assert "__path__" not in (KERNELS / f"{module}.py").read_text()


def test_the_package_init_imports_nothing():
    """kernels/__init__.py holds no __path__ trick and imports no kernel module (nor numba or
    numpy) eagerly: only the standard library it needs to check Numba's cache."""
    tree = ast.parse((KERNELS / "__init__.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module != "__future__"]
    assert imported <= {"hashlib", "os"}, imported
    assert "__path__" not in (KERNELS / "__init__.py").read_text()


def test_a_kernel_runs_without_jax():
    """The kernels are numpy in, numpy out: one runs (and matches numpy) with JAX never imported."""
    code = """
import sys
import numpy as np
from tinyinterp.kernels.attention import attention_fwd
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 5, 1, 4), dtype=np.float32) for _ in range(3))
z, lse = np.empty_like(q), np.empty((2, 1, 5), np.float32)
empty = np.empty((0, 0, 0, 0), np.float32)
attention_fwd(q, k, v, (0, 0, 0), np.float32(0.5), z, lse, empty, empty, np.ones(1, np.int64), 0)
s = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
p = np.exp(s - s.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
np.testing.assert_allclose(z, np.einsum("bhqk,bkhd->bqhd", p, v), rtol=1e-5, atol=1e-6)
assert "jax" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr


def test_numba_caches_of_changed_kernel_sources_are_dropped(tmp_path):
    """Numba's cache checks only the defining file; a change to any kernel source must drop the
    package's cached kernels (an ffi.py entry links block.py's kernel), and nothing else."""
    import shutil

    pkg = tmp_path / "kernels"
    shutil.copytree(KERNELS, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    cache = pkg / "__pycache__"
    cache.mkdir()
    ours = [cache / "ffi.sublayer_fwd_entry-688.py311.nbi",
            cache / "ffi.sublayer_fwd_entry-688.py311.1.nbc"]
    others = [cache / "notes.txt", cache / "elsewhere.f-1.py311.nbi"]

    def import_fresh():
        for path in ours + others:
            path.write_bytes(b"x")
        r = subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [p.exists() for p in ours], [p.exists() for p in others]

    assert import_fresh() == ([False, False], [True, True])  # no record yet: dropped
    assert import_fresh() == ([True, True], [True, True])  # sources unchanged: kept
    (pkg / "block.py").write_text((pkg / "block.py").read_text() + "\n# edited\n")
    assert import_fresh() == ([False, False], [True, True])  # a kernel changed: dropped
