"""Activation-patching sweeps: one compiled batched program vs the same patches one at a time.

    python benchmarks/patching.py                 # the reference induction shape
    python benchmarks/patching.py --repeats 10 --backend xla

The reference shape of issue 15: 2 layers, attention-only, d_model 64, 4 heads of 16, LN;
batch 8 x pos 64. Two sweeps: ``get_act_patch_resid_pre`` ([2, 64]: 128 patched runs) and
``get_act_patch_attn_head_out_by_pos`` ([2, 64, 4]: 512 patched runs). Each is timed as

* sweep: the library call (one compiled program: the target run, every patched run folded into the
  batch in chunks, each starting at its layer), steady state (compiled once beforehand), with the
  built-in metric ``A.logit_diff`` (it reads one position, so where the patch lies before the last
  block, that block runs at that position only) and, alternately, the same metric as a plain
  function (the whole model runs);
* loop: the same patches driven one at a time from Python, each a call of ONE jitted function
  (compiled once; the patch index is a traced argument, so no recompilation) that runs the whole
  model with the patch hook, as TransformerLens' ``generic_activation_patch`` does.

Prints medians (warm-up excluded), the loop/sweep ratio, and the issue's goal against
TransformerLens 3.9 (PyTorch CPU, 2 threads) measured on this machine's kind: 0.31 s and 1.29 s,
goal 10x faster (31 ms, 129 ms). On a shared machine timings are noisy; ratios measured in the
same run are what mean something.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp import attribution as A
from tinyinterp import patching as P
from tinyinterp.model import forward

TL_SECONDS = {"resid_pre": 0.31, "attn_head_out_by_pos": 1.29}


# Per-example logit difference at the last position (a typical patching metric), as the built-in
# metric (it says which position it reads, so a patched run computes the last block there only)
# and as a plain function (the whole model runs), timed alternately.
BUILT_IN = A.logit_diff(correct=1, wrong=2, pos=-1)


def metric(logits, tokens):
    return logits[:, -1, 1] - logits[:, -1, 2]


def _median_time(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def _paired_time(fn_a, fn_b, repeats: int):
    """(median, min, max) seconds of fn_a and of fn_b, called alternately after a warm-up each."""
    jax.block_until_ready(fn_a())
    jax.block_until_ready(fn_b())
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn_a())
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(fn_b())
        tb.append(time.perf_counter() - t)
    return ((statistics.median(ta), min(ta), max(ta)), (statistics.median(tb), min(tb), max(tb)))


def _one_patch_fn(model: HookedTransformer, family: str):
    """One jitted function per hook point: a whole forward with one patch, the patch index traced."""
    cfg = model.cfg

    def make(layer):
        name = P.get_act_name(P.FAMILIES[family].act, layer)

        @jax.jit
        def one(params, tokens, source, pos, head):
            def hook(value, *, name):
                if family == "resid_pre":
                    return value.at[:, pos].set(source[:, pos])
                return value.at[:, pos, head].set(source[:, pos, head])

            logits = forward(params, cfg, tokens, fwd_hooks=[(name, hook)])
            return jnp.mean(metric(logits, tokens))

        return name, one

    return [make(layer) for layer in range(cfg.n_layers)]


def python_loop(model, tokens, cache, family: str, fns) -> np.ndarray:
    """Every patch of the family, one jitted forward per patch, driven from Python."""
    cfg = model.cfg
    n_pos = tokens.shape[1]
    heads = range(cfg.n_heads) if family != "resid_pre" else [0]
    out = np.zeros((cfg.n_layers, n_pos, len(heads)), np.float32)
    for layer, (name, one) in enumerate(fns):
        src = cache[name]
        for pos in range(n_pos):
            for h in heads:
                out[layer, pos, h] = float(one(model.params, tokens, src, jnp.int32(pos),
                                               jnp.int32(h)))
    return out if family != "resid_pre" else out[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-repeats", type=int, default=2)
    ap.add_argument("--backend", default="auto", choices=("auto", "numba", "xla"))
    ap.add_argument("--chunk-size", type=int, default=None)
    args = ap.parse_args()

    cfg = TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=64,
                            attn_only=True, normalization_type="LN",
                            attention_backend=args.backend)
    model = HookedTransformer.from_config(cfg, seed=0)
    key = jax.random.key(0)
    clean = jax.random.randint(jax.random.fold_in(key, 1), (8, 64), 0, cfg.d_vocab, jnp.int32)
    corrupted = jax.random.randint(jax.random.fold_in(key, 2), (8, 64), 0, cfg.d_vocab, jnp.int32)
    _, clean_cache = model.run_with_cache(clean)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, backend={args.backend}; model "
          f"2 layers attn-only d_model 64, 4 heads x 16, LN; batch 8 x pos 64")
    for family in ("resid_pre", "attn_head_out_by_pos"):
        fn = getattr(P, f"get_act_patch_{family}")
        t0 = time.perf_counter()
        res = fn(model, corrupted, clean_cache, metric, chunk_size=args.chunk_size)
        first = time.perf_counter() - t0
        built_in = fn(model, corrupted, clean_cache, BUILT_IN, chunk_size=args.chunk_size)
        sweep, plain = _paired_time(
            lambda fn=fn: fn(model, corrupted, clean_cache, BUILT_IN,
                             chunk_size=args.chunk_size).values,
            lambda fn=fn: fn(model, corrupted, clean_cache, metric,
                             chunk_size=args.chunk_size).values, args.repeats)
        fns = _one_patch_fn(model, family)
        loop_vals = python_loop(model, corrupted, clean_cache, family, fns)  # compiles
        loop = _median_time(lambda f=family, g=fns: python_loop(model, corrupted, clean_cache, f, g),
                            args.loop_repeats)
        err = float(np.abs(loop_vals - res.values).max())
        n = int(np.prod(res.shape))
        tl = TL_SECONDS[family]
        print(f"\nget_act_patch_{family} {list(res.shape)} ({n} patched runs, chunk "
              f"{res.settings['chunk_size']}): first call (compile + run) {first:.2f} s")
        print(f"  sweep (one program)      median {sweep[0] * 1e3:8.2f} ms  "
              f"(min {sweep[1] * 1e3:.2f}, max {sweep[2] * 1e3:.2f}), built-in metric A.logit_diff")
        print(f"  the same, plain metric   median {plain[0] * 1e3:8.2f} ms  "
              f"(min {plain[1] * 1e3:.2f}, max {plain[2] * 1e3:.2f}): whole model; "
              f"{plain[0] / sweep[0]:.2f}x the built-in metric's time; max |difference| "
              f"{float(np.abs(built_in.values - res.values).max()):.2e}")
        print(f"  one at a time (Python)   median {loop[0] * 1e3:8.2f} ms  "
              f"(min {loop[1] * 1e3:.2f}, max {loop[2] * 1e3:.2f})")
        print(f"  loop / sweep = {loop[0] / sweep[0]:.1f}x; max |difference| {err:.2e}")
        print(f"  vs TransformerLens {tl:.2f} s: {tl / sweep[0]:.1f}x faster (goal >= 10x, "
              f"<= {tl / 10 * 1e3:.0f} ms): {'met' if sweep[0] <= tl / 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
