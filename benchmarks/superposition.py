"""Benchmark: wall time of `tinyinterp reproduce superposition` against the 60 s goal, and the
speed-up of training instances together (one jitted vmap) over training them one by one.

    python benchmarks/superposition.py [--quick] [--skip-full] [--out DIR] [--workers N] [--repeat K]

Timings on a shared machine are noisy: the load average is printed next to them, and --repeat
runs the reproduction K times and prints the spread. --workers 1 runs everything in one thread
(the worst case on a machine whose second core is busy), 2 trains the uniform-importance sweep in
a second thread (the default on 2+ cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

import tinyinterp
from tinyinterp import superposition as sp
from tinyinterp.reproduce import superposition as rep

GOAL_S = 60.0


def vmap_vs_sequential(n_instances: int = 8, n_steps: int = 2000) -> tuple[float, float]:
    """Seconds to train n_instances (n=5, m=2) vmapped vs one at a time (both after warm-up)."""
    cfg = sp.ToyModelConfig(n_features=5, n_hidden=2, n_instances=n_instances, n_steps=n_steps,
                            batch_size=1024, chunk_size=n_steps)
    imp = sp.importance_schedule(5, 0.9)
    probs = np.repeat(sp.feature_probability_schedule(n_instances)[:, None], 5, axis=1)
    key = jax.random.key(0)
    keys = sp.instance_keys(key, n_instances)
    sp.train(cfg, key, imp, probs)  # compile
    sp.train_single(cfg, keys[0], imp, probs[0])
    t = time.perf_counter()
    jax.block_until_ready(sp.train(cfg, key, imp, probs).params)
    t_vmap = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n_instances):
        jax.block_until_ready(sp.train_single(cfg, keys[i], imp, probs[i])[0])
    return t_vmap, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time the quick reproduction instead")
    ap.add_argument("--skip-full", action="store_true", help="only the vmap-vs-sequential ratio")
    ap.add_argument("--out", default=None, help="keep the report here (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=None, help="as in the reproduce command")
    ap.add_argument("--repeat", type=int, default=1, help="run the reproduction this many times")
    args = ap.parse_args()
    tinyinterp.memory.tune_malloc()  # keep freed buffers for reuse, as the CLI does
    print(f"load average: {os.getloadavg()}  cpus: {os.cpu_count()}")
    t_vmap, t_seq = vmap_vs_sequential()
    print(f"8 instances x 2000 steps: vmapped {t_vmap:.2f} s, one by one {t_seq:.2f} s "
          f"-> vmap speed-up x{t_seq / t_vmap:.2f}")
    if args.skip_full:
        return
    walls = []
    for r in range(args.repeat):
        sp._CHUNK_FN_CACHE.clear()  # every run compiles afresh, as the command does
        jax.clear_caches()
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            report = rep.run(args.out or d, seed=0, quick=args.quick, verbose=False,
                             workers=args.workers)
            wall = time.perf_counter() - t
        walls.append(wall)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items())
        print(f"reproduce superposition ({'quick' if args.quick else 'full'}, workers "
              f"{report['workers']}) run {r + 1}: {wall:.1f} s wall (including compilation and "
              f"figures) = {wall / GOAL_S:.2f} x the {GOAL_S:.0f} s goal [{parts}]  load average "
              f"before {load:.2f}, after {os.getloadavg()[0]:.2f}", flush=True)
    if len(walls) > 1:
        print(f"wall over {len(walls)} runs: min {min(walls):.1f} s, median "
              f"{float(np.median(walls)):.1f} s, max {max(walls):.1f} s")


if __name__ == "__main__":
    main()
