"""Training speed for the reference induction model, with each attention backend.

    python benchmarks/train_speed.py                     # both backends + the reproduce command
    python benchmarks/train_speed.py --rounds 5 --no-reproduce
    python benchmarks/train_speed.py --backends xla

Reference shape (issue 4, item 8): 2 layers, attention only, d_model 64, 4 heads of 16, LN,
vocabulary 64, sequences of 32 random tokens repeated twice (64 tokens), batch 64, AdamW.

Prints, per backend: steps/s and tokens/s of ``tinyinterp.train`` (median chunk time, compile
excluded; the compile + first chunk time separately), the same step driven from Python one jit
call per step (with device-side data) measured in the same process, so the ratio isolates what
the chunked ``lax.scan`` loop buys, and the ratios against the TransformerLens anchor (29 steps/s,
measured for the issue on this machine's kind) and the goal (90 steps/s). Then the wall time of
``tinyinterp reproduce induction-heads`` (compile included; goal < 30 s) when that command exists.
Timings on a shared machine are noisy; the in-process ratios are what to compare.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import optax

import tinyinterp
from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp.tasks import get_task
from tinyinterp.train import TrainConfig, make_optimizer, task_loss_fns, train

TL_ANCHOR_STEPS_PER_S = 29.0  # TransformerLens 3.9, PyTorch 2.13 CPU, 2 threads (issue 4)
GOAL_STEPS_PER_S = 90.0
GOAL_REPRODUCE_S = 30.0
BATCH, LENGTH, REPEATS, VOCAB = 64, 32, 2, 64


def reference_config(backend: str) -> TransformerConfig:
    return TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=VOCAB,
                             n_ctx=LENGTH * REPEATS, attn_only=True, normalization_type="LN",
                             attention_backend=backend)


def make_train_run(backend: str, chunk: int, chunks: int):
    """A function that runs ``tinyinterp.train`` for 1 + ``chunks`` chunks and returns the chunk
    wall times after the first (the first one carries init, and the compile on the first call)."""
    cfg = reference_config(backend)
    task = get_task("induction", d_vocab=VOCAB, length=LENGTH, n_repeats=REPEATS)
    tc = TrainConfig(steps=chunk * (chunks + 1), batch_size=BATCH, lr=1e-3, chunk_size=chunk,
                     eval_batches=0, progress=False)

    def run() -> tuple[list[float], float, float]:
        stamps = [time.perf_counter()]
        result = train(cfg, task, tc, callback=lambda info: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return times[1:], times[0], result.history["loss"][-1]

    return run


def make_python_loop(backend: str, steps: int):
    """The same training step, one jitted call per step from a Python loop: returns a function
    timing ``steps`` steps (compiled on creation)."""
    cfg = reference_config(backend)
    task = get_task("induction", d_vocab=VOCAB, length=LENGTH, n_repeats=REPEATS)
    loss_fn, _ = task_loss_fns(cfg, task)
    opt = make_optimizer(TrainConfig(lr=1e-3))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, key, i):
        batch = task.sample(jax.random.fold_in(key, i), BATCH)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = HookedTransformer.from_config(cfg).params
    state = [params, opt.init(params)]
    key = jax.random.key(0)
    state[0], state[1], loss = step(state[0], state[1], key, 0)  # compile
    loss.block_until_ready()

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            state[0], state[1], loss = step(state[0], state[1], key, i)
        loss.block_until_ready()
        return time.perf_counter() - t0

    return run


def bench_reproduce(timeout: float) -> float | str:
    # the console script next to this interpreter (an unactivated venv), else the one on PATH
    sibling = os.path.join(os.path.dirname(sys.executable), "tinyinterp")
    exe = sibling if os.path.exists(sibling) else shutil.which("tinyinterp")
    if exe is None:
        return "the `tinyinterp` command is not installed"
    probe = subprocess.run([exe, "reproduce", "induction-heads", "--help"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        return "`tinyinterp reproduce induction-heads` does not exist yet"
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        try:
            run = subprocess.run([exe, "reproduce", "induction-heads", "--out", out,
                                  "--no-progress"], capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-300:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return f"timed out after {timeout:.0f} s (killed); last output: {tail.strip()!r}"
        wall = time.perf_counter() - t0
    if run.returncode != 0:
        return f"the command failed (exit {run.returncode}): {run.stderr.strip()[-500:]}"
    return wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="xla,numba")
    ap.add_argument("--chunk", type=int, default=50, help="steps per compiled chunk")
    ap.add_argument("--chunks", type=int, default=2, help="timed chunks per run, after the first")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the backends")
    ap.add_argument("--no-reproduce", action="store_true")
    ap.add_argument("--reproduce-timeout", type=float, default=300.0,
                    help="seconds before the reproduce command is killed")
    args = ap.parse_args(argv)
    tinyinterp.memory.tune_malloc()  # keep freed buffers for reuse, as the CLI does

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"reference: 2-layer attn-only, d_model 64, 4x16 heads, LN, vocab {VOCAB}, "
          f"{LENGTH} tokens x {REPEATS} = {LENGTH * REPEATS}, batch {BATCH}")
    tokens_per_step = BATCH * LENGTH * REPEATS
    backends = []
    for backend in args.backends.split(","):
        if backend == "numba":
            from tinyinterp.fast import numba_unavailable_reason

            problem = numba_unavailable_reason()
            if problem is not None:
                print(f"\n[numba] not available: {problem}")
                continue
        backends.append(backend)
    # Rounds interleave backends and methods so that a change in machine load hits all alike.
    runs = {b: (make_train_run(b, args.chunk, args.chunks), make_python_loop(b, args.chunk))
            for b in backends}
    chunk_s = {b: [] for b in backends}
    loop_s = {b: [] for b in backends}
    first = {}
    for _ in range(args.rounds):
        for b in backends:
            times, first_s, loss = runs[b][0]()
            first.setdefault(b, (first_s, loss))
            chunk_s[b].extend(times)
            loop_s[b].append(runs[b][1]())
    for b in backends:
        sps = args.chunk / statistics.median(chunk_s[b])
        loop = args.chunk / statistics.median(loop_s[b])
        first_s, loss = first[b]
        print(f"\n[{b}] tinyinterp.train: {sps:7.1f} steps/s  {sps * tokens_per_step:10,.0f} "
              f"tokens/s  (median of {len(chunk_s[b])} chunks of {args.chunk}; compile + first "
              f"chunk {first_s:.1f} s; loss after {args.chunk * (args.chunks + 1)} steps "
              f"{loss:.3f})")
        print(f"[{b}] one jit call per step from Python: {loop:7.1f} steps/s  -> chunked "
              f"scan / per-step loop = {sps / loop:.2f}x")
        print(f"[{b}] vs TransformerLens anchor {TL_ANCHOR_STEPS_PER_S:.0f} steps/s: "
              f"{sps / TL_ANCHOR_STEPS_PER_S:.2f}x;  vs goal {GOAL_STEPS_PER_S:.0f} steps/s: "
              f"{sps / GOAL_STEPS_PER_S:.2f}x")
    if not args.no_reproduce:
        wall = bench_reproduce(args.reproduce_timeout)
        if isinstance(wall, str):
            print(f"\n[reproduce] skipped: {wall}")
        else:
            print(f"\n[reproduce] `tinyinterp reproduce induction-heads`: {wall:.1f} s wall "
                  f"(compile included); goal {GOAL_REPRODUCE_S:.0f} s -> "
                  f"{GOAL_REPRODUCE_S / wall:.2f}x of the budget left")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
