"""Speed of grokking modular addition: the training step's two paths, the default command, and the
paper's setup to 99% test accuracy.

    python benchmarks/grokking.py                   # step paths + the default command, twice
    python benchmarks/grokking.py --paper           # also --paper's setup to 99% test accuracy
    python benchmarks/grokking.py --no-command --rounds 5

1. The full-batch training step (loss + gradient + AdamW update, one compiled program of 20 steps)
   on the default setup (p 59, 1,044 training pairs) and the paper's (p 113, 3,830 pairs), by two
   paths of the same parameters:
   - "model": ``tinyinterp.model.forward`` on the whole 3-token sequence, then the last position's
     logits: every position's attention and MLP, and the unembedding of all 3 positions, are
     computed (the naive step), on the XLA attention path (the model config's) and on "auto"
     (the Numba kernels where they apply);
   - "lean": ``tinyinterp.reproduce.grokking.last_position_logits``: only what the loss reads
     (the last position's query, MLP and unembedding; keys and value-outputs looked up from
     per-(token, position) tables instead of multiplied per example).
   The reproduction trains with "lean" (same function; tests/test_grokking.py checks the loss and
   gradients against "model") and analyses through the model's hooks. Printed: ms per step
   (median of rounds) and the lean/model speed-up, measured in this process.
2. ``tinyinterp reproduce grokking`` (default setup) end to end in a fresh process, twice (the
   second run is the "after the first run" number; XLA compiles in each process).
3. With --paper: ``grokking.train`` on the paper's setup until test accuracy first reaches 99%
   (goal < 3 min), and the steps that took.
Timings on a shared machine are noisy: compare the in-process ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from tinyinterp import fourier
from tinyinterp.reproduce import grokking as g
from tinyinterp.tasks import modular_addition_split

GOAL_DEFAULT_S = 40.0
GOAL_PAPER_S = 180.0


def step_times(p: int, train_fraction: float, rounds: int, steps: int = 20) -> dict[str, float]:
    """ms per full-batch AdamW step (median over ``rounds`` compiled scans of ``steps`` steps)
    for each path."""
    data = modular_addition_split(p, train_fraction, 0)
    tokens = jnp.asarray(data.tokens)[jnp.asarray(data.train_idx)]
    labels = jnp.asarray(data.labels)[jnp.asarray(data.train_idx)]
    out = {}
    paths = {"model (xla)": (g.model_last_position_logits, "xla"),
             "model (auto)": (g.model_last_position_logits, "auto"),
             "lean": (g.last_position_logits, "xla")}
    for name, (fn, backend) in paths.items():
        cfg = g.model_config(p).replace(attention_backend=backend)
        params = g.init_paper_params(cfg, jax.random.key(0))
        opt = g.standard_promotion(g.optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=1.0))

        def step(carry, _, fn=fn, cfg=cfg, opt=opt):
            params, state = carry
            loss, grads = jax.value_and_grad(
                lambda pr: fourier.cross_entropy(fn(pr, cfg, tokens), labels))(params)
            updates, state = opt.update(grads, state, params)
            return (g.optax.apply_updates(params, updates), state), loss

        run = jax.jit(lambda params, state, step=step: jax.lax.scan(step, (params, state), None,
                                                                    length=steps))
        state = opt.init(params)
        jax.block_until_ready(run(params, state))  # compile
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, state))
            times.append((time.perf_counter() - t0) / steps * 1e3)
        out[name] = statistics.median(times)
    return out


def command_time(out_dir: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tinyinterp.cli", "reproduce", "grokking", "--out",
                           out_dir], capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-command", action="store_true", help="skip the end-to-end command")
    ap.add_argument("--paper", action="store_true", help="also train the paper's setup to 99%%")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} (a shared machine: compare ratios)")
    for label, p, frac in (("default (p 59, 30%)", 59, 0.3), ("paper (p 113, 30%)", 113, 0.3)):
        t = step_times(p, frac, args.rounds)
        ref = t["model (xla)"]
        print(f"{label}: " + ", ".join(f"{k} {v:.1f} ms/step" for k, v in t.items())
              + f"; lean is {ref / t['lean']:.2f}x faster than the model path (xla), "
              f"{t['model (auto)'] / t['lean']:.2f}x than the model path (auto)")
    if not args.no_command:
        with tempfile.TemporaryDirectory() as d:
            for i in range(2):
                wall, rc = command_time(os.path.join(d, f"run{i}"))
                print(f"tinyinterp reproduce grokking, run {i + 1}: {wall:.1f} s (exit {rc}; goal "
                      f"< {GOAL_DEFAULT_S:.0f} s after the first run)")
    if args.paper:
        t0 = time.perf_counter()
        r = g.train(g.GrokkingConfig.paper(min_after_grok=0, after_grok=0.0))
        wall = time.perf_counter() - t0
        print(f"--paper setup to 99% test accuracy: step {r.grok_step}, {wall:.1f} s in "
              f"train() (compile included; goal < {GOAL_PAPER_S:.0f} s); stopped at step "
              f"{r.total_steps}")


if __name__ == "__main__":
    main()
