"""Training: optax AdamW, steps compiled in chunks with ``lax.scan``, eval, checkpoints, resume.

    result = train(cfg_or_model, "induction", TrainConfig(steps=1000), out_dir="run")
    result.model, result.history["loss"], result.history["eval"]["accuracy"]

How a run is laid out:

* One jitted function runs a chunk of ``chunk_size`` steps with ``lax.scan``. Each step draws its
  batch inside the scan from ``fold_in(train_root, step)``, so there is no host->device data
  traffic and Python is entered once per chunk. A chunk shorter than ``chunk_size`` (at an eval,
  checkpoint or the end) runs the same compiled scan with the surplus steps switched off by
  ``lax.cond``: one compilation, and the bits never depend on where chunks happen to end.
* Determinism: data keys depend only on (seed, step); params come from the seed. Same seed, same
  bits; a run resumed from its step-k checkpoint ends bitwise equal to one never interrupted.
* NaN/inf guard: a step whose loss, gradient norm or updated params are not finite is not
  applied, and every later step of the chunk is skipped; the host then raises
  ``TrainingDiverged`` naming the step. No checkpoint is written after that, so the last one on
  disk is good.
* Checkpoints (``out_dir/checkpoint``, see ``tinyinterp.checkpoint``) every ``checkpoint_every``
  steps and at the end; ``resume=True`` continues from one.

``fit`` is the engine for any ``loss_fn(params, batch) -> (loss, metrics)``; ``train`` wraps it
for a transformer on a ``tinyinterp.tasks`` task.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from tinyinterp import checkpoint as ckpt_lib
from tinyinterp import sweeps
from tinyinterp.config import TransformerConfig
from tinyinterp.tasks import Task, get_task, masked_mean, task_from_dict

SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_DIR = "checkpoint"
_TRAIN_STREAM, _EVAL_STREAM = 0x5452, 0x4556  # fold_in tags: "TR", "EV"


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and loop settings. Defaults suit the toy models here (AdamW as in TL's trainer)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    schedule: str = "constant"  # after warmup: "constant" | "cosine" | "linear" decay
    final_lr_frac: float = 0.0  # cosine/linear: lr at the last step, as a fraction of lr
    weight_decay: float = 0.01  # decoupled (AdamW); applied to weight matrices only, not to
    #                              biases, norm weights or other 1-d parameters
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 disables clipping
    seed: int = 0  # params (when built from a config) and every batch derive from it
    eval_every: int = 0  # steps between evals on fixed held-out batches; 0: only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # steps between checkpoints (needs out_dir); 0: only at the end
    chunk_size: int = 100  # steps per compiled scan: Python runs once per chunk
    progress: bool | None = None  # tqdm progress bar; None: on when stderr is a terminal

    def __post_init__(self) -> None:
        ints = {"steps": 0, "batch_size": 1, "warmup_steps": 0, "seed": 0, "eval_every": 0,
                "eval_batches": 0, "checkpoint_every": 0, "chunk_size": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r} "
                                f"({type(v).__name__})")
            if v < lo:
                raise ValueError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))  # numpy ints -> int, so to_dict is JSON-safe
        for name in ("lr", "weight_decay", "b1", "b2", "eps", "final_lr_frac", "grad_clip"):
            v = getattr(self, name)
            if name == "grad_clip" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"TrainConfig.{name} must be a number"
                                + (" or None" if name == "grad_clip" else "")
                                + f", got {v!r} ({type(v).__name__})")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not (self.b1 < 1 and self.b2 < 1):
            raise ValueError(f"TrainConfig: b1 and b2 must be < 1, got {self.b1}, {self.b2}")
        if self.final_lr_frac > 1:
            raise ValueError(f"TrainConfig.final_lr_frac is the lr at the last step as a fraction "
                             f"of lr, so it must be in [0, 1], got {self.final_lr_frac}")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; allowed: {SCHEDULES}")
        if not (self.progress is None or isinstance(self.progress, bool)):
            raise ValueError(f"TrainConfig.progress must be None, True or False, "
                             f"got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; unknown fields and wrong types are clear errors."""
        if not isinstance(d, dict):
            raise TypeError(f"TrainConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown fields {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that may differ between a run and its resumption (they do not change the bits).
_RESUME_FREE = ("steps", "eval_every", "eval_batches", "checkpoint_every", "chunk_size",
                "progress")


class TrainingDiverged(FloatingPointError):
    """The loss or gradient became NaN/inf. ``step`` is the first bad step; ``state`` holds the
    params and optimizer state from just before it; ``checkpoint`` the last good checkpoint."""

    def __init__(self, message: str, *, step: int, state: dict, history: dict,
                 checkpoint: Path | None):
        super().__init__(message)
        self.step, self.state, self.history, self.checkpoint = step, state, history, checkpoint


@dataclasses.dataclass
class TrainResult:
    """``params``/``opt_state`` after ``step`` steps; ``history``: per-step train metrics
    (``step``, ``loss``, ``grad_norm``, task breakdowns) and ``history["eval"]`` (eval steps and
    metrics), all lists; ``timing``: compile and run wall times."""

    params: Any
    opt_state: Any
    step: int
    history: dict
    train_config: TrainConfig
    model: Any = None
    checkpoint: Path | None = None
    timing: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- optimizer
def lr_schedule(tc: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate: linear warmup over ``warmup_steps`` (step 0 gets lr / warmup), then
    constant, cosine or linear decay to ``lr * final_lr_frac`` at the last step."""
    lr, warm, total, frac = float(tc.lr), tc.warmup_steps, tc.steps, float(tc.final_lr_frac)

    span = max(total - warm - 1, 1)  # steps over which the decay runs

    def schedule(count: jax.Array) -> jax.Array:
        s = jnp.asarray(count).astype(jnp.float32)
        w = jnp.minimum(1.0, (s + 1.0) / warm) if warm else jnp.ones_like(s)
        # the part of the decay still ahead, 1 - progress with progress = (s - warm) / span,
        # from integers: near the end, 1 - progress (and 1 + cos(pi progress)) in float32 would
        # cancel, giving the last steps' lr ~1e-4 relative error
        ahead = jnp.clip((warm + span - s) / span, 0.0, 1.0)
        if tc.schedule == "cosine":  # 0.5 (1 + cos(pi progress)) = sin(pi ahead / 2)^2
            decay = frac + (1.0 - frac) * jnp.sin(0.5 * jnp.pi * ahead) ** 2
        elif tc.schedule == "linear":
            decay = frac + (1.0 - frac) * ahead
        else:
            decay = jnp.ones_like(s)
        return lr * w * decay

    return schedule


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, params)


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """optax's internals (e.g. Adam's bias correction ``b1 ** count``) mix Python floats with
    int32 counts, which jax's strict dtype-promotion mode rejects; run them in standard mode so
    tinyinterp works whichever mode the user (or our test suite) has switched on."""

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping (if ``grad_clip``) then AdamW with ``lr_schedule(tc)``."""
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                        weight_decay=tc.weight_decay, mask=_decay_mask)
    clip = optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity()
    # identity() keeps the state structure the same whether clipping or not
    return standard_promotion(optax.chain(clip, adamw))


