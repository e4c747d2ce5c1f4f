"""Speed of grokking modular addition: the training step's paths, the training loop against the
previous one (same process), the default command, and the paper's setup to 99% test accuracy.

    python benchmarks/grokking.py                   # step paths, old vs new loop, the command twice
    python benchmarks/grokking.py --paper           # also --paper to 99% test accuracy
    python benchmarks/grokking.py --no-command --rounds 5

1. The full-batch training step (loss + gradient + AdamW update, one compiled scan of 20 steps)
   on the default setup's training pairs and the paper's (p 113, 30%: 3,830 pairs), by the paths
   that compute the same function of the same parameters:
   - "model (xla)" / "model (auto)": ``tinyinterp.model.forward`` on the whole 3-token sequence,
     then the last position's logits (the naive step: every position's attention, MLP and
     unembedding), on the XLA attention path and on "auto" (the Numba kernels where they apply);
   - "lean, W_out then W_U" (the previous session's step): only the last position's query,
     attention, MLP and unembedding; keys and values looked up from per-(token, position) tables;
   - "lean, via W_L": the same, with the MLP output sent to the logits through W_L = W_out @ W_U;
   - "lean" (the previous step): via W_L where p <= d_model / 2 (the default setup), W_out
     then W_U otherwise (the paper's p 113);
   - "grouped" (the reproduction's step, ``grokking.grouped_last_position_logits``): per-token
     tables with gather-and-sum gradients, W_O folded into W_in and W_U, W_L's gradient
     computed transposed.
   Printed: wall ms and CPU ms per step (medians of rounds, the paths interleaved), steps/s, and
   each path's wall and CPU time over "grouped".
2. The training loop in this process: the first session's chunk (the old lean step; every 10
   steps, the loss and accuracy of all p^2 pairs) and ``grokking._make_chunk`` with the lean step
   and with the grouped step (the training pairs' loss and accuracy from the step's own forward
   pass, the test pairs' every ``eval_every`` steps): steps/s and CPU ms per step of each.
3. ``tinyinterp reproduce grokking`` (default setup) end to end in a fresh process, twice (the
   second run is the "after the first run" number; XLA compiles in each process), with the
   report's own split of the time (train / analysis / figures).
4. With --paper: ``grokking.train`` on the paper's setup until test accuracy first reaches 99%
   (goal < 3 min), the steps that took, wall and CPU seconds.
Timings on a shared machine are noisy: the load average is printed; compare the in-process ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp import fourier
from tinyinterp.reproduce import grokking as g
from tinyinterp.tasks import modular_addition_split

GOAL_DEFAULT_S = 40.0
GOAL_PAPER_S = 180.0


def _old_lean(params, cfg, tokens):
    return g.last_position_logits(params, cfg, tokens, via_W_L=False)


def _lean_W_L(params, cfg, tokens):
    return g.last_position_logits(params, cfg, tokens, via_W_L=True)


def _grouped(params, cfg, tokens):  # tokens: the benchmark's fixed (concrete) batch
    return g.grouped_last_position_logits(params, cfg, g.position_groups(tokens))


PATHS = {"model (xla)": (g.model_last_position_logits, "xla"),
         "model (auto)": (g.model_last_position_logits, "auto"),
         "lean, W_out then W_U": (_old_lean, "xla"),
         "lean, via W_L": (_lean_W_L, "xla"),
         "lean": (g.last_position_logits, "xla"),
         "grouped": (_grouped, "xla")}


def _timed(fns: dict, args: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median CPU seconds of this process) of ``fns[name](*args[name])``
    over ``rounds``, after one call each that compiles; the rounds interleave the functions, so a
    change in the machine's load falls on all of them alike."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args[name]))
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def step_times(tc: g.GrokkingConfig, rounds: int, steps: int = 20) -> dict[str, tuple]:
    """(wall ms, CPU ms) per full-batch AdamW step (medians over ``rounds`` compiled scans of
    ``steps`` steps) for each of ``PATHS`` on ``tc``'s training pairs."""
    data = modular_addition_split(tc.p, tc.train_fraction, tc.seed)
    tokens = jnp.asarray(data.tokens)[jnp.asarray(data.train_idx)]
    labels = jnp.asarray(data.labels)[jnp.asarray(data.train_idx)]
    fns, args = {}, {}
    for name, (fn, backend) in PATHS.items():
        cfg = g.model_config(tc.p).replace(attention_backend=backend)
        params = g.init_paper_params(cfg, 0)
        opt = g.standard_promotion(g.optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=1.0))

        def step(carry, _, fn=fn, cfg=cfg, opt=opt):
            params, state = carry
            loss, grads = jax.value_and_grad(
                lambda pr: fourier.cross_entropy(fn(pr, cfg, tokens), labels))(params)
            updates, state = opt.update(grads, state, params)
            return (g.optax.apply_updates(params, updates), state), loss

        fns[name] = jax.jit(lambda params, state, step=step: jax.lax.scan(
            step, (params, state), None, length=steps))
        args[name] = (params, opt.init(params))
    return {name: (w / steps * 1e3, c / steps * 1e3)
            for name, (w, c) in _timed(fns, args, rounds).items()}


