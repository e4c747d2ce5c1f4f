"""Which code runs a block's attention sublayer: a plan, made once per block per trace.

A plan is a small frozen value; ``PLANS`` lists every setting one can take. It is decided from the
backend, the config, the hook context (which hook points a run reads or edits), the residual's
shape and its dtype, and nothing else:

    route "plain"    the plain ``model.attention_sublayer`` (the "xla" backend; any dtype other
                     than float32, which the kernels never cast to)
    route "fused"    one Numba kernel runs the whole sublayer (norm, q/k/v, attention, output,
                     residual add) when no hook point inside it is read or edited
    route "kernels"  the sublayer step by step, visiting its hook points, with Numba kernels for:
      qkv  "packed"  q, k, v made by one matmul into one [batch, pos, 3, head, d_head] array that
                     the attention kernels read in place (nobody reads q, k, v, the scores or the
                     pattern: with a pattern written, the q/k/v kernel measured 1.1-1.4x faster)
           "kernel"  q, k, v written by a kernel (a cache reads them; nobody edits them)
           "jnp"     q, k, v by one jnp matmul (norm folded in) and sliced: a run edits them
      core "fused"   attention without ever building the pattern (nobody reads it)
           "writes"  the fused kernel also writes the scores / pattern a cache reads
           "split"   scores and z by two kernels around the plain softmax (a hook edits them)
      out  "kernel"  the per-head results and their sum written by one kernel (a cache reads
                     hook_result; nobody edits it)
           "jnp"     the plain output projection

Every setting gives the plain function's values (to float32 rounding) and its gradients (each
kernel is paired with the jnp it replaces; tests/test_fast.py runs every setting).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

import jax.numpy as jnp

from tinyinterp.config import TransformerConfig
from tinyinterp.hooks import HookContext

LANES = 16  # the kernels' float32 vector width: the shapes they take are whole vectors
MIN_FUSED_BATCH = 2  # the fused kernel's work items are batch rows: fewer leave a core idle


@dataclass(frozen=True)
class Plan:
    route: str  # "plain" | "fused" | "kernels"
    qkv: str = ""  # route "kernels": "packed" | "kernel" | "jnp"
    core: str = ""  # route "kernels": "fused" | "writes" | "split"
    out: str = ""  # route "kernels": "kernel" | "jnp"

    def __str__(self) -> str:
        if self.route != "kernels":
            return self.route
        return f"kernels(qkv={self.qkv}, core={self.core}, out={self.out})"


PLAIN, FUSED = Plan("plain"), Plan("fused")
PLANS = (PLAIN, FUSED) + tuple(
    Plan("kernels", qkv, core, out)
    for qkv, core, out in itertools.product(("packed", "kernel", "jnp"), ("fused", "writes", "split"),
                                            ("kernel", "jnp"))
    if not (qkv == "packed" and core != "fused"))  # packed: only where nobody reads the pattern

# Fast paths switched off (tests and benchmarks A/B them; a trace reads this when it plans).
_off = threading.local()


@contextlib.contextmanager
def disabled(*paths: str):
    """Plan without the named fast paths while the block runs ("fused", "packed", "qkv_kernel",
    "writes", "split", "out_kernel", or "numba" for all of them). Only traces made inside the
    block see it: use a fresh ``jax.jit`` inside it, and call ``jax.clear_caches()`` first where
    the function calls jitted functions of its own (``tinyinterp.attribution``'s methods, for
    one): JAX reuses their traces whatever this block says. Compare the two programs' text
    (``.lower(...).as_text()``) to see that they differ."""
    known = {"fused", "packed", "qkv_kernel", "writes", "split", "out_kernel", "numba"}
    if not set(paths) <= known:
        raise ValueError(f"unknown fast paths {sorted(set(paths) - known)}; known: {sorted(known)}")
    before = getattr(_off, "paths", frozenset())
    _off.paths = before | frozenset(paths)
    try:
        yield
    finally:
        _off.paths = before


def sublayer_hook_names(layer: int, cfg: TransformerConfig) -> list[str]:
    """The hook points strictly inside a block's attention sublayer, in forward order."""
    b = f"blocks.{layer}"
    names = [] if cfg.normalization_type is None else [f"{b}.ln1.hook_scale",
                                                        f"{b}.ln1.hook_normalized"]
    names += [f"{b}.attn.hook_{k}" for k in ("q", "k", "v", "attn_scores", "pattern", "z", "result")]
    return names + [f"{b}.hook_attn_out"]


def plan_sublayer(backend: str, cfg: TransformerConfig, hp: HookContext, layer: int,
                  shape: tuple[int, ...], dtype, exclude: tuple[str, ...] = ()) -> Plan:
    """The plan for one block's attention sublayer (see the module docstring), without the fast
    paths ``exclude`` names (nor those switched off by ``disabled``)."""
    off = getattr(_off, "paths", frozenset()) | frozenset(exclude)
    if backend != "numba" or dtype != jnp.float32 or "numba" in off:
        return PLAIN
    a = f"blocks.{layer}.attn"
    vectors = cfg.d_model % LANES == 0 and (cfg.n_heads * cfg.d_head) % LANES == 0
    if (vectors and shape[0] >= MIN_FUSED_BATCH and "fused" not in off
            and not any(hp.wants(n) for n in sublayer_hook_names(layer, cfg))):
        return FUSED
    qkv_names = [f"{a}.hook_{c}" for c in "qkv"]
    sp_names = [f"{a}.hook_attn_scores", f"{a}.hook_pattern"]
    edits_sp = any(hp.replaces(n) for n in sp_names)
    if edits_sp:
        core = "split" if "split" not in off else None
    elif any(hp.wants(n) for n in sp_names):
        core = "writes" if "writes" not in off else None
    else:
        core = "fused"
    if core is None:  # the run edits or reads what the kernel would skip: plain attention
        return PLAIN
    if core == "fused" and not any(hp.wants(n) for n in qkv_names) and "packed" not in off:
        qkv = "packed"
    elif (not any(hp.replaces(n) for n in qkv_names) and (cfg.n_heads * cfg.d_head) % LANES == 0
          and "qkv_kernel" not in off):
        qkv = "kernel"
    else:
        qkv = "jnp"
    r = f"{a}.hook_result"
    out = ("kernel" if hp.wants(r) and not hp.replaces(r) and cfg.d_model % LANES == 0
           and "out_kernel" not in off else "jnp")
    return Plan("kernels", qkv, core, out)