# ----------------------------------------------------------------------------- compiled pieces
def _roots(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.random.fold_in(key, _TRAIN_STREAM), jax.random.fold_in(key, _EVAL_STREAM)


@functools.lru_cache(maxsize=32)
def _compiled(loss_fn, sample_fn, eval_fn, tc: TrainConfig):
    """(run_chunk, run_eval), jitted once per (functions, compile-relevant settings)."""
    optimizer = make_optimizer(tc)
    batch_size, chunk = tc.batch_size, tc.chunk_size

    def one_step(carry, step):
        params, opt_state, key, bad = carry
        batch = sample_fn(jax.random.fold_in(_roots(key)[0], step), batch_size)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params_ok = jax.tree_util.tree_reduce(
            jnp.logical_and, jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)),
                                                    new_params))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_ok
        # A non-finite step is not applied: the carry keeps the last good state.
        keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(ok, new, old))
        carry = (keep(new_params, params), keep(new_opt, opt_state), key,
                 jnp.where(ok, bad, step))
        return carry, {"loss": loss, "grad_norm": grad_norm, **metrics}

    def run_chunk(state, start, n_active):
        carry = (state["params"], state["opt_state"], state["key"], state["bad_step"])
        # The step is traced once: its jaxpr gives the metrics' shapes (for the skipped steps'
        # NaNs) and is what the scan runs (tracing the model's Python again for lax.cond cost
        # ~1 s per compile, paid on every run since tracing precedes the compile cache).
        step_jaxpr, (_, out_shape) = jax.make_jaxpr(one_step, return_shape=True)(carry, start)
        step_tree = jax.tree_util.tree_structure((carry, out_shape))
        run_step = jax.extend.core.jaxpr_as_fun(step_jaxpr)

        def traced_step(carry, step):
            flat = run_step(*jax.tree_util.tree_leaves((carry, step)))
            return jax.tree_util.tree_unflatten(step_tree, flat)

        def body(carry, i):
            def skip(carry, step):
                nan = {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in out_shape.items()}
                return carry, nan

            active = (i < n_active) & (carry[3] < 0)
            return jax.lax.cond(active, traced_step, skip, carry, start + i)

        carry, metrics = jax.lax.scan(body, carry, jnp.arange(chunk, dtype=jnp.int32))
        params, opt_state, key, bad = carry
        return {"params": params, "opt_state": opt_state, "key": key, "bad_step": bad}, metrics

    def run_eval(params, key, n_batches):
        keys = jax.vmap(lambda j: jax.random.fold_in(_roots(key)[1], j))(
            jnp.arange(n_batches, dtype=jnp.int32))

        def body(_, k):
            return None, eval_fn(params, sample_fn(k, batch_size))

        _, metrics = jax.lax.scan(body, None, keys)
        return jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)

    return (jax.jit(run_chunk, donate_argnums=0),
            jax.jit(run_eval, static_argnums=2))


