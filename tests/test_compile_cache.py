"""The CLI's persistent compilation cache: written where asked, bounded, off when asked, and a
folder that cannot be written is one warning, not an error. Each case runs in a child process
(the cache is process-wide JAX configuration)."""

import os
import subprocess
import sys

CHILD = """
import os, sys, warnings
import jax, jax.numpy as jnp
from tinyinterp.compile_cache import enable_compile_cache
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    where = enable_compile_cache(sys.argv[1] if sys.argv[1] != "-" else None, max_bytes=1 << 20)
print("WHERE", where)
print("WARN", len(w), w[0].message if w else "")
print("MAX", jax.config.jax_compilation_cache_max_size)
print("OUT", float(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.float32(0.5))))
"""


def _child(arg, env_value, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TINYINTERP_COMPILE_CACHE"] = env_value
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def test_cache_is_written_where_asked_and_reused(tmp_path):
    target = tmp_path / "cache"
    first = _child(str(target), "", tmp_path)
    assert first["WHERE"] == str(target) and first["WARN"].startswith("0")
    assert first["MAX"] == str(1 << 20)
    entries = set(os.listdir(target))
    assert entries  # the jitted program was kept
    second = _child(str(target), "", tmp_path)
    assert second["OUT"] == first["OUT"]  # same result from the loaded program


def test_default_folder_env_path_and_off(tmp_path):
    res = _child("-", "", tmp_path)
    assert res["WHERE"] == str(tmp_path / "xdg" / "tinyinterp" / "xla")
    assert os.listdir(tmp_path / "xdg" / "tinyinterp" / "xla")
    res = _child("-", str(tmp_path / "envdir"), tmp_path)
    assert res["WHERE"] == str(tmp_path / "envdir")
    off = tmp_path / "off"
    off.mkdir()
    res = _child("-", "0", off)
    assert res["WHERE"] == "None" and not (off / "xdg").exists()  # nothing written


def test_unwritable_folder_is_one_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = _child(str(blocker / "cache"), "", tmp_path)
    assert res["WHERE"] == "None" and res["WARN"].startswith("1")
    assert "not kept between runs" in res["WARN"] and res["OUT"]


NUMBA_CHILD = """
import sys, numpy as np
import jax
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if "cache_hit" in name else None)
from tinyinterp.compile_cache import enable_compile_cache
enable_compile_cache(sys.argv[1])
import tinyinterp
from tinyinterp.model import forward
cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_vocab=16,
                                   n_ctx=16, attn_only=True, attention_backend="numba")
m = tinyinterp.HookedTransformer.from_config(cfg, seed=0)
toks = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)
f = jax.jit(lambda p, t: forward(p, cfg, t))
assert "tinyinterp_" in f.lower(m.params, toks).as_text()  # the Numba kernels are in it
g = jax.jit(jax.grad(lambda p, t: forward(p, cfg, t, return_type="loss")))
before = len(hits)  # the two programs that call the kernels: compiled, or found in the cache
f.lower(m.params, toks).compile(), g.lower(m.params, toks).compile()
print("KERNEL_HITS", len(hits) - before)
xla = cfg.replace(attention_backend="xla")
gx = jax.grad(lambda p, t: forward(p, xla, t, return_type="loss"))(m.params, toks)
d_out = np.abs(np.asarray(f(m.params, toks)) - np.asarray(forward(m.params, xla, toks))).max()
d_grad = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(g(m.params, toks)), jax.tree.leaves(gx), strict=True))
print("HITS", len(hits))
print("DIFF", max(float(d_out), d_grad))
"""


def test_numba_programs_loaded_from_the_cache_compute_the_same(tmp_path):
    """A program that calls the Numba kernels, compiled in one process, is found in the cache by
    another (its attributes hold no address) and still calls that process's kernels: the FFI
    targets are found by name and the entries through the address table, and values and
    gradients equal the XLA path's."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TINYINTERP_COMPILE_CACHE"] = ""
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", NUMBA_CHILD, str(tmp_path / "c")], env=env,
                             capture_output=True, text=True, timeout=300, check=True).stdout
        runs.append(dict(line.split(" ", 1) for line in out.strip().splitlines()))
    assert int(runs[1]["HITS"]) > int(runs[0]["HITS"])  # the second process loaded programs
    # ... the kernels' programs among them: a call's attributes are the same in every process
    assert (int(runs[0]["KERNEL_HITS"]), int(runs[1]["KERNEL_HITS"])) == (0, 2), runs
    for r in runs:
        assert float(r["DIFF"]) < 1e-4, r
