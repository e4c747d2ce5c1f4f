"""What each fast path of tinyinterp.fast buys on the workloads users run.

    python benchmarks/fast_paths.py [--repeats 30] [--rounds 3]

For every workload below, the time with all fast paths on, and with one switched off
(``tinyinterp.fast.disabled``: the run plans as if that path did not exist, falling back to the
next one, in the end the plain jnp model), measured alternately in this process so both see the
same load. Prints time(off) / time(on) per (workload, path): > 1 means the path makes that
workload faster. A path that gains less than 10% on every workload has no place in the package.

Workloads, on the reference induction model (2 layers, attention-only, d_model 64, 4 heads of 16,
LN, vocabulary 64) at batch 64 x pos 64 unless said otherwise:
    train step        one optax AdamW step of the next-token loss (what `reproduce` and `train` run)
    forward           a plain jitted forward (evaluations, generation)
    full cache        run_with_cache() of every hook point
    qkv+result cache  a cache of q, k, v and hook_result of both layers (circuit analysis)
    pattern cache     a cache of every hook_pattern (attention views, detectors)
    pattern edited    a hook that edits hook_pattern (pattern patching, conservative LRP)
    embed gradient    the gradient of a logit difference at hook_embed, batch 8 (saliency, IG)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import tinyinterp
from tinyinterp import fast
from tinyinterp.model import forward, forward_with_cache

PATHS = ("numba", "fused", "packed", "qkv_kernel", "writes", "split", "out_kernel")


def workloads(batch: int, pos: int):
    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64,
                                       n_ctx=pos, attn_only=True, normalization_type="LN")
    params = tinyinterp.HookedTransformer.from_config(cfg, seed=0).params
    tokens = jax.random.randint(jax.random.key(1), (batch, pos), 0, cfg.d_vocab, jnp.int32)
    small = tokens[:8]
    names = tinyinterp.hook_names(cfg)
    opt = optax.adamw(1e-3)
    state = opt.init(params)

    def train_step(params, state):
        loss, grads = jax.value_and_grad(lambda p: forward(p, cfg, tokens, return_type="loss"))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def halve_diagonal(x, *, name):
        return x * (1.0 - 0.5 * jnp.eye(x.shape[-1], dtype=x.dtype))[None, None]

    def embed_grad(params):
        def metric(delta):
            logits = forward(params, cfg, small,
                             fwd_hooks=[("hook_embed", lambda x, *, name: x + delta)])
            return jnp.sum(logits[:, -1, 1] - logits[:, -1, 2])
        return jax.grad(metric)(jnp.zeros((8, pos, cfg.d_model), jnp.float32))

    qkv_result = [n for n in names if n.rsplit(".", 1)[-1] in ("hook_q", "hook_k", "hook_v",
                                                                "hook_result")]
    patterns = [n for n in names if n.endswith("hook_pattern")]
    return {
        "train step": (train_step, (params, state)),
        "forward": (lambda p: forward(p, cfg, tokens), (params,)),
        "full cache": (lambda p: forward_with_cache(p, cfg, tokens, names), (params,)),
        "qkv+result cache": (lambda p: forward_with_cache(p, cfg, tokens, qkv_result), (params,)),
        "pattern cache": (lambda p: forward_with_cache(p, cfg, tokens, patterns), (params,)),
        "pattern edited": (lambda p: forward(p, cfg, tokens,
                                             fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                                         halve_diagonal)]), (params,)),
        "embed gradient": (embed_grad, (params,)),
    }


def compiled(fn, args, off: tuple[str, ...]):
    """(A fresh jit of ``fn`` traced with the paths ``off`` switched off (plans are made at trace
    time), compiled and warmed up; its program's text)."""
    with fast.disabled(*off):
        f = jax.jit(lambda *a: fn(*a))  # a new function: JAX's trace cache is keyed on it
        text = f.lower(*args).as_text()
        jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    return f, text


def paired(f_on, f_off, args, repeats: int) -> float:
    """Median over rounds of time(off) / time(on), the two called alternately."""
    ratios = []
    for _ in range(repeats):
        t = []
        for f in (f_on, f_off):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            t.append(time.perf_counter() - t0)
        ratios.append(t[1] / t[0])
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="independent measurements per cell")
    args = ap.parse_args()
    tinyinterp.memory.tune_malloc()
    if fast.numba_unavailable_reason() is not None:
        raise SystemExit(f"the Numba backend is unavailable here: {fast.numba_unavailable_reason()}")
    loads = workloads(args.batch, args.pos)
    print(f"time with the path off / with it on (median of {args.repeats} alternating calls; "
          f"{args.rounds} rounds: min-max). {jax.device_count()} device(s), {jax.__version__}")
    print(f"{'workload':18s}" + "".join(f"{p:>14s}" for p in PATHS))
    best: dict[str, float] = {p: 0.0 for p in PATHS}
    for wname, (fn, fargs) in loads.items():
        f_on, text_on = compiled(fn, fargs, ())
        cells = []
        for path in PATHS:
            f_off, text_off = compiled(fn, fargs, (path,))
            if text_off == text_on:  # the workload never takes this path
                cells.append("-")
                continue
            rs = [paired(f_on, f_off, fargs, args.repeats) for _ in range(args.rounds)]
            best[path] = max(best[path], min(rs))
            cells.append(f"{min(rs):.2f}-{max(rs):.2f}" if max(rs) - min(rs) >= 0.005
                         else f"{rs[0]:.2f}")
        print(f"{wname:18s}" + "".join(f"{c:>14s}" for c in cells), flush=True)
    print("(-: the workload does not take that path)")
    print("\nbest gain of each path over all workloads (the lower end of its range):")
    for path, r in best.items():
        verdict = "keeps its place" if r >= 1.10 else "below 10% everywhere: remove"
        print(f"  {path:12s} {r:.2f}x  {verdict}")


if __name__ == "__main__":
    main()