def _compile_key(tc: TrainConfig) -> TrainConfig:
    # Only these settings change the compiled code; the rest are host-side loop settings.
    return tc.replace(seed=0, eval_every=0, eval_batches=0, checkpoint_every=0, progress=False,
                      **({} if tc.schedule != "constant" else {"steps": 0}))


# ----------------------------------------------------------------------------- the engine
def _default_eval_fn(loss_fn):
    return _EvalFromLoss(loss_fn)


@dataclasses.dataclass(frozen=True)
class _EvalFromLoss:
    loss_fn: Callable

    def __call__(self, params, batch):
        loss, metrics = self.loss_fn(params, batch)
        return {"loss": loss, **metrics}


def _check_resumable(stored: dict | None, tc: TrainConfig, file: Path) -> None:
    if stored is None:
        raise ckpt_lib.CheckpointError(f"{file}: holds no train_config; cannot resume from it")
    try:
        old = TrainConfig.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ckpt_lib.CheckpointError(f"{file}: invalid train_config: {e}") from e
    free = set(_RESUME_FREE) - ({"steps"} if tc.schedule != "constant" else set())
    diff = {f.name: (getattr(old, f.name), getattr(tc, f.name)) for f in dataclasses.fields(tc)
            if f.name not in free and getattr(old, f.name) != getattr(tc, f.name)}
    if diff:
        raise ckpt_lib.CheckpointError(
            f"{file}: cannot resume: the checkpoint was trained with different settings: "
            + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
            + ". Resume with the same settings or start a new run.")


