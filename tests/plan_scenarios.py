"""For each plan setting of tinyinterp.fast.PLANS, a run (cached names + identity hooks on one
layer) that makes the planner choose it: shared by test_fast.py and the TL parity test."""

from __future__ import annotations

from tinyinterp.fast.plan import Plan


def identity(x, *, name):
    return x


def scenario(plan: Plan, layer: int) -> tuple[list[str], list[tuple[str, object]], str]:
    """(names to cache, fwd_hooks, backend) under which ``layer``'s sublayer runs ``plan``."""
    a = f"blocks.{layer}.attn"
    if plan.route == "plain":
        return [f"{a}.hook_z"], [(f"{a}.hook_pattern", identity)], "xla"
    if plan.route == "fused":
        return [], [], "numba"
    names, hooks = [f"{a}.hook_z"], []  # something inside the sublayer is read: not fused
    if plan.qkv == "kernel":
        names += [f"{a}.hook_q", f"{a}.hook_k", f"{a}.hook_v"]
    elif plan.qkv == "jnp":
        hooks.append((f"{a}.hook_k", identity))
    if plan.core == "writes":
        names += [f"{a}.hook_attn_scores", f"{a}.hook_pattern"]
    elif plan.core == "split":
        hooks.append((f"{a}.hook_pattern", identity))
    if plan.out == "kernel":
        names.append(f"{a}.hook_result")
    elif plan.qkv == "jnp":  # also the path where a hook edits the per-head results
        hooks.append((f"{a}.hook_result", identity))
    return names, hooks, "numba"