def _old_chunk(tc: g.GrokkingConfig, cfg, data, frozen):
    """The previous session's training chunk: the old lean step, its gradient masked by a traced
    bool tree, and every 10 steps the loss and accuracy of all p^2 pairs (train and test) by a
    separate forward pass."""
    opt, _ = g._make_chunk(tc, cfg, data, frozen)
    tokens, labels = jnp.asarray(data.tokens), jnp.asarray(data.labels)
    is_train = jnp.asarray(data.is_train).astype(jnp.float32)
    tr = jnp.asarray(data.train_idx)
    frozen = jax.tree_util.tree_map(jnp.asarray, frozen)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(
            lambda pr: fourier.cross_entropy(_old_lean(pr, cfg, tokens[tr]), labels[tr]))(params)
        grads = jax.tree_util.tree_map(lambda gr, f: jnp.where(f, jnp.zeros_like(gr), gr), grads,
                                       frozen)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (g.optax.apply_updates(params, updates), opt_state), loss

    def evaluate(params):
        logits = _old_lean(params, cfg, tokens)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1)[:, 0]
        ok = (jnp.argmax(logits, axis=-1).astype(jnp.int32) == labels).astype(jnp.float32)
        n_tr, n_te = jnp.sum(is_train), jnp.sum(1.0 - is_train)
        return jnp.stack([jnp.sum(nll * is_train) / n_tr, jnp.sum(ok * is_train) / n_tr,
                          jnp.sum(nll * (1 - is_train)) / n_te, jnp.sum(ok * (1 - is_train)) / n_te])

    def block(carry, _):
        metrics = evaluate(carry[0])
        carry, losses = jax.lax.scan(step, carry, None, length=10)
        return carry, (metrics, losses)

    @jax.jit
    def chunk(params, opt_state):
        carry, out = jax.lax.scan(block, (params, opt_state), None, length=tc.snapshot_every // 10)
        return carry[0], carry[1], out

    return chunk


def loop_ab(tc: g.GrokkingConfig, rounds: int) -> dict[str, tuple[float, float]]:
    """(steps/s, CPU ms per step) of the first session's training chunk and of ``_make_chunk``
    with the lean and the grouped step, on ``tc`` (same params, same process)."""
    data = modular_addition_split(tc.p, tc.train_fraction, tc.seed)
    cfg = g.model_config(tc.p)
    params = g.init_paper_params(cfg, tc.seed)
    frozen = g.frozen_mask(params)
    opt, grouped = g._make_chunk(tc.replace(step_path="grouped"), cfg, data, frozen)
    _, lean = g._make_chunk(tc.replace(step_path="lean"), cfg, data, frozen)
    args = (params, opt.init(params))
    fns = {"old": _old_chunk(tc, cfg, data, frozen), "lean": lean, "grouped": grouped}
    t = _timed(fns, dict.fromkeys(fns, args), rounds)
    return {name: (tc.snapshot_every / w, c / tc.snapshot_every * 1e3) for name, (w, c) in t.items()}


def command_time(out_dir: str, *extra: str) -> tuple[float, int, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tinyinterp.cli", "reproduce", "grokking", "--out",
                           out_dir, *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    path = os.path.join(out_dir, "report.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    return wall, proc.returncode, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-command", action="store_true", help="skip the end-to-end command")
    ap.add_argument("--paper", action="store_true", help="also train the paper's setup to 99%%")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} (a shared machine: compare ratios)", flush=True)
    default = g.GrokkingConfig.default()
    for label, tc in ((f"default (p {default.p}, {default.train_fraction:.0%})", default),
                      ("paper (p 113, 30%)", g.GrokkingConfig.paper())):
        t = step_times(tc, args.rounds)
        rw, rc = t["grouped"]
        print(f"{label}, wall / CPU ms per step: " + "; ".join(
            f"{k} {w:.2f} / {c:.2f} ({1e3 / w:.0f} steps/s; {w / rw:.2f}x / {c / rc:.2f}x grouped)"
            for k, (w, c) in t.items()) + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
        ab = loop_ab(tc, args.rounds)
        print(f"{label}, training loop ({tc.snapshot_every}-step chunks): " + "; ".join(
            f"{k} {s:.1f} steps/s, {c:.1f} CPU ms per step" for k, (s, c) in ab.items())
            + f"; grouped over lean {ab['grouped'][0] / ab['lean'][0]:.2f}x steps/s, "
              f"{ab['lean'][1] / ab['grouped'][1]:.2f}x less CPU (load average "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    if not args.no_command:
        with tempfile.TemporaryDirectory() as d:
            for i in range(2):
                wall, rc, rep = command_time(os.path.join(d, f"run{i}"))
                ts, tr = rep.get("timings_s", {}), rep.get("train", {})
                print(f"tinyinterp reproduce grokking, run {i + 1}: {wall:.1f} s (exit {rc}; goal "
                      f"< {GOAL_DEFAULT_S:.0f} s after the first run); report: train "
                      f"{ts.get('train', float('nan')):.1f} s (compile "
                      f"{tr.get('compile_s', float('nan')):.1f}), analysis "
                      f"{ts.get('analysis', float('nan')):.1f} s, figures "
                      f"{ts.get('figures', float('nan')):.1f} s; {tr.get('total_steps')} steps, "
                      f"test 99% at {tr.get('grok_step')}; load average {os.getloadavg()[0]:.1f}",
                      flush=True)
    if args.paper:
        t0, c0 = time.perf_counter(), time.process_time()
        r = g.train(g.GrokkingConfig.paper(min_after_grok=0, after_grok=0.0))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"--paper setup to 99% test accuracy: step {r.grok_step}, {wall:.1f} s in "
              f"train() (compile {r.compile_s:.1f} s included; goal < {GOAL_PAPER_S:.0f} s), "
              f"{cpu:.1f} CPU-s ({cpu / r.total_steps * 1e3:.1f} CPU ms per step); stopped at "
              f"step {r.total_steps}, {r.total_steps / (wall - r.compile_s):.1f} steps/s; load "
              f"average {os.getloadavg()[0]:.1f}", flush=True)
        assert np.isfinite(r.test_loss[-1])


if __name__ == "__main__":
    main()