def fit(loss_fn: Callable, params: Any, sample_fn: Callable, train_cfg: TrainConfig, *,
        eval_fn: Callable | None = None, out_dir: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, callback: Callable | None = None,
        model_config: TransformerConfig | None = None, task: dict | None = None,
        desc: str = "train") -> TrainResult:
    """Train ``params`` to minimise ``loss_fn(params, batch) -> (loss, {name: scalar})`` on batches
    ``sample_fn(key, batch_size)`` (pure jnp, jit-able).

    ``eval_fn(params, batch) -> {name: scalar}`` (default: the loss and its metrics) runs every
    ``eval_every`` steps and at the end on ``eval_batches`` fixed batches. ``out_dir``: where
    ``checkpoint/`` goes (every ``checkpoint_every`` steps and at the end); ``resume``: continue
    from it if present; ``overwrite``: allow replacing a checkpoint of another run.
    ``callback(info)`` is called after every chunk with a dict (step, params, last train metrics,
    eval metrics if any); returning ``False`` stops training there (with a checkpoint).

    ``loss_fn``, ``sample_fn`` and ``eval_fn`` should be the same objects across calls (module
    functions, not fresh lambdas) to reuse the compiled code. Raises ``TrainingDiverged`` on
    NaN/inf. Returns a ``TrainResult``.
    """
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig (e.g. TrainConfig(steps=1000)), got "
                        f"{type(train_cfg).__name__}")
    tc = train_cfg
    eval_fn = eval_fn if eval_fn is not None else _default_eval_fn(loss_fn)
    run_chunk, run_eval = _compiled(loss_fn, sample_fn, eval_fn, _compile_key(tc))
    optimizer = make_optimizer(tc)
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    if ckpt_dir is None and resume:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")

    key = jax.random.key(tc.seed)
    step = 0
    history: dict[str, Any] = {"step": [], "eval": {"step": []}}
    opt_state = optimizer.init(params)
    resumed_from = None
    if ckpt_dir is not None:
        found = ckpt_lib.find_checkpoint(ckpt_dir, run_dir=False)
        if not resume or found is None:  # a run that could not save is refused now
            ckpt_lib.check_save_path(ckpt_dir)
        if found is not None and resume:
            if found != ckpt_dir:  # a save was interrupted between its renames: restore it
                ckpt_lib.recover_interrupted_save(ckpt_dir)
            ck = ckpt_lib.load_checkpoint(ckpt_dir, opt_state_template=opt_state,
                                          params_template=params, expected_config=model_config)
            file = ckpt_dir / ckpt_lib.CONFIG_FILE
            _check_resumable(ck.train_config, tc, file)
            if task is not None and ck.task != task:
                raise ckpt_lib.CheckpointError(f"{file}: cannot resume: it was trained on task "
                                               f"{ck.task}, not {task}")
            if ck.step > tc.steps:
                raise ckpt_lib.CheckpointError(f"{file}: is at step {ck.step}, beyond "
                                               f"steps={tc.steps}")
            params, opt_state, step, history = ck.params, ck.opt_state, ck.step, ck.history
            key = ck.key if ck.key is not None else key
            resumed_from = step
        elif found is not None and not overwrite:
            where = ("" if found == ckpt_dir else f" (the previous checkpoint of an interrupted save, "
                     f"at {found})")
            raise FileExistsError(f"{ckpt_dir} already holds a checkpoint{where}; pass resume=True "
                                  "to continue it, overwrite=True to replace it, or another out_dir")
        elif found is None and resume:
            warnings.warn(f"resume=True but there is no checkpoint at {ckpt_dir}; starting from "
                          "step 0", stacklevel=2)
        ckpt_lib.check_save_path(ckpt_dir)

    # The chunk function donates its input buffers; copy so the caller's arrays stay valid.
    state = {"params": jax.tree_util.tree_map(jnp.copy, params),
             "opt_state": jax.tree_util.tree_map(jnp.copy, opt_state), "key": key,
             "bad_step": jnp.asarray(-1, jnp.int32)}
    last_ckpt: Path | None = ckpt_dir if resumed_from is not None else None
    timing = {"first_chunk_s": None, "run_s": 0.0, "run_steps": 0, "eval_s": 0.0,
              "checkpoint_s": 0.0}

    saved_step = step if resumed_from is not None else None

    def save(state, step):
        nonlocal last_ckpt, saved_step
        t0 = time.perf_counter()
        ckpt_lib.save_checkpoint(ckpt_dir, params=state["params"], model_config=model_config,
                                 opt_state=state["opt_state"], step=step, key=state["key"],
                                 history=history, train_config=tc.to_dict(), task=task)
        timing["checkpoint_s"] += time.perf_counter() - t0
        last_ckpt, saved_step = ckpt_dir, step

    def evaluate(state, step):
        t0 = time.perf_counter()
        metrics = jax.device_get(run_eval(state["params"], state["key"], tc.eval_batches))
        timing["eval_s"] += time.perf_counter() - t0
        ev = history["eval"]
        ev["step"].append(step)
        for k, v in metrics.items():
            ev.setdefault(k, []).append(float(v))
        return {k: float(v) for k, v in metrics.items()}

    def next_stop(step):
        stops = [tc.steps, (step // tc.chunk_size + 1) * tc.chunk_size]
        for every in (tc.eval_every, tc.checkpoint_every if ckpt_dir is not None else 0):
            if every:
                stops.append((step // every + 1) * every)
        return min(stops)

    show = tc.progress if tc.progress is not None else sys.stderr.isatty()
    bar = tqdm(total=tc.steps, initial=step, desc=desc, unit="step", disable=not show,
               dynamic_ncols=True, leave=True)
    eval_metrics: dict | None = None
    try:
        while step < tc.steps:
            stop = next_stop(step)
            n = stop - step
            t0 = time.perf_counter()
            state, metrics = run_chunk(state, jnp.asarray(step, jnp.int32),
                                       jnp.asarray(n, jnp.int32))
            metrics, bad = jax.device_get((metrics, state["bad_step"]))  # one sync per chunk
            dt = time.perf_counter() - t0
            if timing["first_chunk_s"] is None:
                timing["first_chunk_s"] = dt
            else:
                timing["run_s"] += dt
                timing["run_steps"] += n
            bad = int(bad)
            n_good = n if bad < 0 else bad - step
            history["step"].extend(range(step, step + n_good))
            for k, v in metrics.items():
                history.setdefault(k, []).extend(np.asarray(v[:n_good], np.float64).tolist())
            if bad >= 0:
                bar.close()
                losses = metrics["loss"][n_good]
                where = (f"; the last good checkpoint is {last_ckpt} (step "
                         f"{ckpt_lib.read_config(last_ckpt)['step']})" if last_ckpt else
                         "; no checkpoint was written")
                raise TrainingDiverged(
                    f"training diverged at step {bad}: loss = {losses}, gradient norm = "
                    f"{metrics['grad_norm'][n_good]} (the loss, the gradient or the updated "
                    "parameters were not finite). That step was not applied"
                    f"{where}. Try a lower lr (now {tc.lr}), a longer warmup, or grad_clip.",
                    step=bad, state=state, history=history, checkpoint=last_ckpt)
            step = stop
            bar.update(n)
            bar.set_postfix(loss=f"{float(metrics['loss'][n - 1]):.4f}", refresh=False)
            eval_metrics = None
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                if tc.eval_batches:
                    eval_metrics = evaluate(state, step)
            if ckpt_dir is not None and ((tc.checkpoint_every and step % tc.checkpoint_every == 0)
                                         or step == tc.steps):
                save(state, step)
            if callback is not None:
                info = {"step": step, "params": state["params"], "eval": eval_metrics,
                        "metrics": {k: float(v[n - 1]) for k, v in metrics.items()}}
                if callback(info) is False:
                    if ckpt_dir is not None and saved_step != step:
                        save(state, step)
                    break
    finally:
        bar.close()
    runs = timing["run_steps"]
    timing["steps_per_s"] = runs / timing["run_s"] if runs and timing["run_s"] > 0 else None
    return TrainResult(params=state["params"], opt_state=state["opt_state"], step=step,
                       history=history, train_config=tc, checkpoint=last_ckpt, timing=timing)


# ----------------------------------------------------------------------------- transformer + task
@functools.lru_cache(maxsize=32)
def task_loss_fns(cfg: TransformerConfig, task: Task) -> tuple[Callable, Callable]:
    """(loss_fn, eval_fn) for a transformer on a task: next-token cross-entropy averaged over
    ``loss_mask``; train metrics ``answer_loss`` (+ ``loss_first``/``loss_repeated`` for repeated
    tokens); eval adds ``accuracy``. Cached, so repeated runs reuse the compiled code."""
    from tinyinterp.model import forward, lm_cross_entropy_loss

    def loss_fn(params, batch):
        logits = forward(params, cfg, batch["tokens"])  # [batch, pos, d_vocab_out]
        per_token = lm_cross_entropy_loss(logits, batch["tokens"], per_token=True)  # [b, pos-1]
        return masked_mean(per_token, batch["loss_mask"]), task.loss_metrics(per_token, batch)

    def eval_fn(params, batch):
        logits = forward(params, cfg, batch["tokens"])
        per_token = lm_cross_entropy_loss(logits, batch["tokens"], per_token=True)
        return {"loss": masked_mean(per_token, batch["loss_mask"]),
                "accuracy": task.accuracy(logits, batch), **task.loss_metrics(per_token, batch)}

    return loss_fn, eval_fn


@functools.lru_cache(maxsize=32)
def _sample_fn(task: Task) -> Callable:
    # Bound methods compare by the identity of their object, so equal tasks built by separate
    # get_task calls would miss the compile cache; this returns one method per equal task.
    return task.sample


def train(model_or_cfg, task: Task | str, train_cfg: TrainConfig | None = None, *,
          out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          callback: Callable | None = None) -> TrainResult:
    """Train a transformer on a task and return a ``TrainResult`` whose ``.model`` is the trained
    ``HookedTransformer``.

    ``model_or_cfg``: a HookedTransformer (its params are the start; they are not modified) or a
    TransformerConfig (params from ``HookedTransformer.from_config(cfg, seed=train_cfg.seed)``).
    ``task``: a Task or a registry name (``tinyinterp.tasks.get_task``). See ``fit`` for the rest.
    """
    from tinyinterp.model import HookedTransformer

    tc = train_cfg if train_cfg is not None else TrainConfig()
    if not isinstance(tc, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig (e.g. TrainConfig(steps=1000)), got "
                        f"{type(tc).__name__}")
    if isinstance(task, str):
        task = get_task(task)
    if isinstance(model_or_cfg, TransformerConfig):
        model = HookedTransformer.from_config(model_or_cfg, seed=tc.seed)
    elif isinstance(model_or_cfg, HookedTransformer):
        model = model_or_cfg
    else:
        raise TypeError("train needs a HookedTransformer or a TransformerConfig, got "
                        f"{type(model_or_cfg).__name__}")
    cfg = model.cfg
    if task.d_vocab > cfg.d_vocab:
        raise ValueError(f"task {task.name!r} uses {task.d_vocab} tokens but the model's d_vocab "
                         f"is {cfg.d_vocab}; use d_vocab >= {task.d_vocab}")
    if task.d_vocab > cfg.d_vocab_out:
        raise ValueError(f"task {task.name!r} predicts {task.d_vocab} tokens but d_vocab_out is "
                         f"{cfg.d_vocab_out}")
    if task.seq_len > cfg.n_ctx:
        raise ValueError(f"task {task.name!r} has sequences of {task.seq_len} tokens but the "
                         f"model's n_ctx is {cfg.n_ctx}; use n_ctx >= {task.seq_len}")
    loss_fn, eval_fn = task_loss_fns(cfg, task)
    result = fit(loss_fn, model.params, _sample_fn(task), tc, eval_fn=eval_fn, out_dir=out_dir,
                 resume=resume, overwrite=overwrite, callback=callback, model_config=cfg,
                 task=task.to_dict(), desc=f"train {task.name}")
    result.model = model.with_params(result.params)
    return result


def resume_task(out_dir: str | Path) -> tuple[TransformerConfig, Task, TrainConfig]:
    """(model config, task, train config) stored in ``out_dir``'s checkpoint, to resume a run
    whose settings you no longer have: ``train(cfg, task, tc, out_dir=out_dir, resume=True)``.
    The attention backend is a run option, not stored: ``cfg`` has the default ("auto"); resume
    on the backend the run was trained with (``cfg.replace(attention_backend=...)``) for the same
    bits. A checkpoint without these settings, or with invalid ones, is a ``CheckpointError``."""
    c = ckpt_lib.read_config(Path(out_dir) / CHECKPOINT_DIR)
    file = c["_path"] / ckpt_lib.CONFIG_FILE
    for field in ("model_config", "task", "train_config"):
        if c.get(field) is None:
            raise ckpt_lib.CheckpointError(f"{file}: holds no {field}, so the run cannot be "
                                           "resumed from it (is it a bare model checkpoint?)")
    try:
        return (TransformerConfig.from_dict(c["model_config"]), task_from_dict(c["task"]),
                TrainConfig.from_dict(c["train_config"]))
    except (TypeError, ValueError, KeyError) as e:
        raise ckpt_lib.CheckpointError(f"{file}: invalid stored settings: {e}") from e


# ----------------------------------------------------------------------------- several seeds at once
@dataclasses.dataclass
class SeedsResult:
    """``len(seeds)`` runs trained as one vmapped program. ``params``: the params pytree with a
    leading seed axis; ``history``: train metric -> np.ndarray [seed, step]; ``diverged_at``:
    per seed, the first non-finite step (that seed's later steps were not applied) or None;
    ``timing``: compile and run wall times."""

    params: Any
    seeds: list[int]
    history: dict
    train_config: TrainConfig
    model_config: TransformerConfig
    diverged_at: list[int | None]
    timing: dict = dataclasses.field(default_factory=dict)

    def params_of(self, i: int) -> Any:
        """The params of the ``i``-th seed (an index into ``seeds``)."""
        return jax.tree_util.tree_map(lambda x: x[i], self.params)

    def model(self, i: int):
        """The ``i``-th seed's trained ``HookedTransformer``."""
        from tinyinterp.model import HookedTransformer

        return HookedTransformer(self.model_config, self.params_of(i))


@functools.lru_cache(maxsize=8)
def _seeds_chunk(run_chunk: Callable, mesh=None) -> Callable:
    # the single-run chunk (same step, data stream and NaN guard), vmapped over a leading seed
    # axis; on several devices, each runs it on its slice of the seeds (tinyinterp.sweeps)
    return sweeps.compile_sweep(jax.vmap(run_chunk, in_axes=(0, None, None)), mesh,
                                in_axes=(0, None, None))


def train_seeds(model_cfg: TransformerConfig, task: Task | str, train_cfg: TrainConfig,
                seeds: list[int] | tuple[int, ...], *,
                devices: sweeps.Devices = None) -> SeedsResult:
    """Train one transformer per seed on ``task`` as ONE compiled program vmapped over the seeds
    (Olsson et al. report the phase change as robust across models; this is how to check it on a
    CPU in one go). Seed ``s`` starts from ``HookedTransformer.from_config(cfg, seed=s)`` and
    draws the same batches as ``train(cfg, task, train_cfg.replace(seed=s))``, so each run is
    that single run to float32 rounding (vmap batches the matmuls differently). ``train_cfg.seed``
    is ignored; no checkpoints or evals are written. A seed whose loss or gradient becomes
    non-finite stops there (``diverged_at``) while the others go on.

    ``devices`` (a count, a Mesh or a list of devices; see ``tinyinterp.sweeps``) splits the
    seeds over several devices or hosts, each running the same program on its share.
    """
    from tinyinterp.params import init_params

    tc = train_cfg
    if isinstance(task, str):
        task = get_task(task)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"train_seeds needs distinct seeds >= 0, got {seeds}")
    if task.d_vocab > model_cfg.d_vocab or task.seq_len > model_cfg.n_ctx:
        raise ValueError(f"task {task.name!r} (d_vocab {task.d_vocab}, seq_len {task.seq_len}) "
                         f"does not fit the model (d_vocab {model_cfg.d_vocab}, n_ctx "
                         f"{model_cfg.n_ctx})")
    loss_fn, eval_fn = task_loss_fns(model_cfg, task)
    mesh = sweeps.sweep_mesh(devices)
    run_chunk = _seeds_chunk(_compiled(loss_fn, _sample_fn(task), eval_fn, _compile_key(tc))[0],
                             mesh)
    optimizer = make_optimizer(tc)
    stack = functools.partial(jax.tree_util.tree_map, lambda *xs: jnp.stack(xs))
    runs = seeds + seeds[-1:] * (sweeps.padded_length(len(seeds), mesh) - len(seeds))  # padded
    params = stack(*[init_params(model_cfg, jax.random.key(s)) for s in runs])  # [seed, ...]
    state = {"params": params, "opt_state": stack(*[optimizer.init(init_params(
                 model_cfg, jax.random.key(s))) for s in runs]),
             "key": jnp.stack([jax.random.key(s) for s in runs]),
             "bad_step": jnp.full((len(runs),), -1, jnp.int32)}
    state = sweeps.put(state, mesh)
    history: dict[str, list] = {}
    timing = {"first_chunk_s": None, "run_s": 0.0, "run_steps": 0}
    step = 0
    while step < tc.steps:
        n = min(tc.chunk_size, tc.steps - step)
        t0 = time.perf_counter()
        state, metrics = run_chunk(state, jnp.asarray(step, jnp.int32), jnp.asarray(n, jnp.int32))
        metrics = sweeps.fetch(metrics, len(seeds))  # name -> [seed, chunk]
        dt = time.perf_counter() - t0
        if timing["first_chunk_s"] is None:
            timing["first_chunk_s"] = dt
        else:
            timing["run_s"] += dt
            timing["run_steps"] += n
        for k, v in metrics.items():
            history.setdefault(k, []).append(np.asarray(v[:, :n], np.float64))
        step += n
    bad = sweeps.fetch(state["bad_step"], len(seeds))
    runs = timing["run_steps"]
    timing["steps_per_s"] = runs / timing["run_s"] if runs and timing["run_s"] > 0 else None
    params = (state["params"] if mesh is None else
              jax.tree_util.tree_map(jnp.asarray, sweeps.fetch(state["params"], len(seeds))))
    return SeedsResult(params=params, seeds=seeds,
                       history={k: np.concatenate(v, axis=1) for k, v in history.items()},
                       train_config=tc, model_config=model_cfg,
                       diverged_at=[int(b) if b >= 0 else None for b in bad], timing=timing)
