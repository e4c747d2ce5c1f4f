"""SAE sweep speed: the lambda sweep of one dictionary size trained one run at a time (``train_sae``
in a loop, as `tinyinterp reproduce sae` did) against the same runs as one batched program
(``train_sae_sweep``), on the reproduction's ground-truth data. Prints wall times (compile
included and excluded), the process's CPU time (less inflated than wall time on a shared
machine) and the ratios, measured in this process; and the largest difference in
the final losses between the two (they are the same runs, to float32 rounding).

    python benchmarks/sae.py [--steps 500] [--sizes 256 512 1024] [--full-command]
    python benchmarks/sae.py --recipe 4000 [--lr 1e-2 --warmup 0.05 --resample-every 125 --pool 48]

``--full-command`` also times the whole `tinyinterp reproduce sae` (run(), figures included).
``--recipe STEPS`` asks whether a shorter schedule reaches the full run's results: it trains the
reproduction's dictionary-512 lambda sweep (one batched program) for STEPS steps with the given
lr, warm-up fraction, resampling cadence and candidate pool (batches), and prints MMCS, L0, dead
fraction and FVE per lambda beside the full run's (8000 steps, lr 3e-3, resampling every 250;
seed 0, measured on the idle machine in session 9, ``FULL_RUN``), and the CPU time (the work
scales with the steps).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from tinyinterp import sae

LAMBDAS = [0.01, 0.05, 0.1, 0.3, 1.0]
# `tinyinterp reproduce sae`, seed 0, dictionary 512 (report.json of the session-9 run):
# lambda -> (MMCS, L0, dead fraction, FVE)
FULL_RUN = {0.01: (0.8666, 16.73, 0.0, 0.9882), 0.05: (0.9960, 6.88, 0.0, 0.9862),
            0.1: (0.9985, 5.57, 0.0, 0.9801), 0.3: (0.9988, 4.24, 0.0, 0.9286),
            1.0: (0.8301, 2.42, 0.201, 0.4792)}


def recipe(args) -> None:
    gt = sae.GroundTruth.make(d=256, n_features=512, avg_active=5.0, decay=0.99, seed=0)
    x_eval = gt.sample(32768)
    every = args.resample_every
    cfgs = [sae.SAEConfig(d_in=256, d_sae=512, l1_coefficient=lam, lr=args.lr, batch_size=256,
                          n_steps=args.recipe, resample_every=every, chunk_size=every,
                          lr_warmup_fraction=args.warmup, resample_pool=args.pool)
            for lam in LAMBDAS]
    root = jax.random.key(0)  # the reproduction's keys for dictionary 512 (column j = 1)
    keys = [jax.random.fold_in(root, i * 100 + 1) for i in range(len(LAMBDAS))]
    t, c = time.perf_counter(), time.process_time()
    runs = sae.train_sae_sweep(cfgs, keys, gt.batch_fn(256))
    print(f"{args.recipe} steps, lr {args.lr:g}, warm-up {args.warmup:g}, resampling every "
          f"{every} (pool {args.pool} batches): {time.perf_counter() - t:.0f} s wall, "
          f"{time.process_time() - c:.0f} CPU-s (compile included); the full run is 8000 steps")
    for lam, res in zip(LAMBDAS, runs, strict=True):
        score, _ = sae.mmcs(gt.features, res.params["W_dec"])
        m = sae.metrics(res.params, x_eval, cfg=res.cfg)
        full = FULL_RUN[lam]
        print(f"  lambda {lam:4g}: MMCS {score:.4f} (full {full[0]:.4f}), L0 {m['l0']:.2f} "
              f"({full[1]:.2f}), dead {m['dead_fraction']:.3f} ({full[2]:.3f}), FVE "
              f"{m['fraction_variance_explained']:.4f} ({full[3]:.4f})")


def _configs(size: int, steps: int) -> list[sae.SAEConfig]:
    return [sae.SAEConfig(d_in=256, d_sae=size, l1_coefficient=lam, lr=3e-3, batch_size=256,
                          n_steps=steps, resample_every=250, chunk_size=250) for lam in LAMBDAS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--full-command", action="store_true")
    ap.add_argument("--recipe", type=int, default=0, metavar="STEPS")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.0)
    ap.add_argument("--resample-every", type=int, default=250)
    ap.add_argument("--pool", type=int, default=16)
    args = ap.parse_args()
    if args.recipe:
        recipe(args)
        return
    gt = sae.GroundTruth.make(d=256, n_features=512, avg_active=5.0, decay=0.99, seed=0)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {len(LAMBDAS)} lambdas x "
          f"{args.steps} steps of batch 256 per dictionary size")
    for size in args.sizes:
        cfgs = _configs(size, args.steps)
        keys = [jax.random.key(i) for i in range(len(cfgs))]
        times, cpu = {}, {}
        finals = {}
        for mode in ("one at a time", "batched"):
            batch_fn = gt.batch_fn(256)  # a fresh data source: nothing compiled is reused
            runs = []
            for attempt in ("compile+run", "run"):
                t, c = time.perf_counter(), time.process_time()
                if mode == "batched":
                    runs = sae.train_sae_sweep(cfgs, keys, batch_fn)
                else:
                    runs = [sae.train_sae(c, k, batch_fn) for c, k in zip(cfgs, keys, strict=True)]
                jax.block_until_ready(runs[-1].params)
                times[(mode, attempt)] = time.perf_counter() - t
                cpu[(mode, attempt)] = time.process_time() - c
            finals[mode] = np.array([r.history["loss"][-1] for r in runs])
        a, b = times[("one at a time", "run")], times[("batched", "run")]
        ac, bc = times[("one at a time", "compile+run")], times[("batched", "compile+run")]
        diff = np.max(np.abs(finals["batched"] - finals["one at a time"]) /
                      np.abs(finals["one at a time"]))
        print(f"dict {size:5d}: one at a time {a:7.2f} s (with compile {ac:7.2f} s), batched "
              f"{b:7.2f} s (with compile {bc:7.2f} s): batched/one-at-a-time = {b / a:.2f} "
              f"({bc / ac:.2f} with compile); CPU time {cpu[('one at a time', 'run')]:.1f} s vs "
              f"{cpu[('batched', 'run')]:.1f} s (ratio "
              f"{cpu[('batched', 'run')] / cpu[('one at a time', 'run')]:.2f}); final losses "
              f"differ by <= {diff:.1e} (relative)")
    if args.full_command:
        import tempfile

        from tinyinterp.reproduce import sae as rep

        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            rep.run(d, verbose=False)
            print(f"tinyinterp reproduce sae (full run, figures included): "
                  f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
