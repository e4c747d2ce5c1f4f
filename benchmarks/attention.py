"""Numba vs XLA causal attention on the CPU: forward and forward+backward, measured in one process.

    python benchmarks/attention.py                 # the three issue shapes + the training step
    python benchmarks/attention.py --repeats 20 --no-train-step
    python benchmarks/attention.py --shapes 8,8,256,32

Prints medians (warm-up excluded, jitted, block_until_ready; XLA and Numba timed alternately),
the ratio xla_time / numba_time (> 1 means Numba is faster), the same ratio in process CPU time,
and the useful causal work in GFLOP/s as a fraction of the peak (2 cores x one core's FMA
throughput, measured at the start; wall clock), plus Numba's
useful FLOP per CPU-second as a fraction of one core's peak (kernel efficiency, less sensitive to
other jobs). Timings on a shared machine are noisy; only ratios measured in the same run mean
anything. Then one AdamW training step of the default induction model with each backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.fast import numba_unavailable_reason
from tinyinterp.fast.attention import causal_attention


def measured_core_peak_gflops(seconds: float = 0.3) -> float:
    """One core's float32 FMA throughput, measured: 12 independent chains of 16-lane fused
    multiply-adds (kernels/simd.py) in registers, best of 5 runs. The peak the kernels could reach,
    on this machine, now (a VM does not tell its clock or its FMA units)."""
    from numba import njit

    from tinyinterp.kernels.simd import LANES, vadd, vfma, vload, vsplat, vstore

    @njit
    def chains(n, x, out):
        a, b = vsplat(np.float32(1.0000001)), vsplat(np.float32(0.9999999))
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = vload(x, 0)
        for _ in range(n):
            c0, c1, c2, c3 = vfma(a, c0, b), vfma(a, c1, b), vfma(a, c2, b), vfma(a, c3, b)
            c4, c5, c6, c7 = vfma(a, c4, b), vfma(a, c5, b), vfma(a, c6, b), vfma(a, c7, b)
            c8, c9, c10, c11 = vfma(a, c8, b), vfma(a, c9, b), vfma(a, c10, b), vfma(a, c11, b)
        s = vadd(vadd(vadd(c0, c1), vadd(c2, c3)), vadd(vadd(c4, c5), vadd(c6, c7)))
        vstore(out, 0, vadd(s, vadd(vadd(c8, c9), vadd(c10, c11))))

    x, out = np.ones(LANES, np.float32), np.empty(LANES, np.float32)
    chains(10, x, out)  # compile
    t = time.perf_counter()
    chains(1_000_000, x, out)
    n = max(1_000_000, int(1_000_000 * seconds / (time.perf_counter() - t)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        chains(n, x, out)
        best = min(best, time.perf_counter() - t)
    return n * 12 * LANES * 2 / best / 1e9


SHAPES = ((8, 8, 256, 32), (64, 4, 64, 16), (4, 8, 1024, 64))  # (batch, heads, pos, d_head)


def causal_flops(batch: int, heads: int, pos: int, d_head: int, backward: bool) -> float:
    """Useful FLOPs: only the pos*(pos+1)/2 unmasked (query, key) pairs count.

    Forward: q.k and p.v, 2 FLOP per multiply-add each -> 4 * d_head per pair. The backward adds
    the 4 products a non-recomputing backward needs (dP, dQ, dK, dV) -> 8 * d_head more; the
    recomputed q.k of our backward is not counted as useful."""
    pairs = batch * heads * pos * (pos + 1) / 2
    return pairs * d_head * (4 + (8 if backward else 0))


def _paired_times(fn_a, fn_b, args, repeats: int):
    """Median wall and CPU (all threads of the process) seconds of fn_a and fn_b, measured
    alternately so that both see the same load on a shared machine."""
    for fn in (fn_a, fn_b):  # compile + warm-up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    wall, cpu = ([], []), ([], [])
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return ([statistics.median(w) for w in wall], [statistics.median(c) for c in cpu])


def _attention_fns(backend: str):
    fwd = jax.jit(lambda q, k, v: causal_attention(q, k, v, backend=backend))

    def loss(q, k, v, g):
        return jnp.sum(causal_attention(q, k, v, backend=backend) * g)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fwd, fwd_bwd


def bench_shapes(shapes, repeats: int) -> None:
    core_peak = measured_core_peak_gflops()
    peak = 2 * core_peak  # the machine's 2 cores
    print(f"peak: {peak:.0f} GFLOP/s = 2 cores x {core_peak:.0f} GFLOP/s, one core's float32 "
          "FMA throughput measured just now (12 chains of 16-lane FMAs in registers)")
    print("ratio = xla time / numba time (>1: numba faster); %peak = useful causal GFLOP/s / peak")
    print("cpu ratio = the same with process CPU time (all threads), less sensitive to other load")
    print("%peak(cpu) = useful FLOP per CPU-second of numba / the per-core peak "
          f"({peak / 2:.0f} GFLOP/s): kernel efficiency, even when other jobs share the cores")
    header = (f"{'batch,heads,pos,d':>18} {'pass':>8} {'xla ms':>9} {'numba ms':>9} {'ratio':>6} "
              f"{'cpu ratio':>9} {'numba GF/s':>10} {'%peak':>6} {'xla %peak':>9} "
              f"{'%peak(cpu)':>10}")
    print(header)
    for (b, h, t, d) in shapes:
        rng = np.random.default_rng(0)
        q, k, v, g = (jnp.asarray(rng.standard_normal((b, t, h, d), dtype=np.float32))
                      for _ in range(4))
        xla_fwd, xla_fb = _attention_fns("xla")
        nb_fwd, nb_fb = _attention_fns("numba")
        for name, xf, nf, args, backward in (("fwd", xla_fwd, nb_fwd, (q, k, v), False),
                                             ("fwd+bwd", xla_fb, nb_fb, (q, k, v, g), True)):
            (tx, tn), (cx, cn) = _paired_times(xf, nf, args, repeats)
            flops = causal_flops(b, h, t, d, backward)
            gf_n, gf_x = flops / tn / 1e9, flops / tx / 1e9
            print(f"{f'{b},{h},{t},{d}':>18} {name:>8} {tx * 1e3:9.2f} {tn * 1e3:9.2f} "
                  f"{tx / tn:6.2f} {cx / cn:9.2f} {gf_n:10.1f} {100 * gf_n / peak:5.1f}% "
                  f"{100 * gf_x / peak:8.1f}% {100 * flops / cn / 1e9 / (peak / 2):9.1f}%",
                  flush=True)


def bench_train_step(repeats: int) -> None:
    """One AdamW step of the default induction model (2 attn-only layers, d_model 64, 4 heads of 16,
    vocab 64, seq 64, batch 64) with attention_backend "numba" vs "xla"."""
    try:
        import optax

        import tinyinterp
        from tinyinterp.model import forward
    except Exception as e:  # noqa: BLE001 - the model may not exist yet in this checkout
        print(f"training step: skipped, model not importable ({type(e).__name__}: {e})")
        return
    steps = {}
    for backend in ("xla", "numba"):
        cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16,
                                           d_vocab=64, n_ctx=64, attn_only=True,
                                           attention_backend=backend)
        model = tinyinterp.HookedTransformer.from_config(cfg, seed=0)
        params = model.params if hasattr(model, "params") else model
        opt = optax.adamw(1e-3)

        def loss_fn(p, tokens, cfg=cfg):
            logits = forward(p, cfg, tokens)  # [batch, pos, d_vocab]
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        @jax.jit
        def step(p, s, tokens, opt=opt, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        steps[backend] = (step, params, opt.init(params))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (64, 64)), jnp.int32)
    (step_x, p_x, s_x), (step_n, p_n, s_n) = steps["xla"], steps["numba"]
    loss_x, loss_n = step_x(p_x, s_x, tokens)[2], step_n(p_n, s_n, tokens)[2]
    (tx, tn), (cx, cn) = _paired_times(lambda t: step_x(p_x, s_x, t), lambda t: step_n(p_n, s_n, t),
                                       (tokens,), repeats)
    print(f"training step (induction model: 2 attn-only layers, d_model 64, 4 heads x 16, vocab 64,"
          f" batch 64 x seq 64, AdamW): xla {tx * 1e3:.2f} ms, numba {tn * 1e3:.2f} ms, "
          f"ratio {tx / tn:.2f}, cpu ratio {cx / cn:.2f} (first-step loss xla {float(loss_x):.6f},"
          f" numba {float(loss_n):.6f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="batch,heads,pos,d_head tuples (default: the three issue shapes)")
    parser.add_argument("--no-train-step", action="store_true")
    parser.add_argument("--train-step", action="store_true", help="only the training step")
    args = parser.parse_args()
    problem = numba_unavailable_reason()
    if problem is not None:
        raise SystemExit(f"numba backend unavailable: {problem}")
    import numba

    print(f"jax {jax.__version__}, numba {numba.__version__}; the kernels run on XLA's thread pool")
    if not args.train_step:
        shapes = (SHAPES if args.shapes is None
                  else [tuple(int(x) for x in s.split(",")) for s in args.shapes])
        bench_shapes(shapes, args.repeats)
    if not args.no_train_step:
        bench_train_step(args.repeats)


if __name__ == "__main__":
    main()
