"""Forward-pass cost of caching: plain jitted forward vs. a forward that caches every hook point.

    python benchmarks/forward.py [--batch 64] [--pos 64] [--repeats 200]

Prints both times (median of repeats, compile excluded; the two are called alternately, so both
see the same load), the median per-round ratio (goal: full cache <= 1.15x a plain forward), and
the plain forward against the TransformerLens anchor: TL 3.9 on PyTorch 2.13 CPU, 2 threads, took
8.8 ms for this model and shape on this machine's kind (goal: >= 3x faster).
Both of ours are measured in this process; the anchor is a fixed number from another run, so read
that ratio with the machine's load in mind.

With the Numba backend the plain forward runs each block's attention sublayer as one fused kernel
(kernels/block.py); it also prints the same forward through the unfused path (an identity hook on
hook_z forces it), paired with the plain one, i.e. what the fused kernel buys.

It also prints what writing a full cache's outputs costs: a jitted function that runs the plain
forward and also returns fresh arrays of exactly the cache's shapes, each filled with a constant
(no other work). (plain + fill) / plain is what a cache built from XLA's own fusions pays for its
writes alone. It is not a hard floor: a two-thread Numba fill into XLA's buffers ran at ~34 GB/s
here against XLA's ~21 GB/s, but a fused kernel that wrote the hook points as it went was still
slower than the unfused path (kernels/block.py).

Last, the machine's write ceiling: the best of 200 two-thread memsets (libc, through ctypes, one
half each) of one warm buffer of the cache's size, and what writing the cache's bytes at that
rate alone would cost as a multiple of the plain forward, against the 0.15x the goal leaves for
everything a cache adds. (A C loop of AVX-512 stores or memset, without Python's thread start,
reached ~58-60 GB/s on this machine; this measures somewhat lower.)
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import threading
import time

import jax
import jax.numpy as jnp

import tinyinterp
from tinyinterp.model import forward, forward_with_cache

TL_ANCHOR_MS = 8.8


def paired_ms(fn_a, fn_b, *args, repeats: int) -> tuple[float, float, float]:
    """Median ms of fn_a and of fn_b, and the median of their per-round ratio b / a. The two are
    called alternately, so both see the same load on a shared machine."""
    for fn in (fn_a, fn_b):  # compile + warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    ratio = statistics.median(b / a for a, b in zip(*times, strict=True))
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1]), ratio


def fill_like(cfg, shapes):
    """The plain forward plus fresh outputs of the given shapes, each filled with a constant that
    depends on the params (so XLA cannot fold them into constants)."""

    def fn(p, t):
        c = p["unembed"]["b_U"][0]
        return forward(p, cfg, t), [jnp.full(s, c + i) for i, s in enumerate(shapes)]

    return jax.jit(fn)


def write_ceiling_gbs(nbytes: int, repeats: int = 200) -> float:
    """GB/s of the best of ``repeats`` two-thread memsets of one warm ``nbytes`` buffer (ctypes
    calls release the GIL, so the two halves are written at once)."""
    buf = ctypes.create_string_buffer(nbytes)
    addr, half = ctypes.addressof(buf), nbytes // 2

    def write(i: int, value: int) -> None:
        ctypes.memset(addr + i * half, value, half)

    best = math.inf
    for r in range(repeats):
        threads = [threading.Thread(target=write, args=(i, r % 127)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * half / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    tinyinterp.memory.tune_malloc()  # keep freed buffers for reuse, as the CLI does
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    for backend in ("xla", "numba"):
        cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64,
                                           n_ctx=max(64, args.pos), attn_only=True,
                                           normalization_type="LN", attention_backend=backend)
        model = tinyinterp.HookedTransformer.from_config(cfg, seed=0)
        tokens = jax.random.randint(jax.random.key(0), (args.batch, args.pos), 0, cfg.d_vocab,
                                    dtype=jnp.int32)
        names = frozenset(model.hook_names)
        plain = jax.jit(lambda p, t, cfg=cfg: forward(p, cfg, t))
        cached = jax.jit(lambda p, t, cfg=cfg, names=names: forward_with_cache(p, cfg, t, names))
        t_plain, t_cache, ratio = paired_ms(plain, cached, model.params, tokens, repeats=args.repeats)
        shapes = [x.shape for x in jax.tree.leaves(cached(model.params, tokens))]
        mib = sum(4 * math.prod(s) for s in shapes) / 2**20
        _, t_floor, floor = paired_ms(plain, fill_like(cfg, shapes), model.params, tokens,
                                      repeats=args.repeats)
        resolved = tinyinterp.fast.resolve_backend(backend)
        unfused_line = ""
        if resolved == "numba":
            hooks = [(f"blocks.{i}.attn.hook_z", lambda x, *, name: x) for i in range(cfg.n_layers)]
            unfused = jax.jit(lambda p, t, cfg=cfg, hooks=hooks: forward(p, cfg, t, fwd_hooks=hooks))
            _, t_unfused, fused_gain = paired_ms(plain, unfused, model.params, tokens,
                                                 repeats=args.repeats)
            unfused_line = (f"  plain, unfused      {t_unfused:8.3f} ms   (the same forward without "
                            f"the fused sublayer kernel: {fused_gain:.2f}x the fused one)")
        print(f"\nattention backend {backend!r} (runs as {resolved!r}), batch {args.batch}, "
              f"pos {args.pos}, 2-layer attn-only d_model 64, {len(names)} hook points cached")
        print(f"  plain forward       {t_plain:8.3f} ms")
        if unfused_line:
            print(unfused_line)
        print(f"  full-cache forward  {t_cache:8.3f} ms")
        print(f"  cache / plain       {ratio:8.3f}x   (goal <= 1.15x)")
        print(f"  plain + fill        {floor:8.3f}x   (plain forward + XLA writing the cache's "
              f"{len(shapes)} outputs, {mib:.1f} MiB, as constants: {t_floor:.3f} ms)")
        print(f"  TL anchor / plain   {TL_ANCHOR_MS / t_plain:8.2f}x   (goal >= 3x; TL 3.9 at "
              f"{TL_ANCHOR_MS} ms, a fixed number from another run)")
        if resolved == "numba":
            gbs = write_ceiling_gbs(int(mib * 2**20))
            t_write = mib * 2**20 / gbs / 1e6
            print(f"  write ceiling       {gbs:8.1f} GB/s (2-thread memset of a warm {mib:.1f} MiB "
                  f"buffer): the cache's bytes alone at that rate take {t_write:.3f} ms = "
                  f"{t_write / t_plain:.2f}x the plain forward (the goal leaves 0.15x)")


if __name__ == "__main__":
    main()
