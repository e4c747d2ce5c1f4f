"""SAE sweep speed: the lambda sweep of one dictionary size trained one run at a time (``train_sae``
in a loop, as `tinyinterp reproduce sae` did) against the same runs as one batched program
(``train_sae_sweep``), on the reproduction's ground-truth data. Prints wall times (compile
included and excluded), the process's CPU time (less inflated than wall time on a shared
machine) and the ratios, measured in this process; and the largest difference in
the final losses between the two (they are the same runs, to float32 rounding).

    python benchmarks/sae.py [--steps 500] [--sizes 256 512 1024] [--full-command]

``--full-command`` also times the whole `tinyinterp reproduce sae` (run(), figures included).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from tinyinterp import sae

LAMBDAS = [0.01, 0.05, 0.1, 0.3, 1.0]


def _configs(size: int, steps: int) -> list[sae.SAEConfig]:
    return [sae.SAEConfig(d_in=256, d_sae=size, l1_coefficient=lam, lr=3e-3, batch_size=256,
                          n_steps=steps, resample_every=250, chunk_size=250) for lam in LAMBDAS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--full-command", action="store_true")
    args = ap.parse_args()
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
