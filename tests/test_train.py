"""Training loop: it learns every task, is bit-for-bit deterministic, resumes exactly, and stops
cleanly (keeping the last good checkpoint) when the loss goes non-finite."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp import checkpoint as C
from tinyinterp.tasks import get_task
from tinyinterp.train import (
    TrainConfig,
    TrainingDiverged,
    fit,
    lr_schedule,
    make_optimizer,
    resume_task,
    train,
)


def trees_equal(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(la, lb, strict=True))


def small_cfg(task, **kw) -> TransformerConfig:
    base = dict(n_layers=1, d_model=32, d_head=8, n_heads=4, d_vocab=task.d_vocab,
                n_ctx=task.seq_len, attn_only=False, d_mlp=64, attention_backend="xla")
    return TransformerConfig(**{**base, **kw})


# --------------------------------------------------------------------------- learning
TASK_RUNS = {  # task options, steps, lr: small enough to be quick, long enough to learn something
    "repeated_tokens": (dict(d_vocab=16, length=6), 150, 3e-3),
    "copy": (dict(n_symbols=8, length=4), 150, 3e-3),
    "reverse": (dict(n_symbols=8, length=4), 150, 3e-3),
    "sort": (dict(n_symbols=8, length=4), 150, 3e-3),
    "modular_addition": (dict(p=7), 150, 3e-3),
}


@pytest.mark.parametrize("name", sorted(TASK_RUNS))
def test_training_lowers_loss_on_every_task(name):
    opts, steps, lr = TASK_RUNS[name]
    task = get_task(name, **opts)
    tc = TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=10, chunk_size=50,
                     eval_batches=2, progress=False)
    result = train(small_cfg(task), task, tc)
    loss = np.asarray(result.history["loss"])
    assert loss.shape == (steps,) and result.history["step"] == list(range(steps))
    assert np.isfinite(loss).all()
    first, last = loss[:10].mean(), loss[-10:].mean()
    assert last < 0.6 * first, (name, first, last)
    # chance accuracy on the answer positions is about 1/n_symbols (~0.1); these runs solve them
    ev = result.history["eval"]
    assert ev["step"] == [steps]
    assert ev["accuracy"][-1] > 0.9, (name, ev["accuracy"])
    if name == "repeated_tokens":
        assert ev["loss_repeated"][-1] < ev["loss_first"][-1]
    assert isinstance(result.model, HookedTransformer)
    assert trees_equal(result.model.params, result.params)


# --------------------------------------------------------------------------- determinism & resume
TASK = get_task("induction", d_vocab=12, length=5)
CFG = small_cfg(TASK, attn_only=True, n_layers=2)
TC = TrainConfig(steps=24, batch_size=8, lr=3e-3, warmup_steps=4, schedule="cosine",
                 chunk_size=8, eval_every=12, eval_batches=1, progress=False)


def test_same_seed_same_bits_and_caller_params_untouched():
    model = HookedTransformer.from_config(CFG, seed=5)
    before = jax.tree_util.tree_map(np.array, model.params)
    a = train(model, TASK, TC)
    b = train(model, TASK, TC.replace(chunk_size=5, eval_batches=0))  # chunking doesn't matter
    assert trees_equal(model.params, before)  # the caller's (donated-from) params are intact
    assert trees_equal(a.params, b.params) and trees_equal(a.opt_state, b.opt_state)
    assert np.array_equal(a.history["loss"], b.history["loss"])
    c = train(CFG, TASK, TC.replace(seed=1))
    assert not np.array_equal(a.history["loss"], c.history["loss"])


def test_resume_is_bitwise_identical(tmp_path):
    full = train(CFG, TASK, TC.replace(checkpoint_every=8), out_dir=tmp_path / "full")

    class Interrupt(Exception):
        pass

    def interrupt_at_16(info):
        if info["step"] == 16:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(CFG, TASK, TC.replace(checkpoint_every=8), out_dir=tmp_path / "cut",
              callback=interrupt_at_16)
    assert json.loads((tmp_path / "cut/checkpoint/config.json").read_text())["step"] == 16
    with pytest.raises(FileExistsError, match="resume=True"):
        train(CFG, TASK, TC, out_dir=tmp_path / "cut")
    # resume with the settings stored in the checkpoint (and a different chunking)
    cfg, task, tc = resume_task(tmp_path / "cut")
    # the attention backend is a run option, not stored: resume on the one trained with
    assert cfg == CFG.replace(attention_backend="auto")
    cfg = cfg.replace(attention_backend=CFG.attention_backend)
    resumed = train(cfg, task, tc.replace(chunk_size=5), out_dir=tmp_path / "cut", resume=True)
    assert resumed.step == full.step == 24
    assert trees_equal(resumed.params, full.params)
    assert trees_equal(resumed.opt_state, full.opt_state)
    assert np.array_equal(resumed.history["loss"], full.history["loss"])
    assert resumed.history["step"] == list(range(24))
    assert resumed.history["eval"] == full.history["eval"]
    # the final checkpoints agree too, and load as models
    a, b = (C.load_model(p) for p in (tmp_path / "full/checkpoint", tmp_path / "cut"))
    assert trees_equal(a.params, b.params)
    # resuming with settings that change the trajectory is refused
    with pytest.raises(C.CheckpointError, match=r"lr=0.003 \(now 0.001\)"):
        train(CFG, TASK, TC.replace(lr=1e-3), out_dir=tmp_path / "cut", resume=True)


def test_an_interrupted_save_is_resumed_never_retrained_or_deleted(tmp_path):
    """A SIGKILL between a save's two renames leaves only out/.checkpoint.old. A new run there is
    refused (it would delete that only copy); resume=True moves it back and continues from it."""
    import os

    train(CFG, TASK, TC, out_dir=tmp_path, callback=lambda info: info["step"] < 16)
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    with pytest.raises(FileExistsError, match="interrupted save"):
        train(CFG, TASK, TC, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.old"]
    with pytest.warns(UserWarning, match="interrupted"):
        cfg, task, tc = resume_task(tmp_path)
    cfg = cfg.replace(attention_backend=CFG.attention_backend)  # (a run option; shares the compile)
    seen = []
    with pytest.warns(UserWarning, match="moved back"):
        resumed = train(cfg, task, tc, out_dir=tmp_path, resume=True,
                        callback=lambda info: seen.append(info["step"]))
    assert seen == [24] and resumed.history["step"] == list(range(24))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert C.read_config(tmp_path / "checkpoint")["step"] == 24


@pytest.mark.parametrize("what", ["file", "foreign_folder"])
def test_a_run_that_could_not_save_fails_before_training(tmp_path, what):
    if what == "file":
        (tmp_path / "checkpoint").write_text("x")
        match = "is an existing file"
    else:
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "config.json").write_text('{"model_type": "gpt2"}')
        match = "not a tinyinterp checkpoint"
    seen = []
    for kw in (dict(), dict(overwrite=True), dict(resume=True)):
        with pytest.raises(C.CheckpointError, match=match):
            train(CFG, TASK, TC, out_dir=tmp_path, callback=seen.append, **kw)
    assert seen == []  # not a single step was trained


# --------------------------------------------------------------------------- NaN guard
def _quadratic_sample(key, batch_size):
    return {"x": jax.random.normal(key, (batch_size, 3), dtype=jnp.float32)}


def _poisoned_loss(params, batch):
    """Finite while w < 5; Adam with lr=1 moves w up by ~1 per step, so it poisons at step ~5."""
    w = params["w"]
    loss = jnp.mean((batch["x"] - w[None]) ** 2) - 10.0 * jnp.sum(w)
    return jnp.where(jnp.all(w < 5.0), loss, jnp.nan), {}


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    tc = TrainConfig(steps=20, batch_size=4, lr=1.0, weight_decay=0.0, grad_clip=None,
                     chunk_size=4, checkpoint_every=2, eval_batches=0, progress=False)
    params = {"w": jnp.zeros(3, jnp.float32)}
    with pytest.raises(TrainingDiverged, match=r"diverged at step (\d+).*last good checkpoint") \
            as err:
        fit(_poisoned_loss, params, _quadratic_sample, tc, out_dir=tmp_path)
    bad = err.value.step
    assert 3 <= bad < 20
    # the state handed back is the one the bad step started from: finite, but poisoned
    w = np.asarray(err.value.state["params"]["w"])
    assert np.isfinite(w).all() and (w >= 5.0).all()
    assert len(err.value.history["loss"]) == bad
    assert np.isfinite(err.value.history["loss"]).all()
    # the checkpoint on disk is the last scheduled one before the bad step, intact and equal to
    # what an uninterrupted run to that step produces
    ck = C.load_checkpoint(tmp_path / "checkpoint",
                           opt_state_template=make_optimizer(tc).init(params),
                           params_template=params)
    assert ck.step == (bad // 2) * 2 if bad % 2 else bad - 2
    ref = fit(_poisoned_loss, params, _quadratic_sample, tc.replace(steps=ck.step))
    assert trees_equal(ck.params, ref.params) and trees_equal(ck.opt_state, ref.opt_state)


def test_nan_guard_on_a_transformer_with_huge_lr():
    task = get_task("modular_addition", p=5)
    tc = TrainConfig(steps=30, batch_size=8, lr=1e30, grad_clip=None, chunk_size=10,
                     eval_batches=0, progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: loss = (nan|inf)") as err:
        train(small_cfg(task), task, tc)
    assert err.value.checkpoint is None and "no checkpoint was written" in str(err.value)


# --------------------------------------------------------------------------- config & schedule
def test_lr_schedules():
    tc = TrainConfig(steps=11, lr=1.0, warmup_steps=0, final_lr_frac=0.1)
    lrs = {s: np.array([float(lr_schedule(tc.replace(schedule=s))(jnp.asarray(i, jnp.int32)))
                        for i in range(11)]) for s in ("constant", "linear", "cosine")}
    np.testing.assert_allclose(lrs["constant"], 1.0)
    np.testing.assert_allclose(lrs["linear"], np.linspace(1.0, 0.1, 11), rtol=1e-6)
    np.testing.assert_allclose(lrs["cosine"][[0, 10]], [1.0, 0.1], rtol=1e-6)
    assert np.all(np.diff(lrs["cosine"]) < 0)
    warm = lr_schedule(TrainConfig(lr=1.0, warmup_steps=4))
    np.testing.assert_allclose([float(warm(jnp.asarray(i, jnp.int32))) for i in range(6)],
                               [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_train_config_validation_and_round_trip():
    tc = TrainConfig(steps=5, schedule="linear", grad_clip=None)
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exp")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(TypeError, match="train_cfg must be a TrainConfig"):
        train(CFG, TASK, {"steps": 3})
    task = get_task("copy")
    with pytest.raises(ValueError, match="n_ctx"):
        train(small_cfg(task, n_ctx=4), task, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="d_vocab"):
        train(small_cfg(task, d_vocab=4), task, TrainConfig(steps=1))


def test_progress_bar_and_early_stop(tmp_path, capsys):
    tc = TrainConfig(steps=12, batch_size=4, lr=0.1, chunk_size=3, eval_batches=1, progress=True)
    params = {"w": jnp.zeros(3, jnp.float32)}
    seen = []

    def stop_at_6(info):
        seen.append(info["step"])
        return info["step"] < 6

    result = fit(_quadratic_loss, params, _quadratic_sample, tc, out_dir=tmp_path,
                 callback=stop_at_6)
    assert seen == [3, 6] and result.step == 6 and len(result.history["loss"]) == 6
    assert C.read_config(tmp_path / "checkpoint")["step"] == 6  # stopping leaves a checkpoint
    err = capsys.readouterr().err
    assert "6/12" in err and "step" in err  # tqdm's bar went to stderr
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_equal_tasks_share_compiled_code():
    from tinyinterp.train import _compiled

    train(CFG, TASK, TC)
    hits = _compiled.cache_info().hits
    train(CFG, get_task("induction", d_vocab=12, length=5), TC.replace(seed=3))
    assert _compiled.cache_info().hits == hits + 1


def _quadratic_loss(params, batch):
    return jnp.mean((batch["x"] - params["w"][None]) ** 2), {}


@settings(max_examples=25)
@given(steps=st.sampled_from([1, 2, 57, 200]), warmup=st.integers(0, 50), frac=st.floats(0.0, 1.0),
       schedule=st.sampled_from(["constant", "linear", "cosine"]), lr=st.floats(1e-5, 1.0))
def test_lr_schedule_matches_formula(steps, warmup, frac, schedule, lr):
    # (steps come from a few values: every array shape compiles once)
    tc = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, schedule=schedule,
                     final_lr_frac=frac)
    s = np.arange(steps)
    got = np.asarray(jax.vmap(lr_schedule(tc))(jnp.asarray(s, jnp.int32)))
    w = np.minimum(1.0, (s + 1) / warmup) if warmup else np.ones(steps)
    p = np.clip((s - warmup) / max(steps - warmup - 1, 1), 0, 1)
    decay = {"constant": np.ones(steps), "linear": 1 - (1 - frac) * p,
             "cosine": frac + (1 - frac) * 0.5 * (1 + np.cos(np.pi * p))}[schedule]
    np.testing.assert_allclose(got, lr * w * decay, rtol=2e-5, atol=1e-12)
    assert (got <= lr * (1 + 1e-6)).all() and (got >= 0).all()


def test_train_loss_is_the_task_loss():
    """The loss the loop minimises is next-token cross-entropy averaged over loss_mask."""
    from tinyinterp.model import forward
    from tinyinterp.train import task_loss_fns

    task = get_task("copy", n_symbols=5, length=3)
    cfg = small_cfg(task, attn_only=True)
    params = HookedTransformer.from_config(cfg, seed=2).params
    batch = task.sample(jax.random.key(1), 4)

    @jax.jit
    def both(params, batch):
        loss, metrics = task_loss_fns(cfg, task)[0](params, batch)
        return loss, metrics, task.loss(forward(params, cfg, batch["tokens"]), batch)

    loss, metrics, expected = both(params, batch)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert set(metrics) == {"answer_loss"}
    np.testing.assert_allclose(float(metrics["answer_loss"]), float(expected), rtol=1e-6)


# --------------------------------------------------------------------------- interrupted saves
# A subprocess (so that SIGKILL can strike for real) saves a training checkpoint over and over
# into run/checkpoint, in forked children that it kills: once before every single filesystem step
# of a save (and halfway through every file write), then at random moments with SIGKILL and with
# SIGINT. After each kill it copies run/ aside. The test then checks every copy: load_model and
# train(resume=True) both find a complete checkpoint, the resumed run ends bitwise equal to one
# never interrupted, and its save leaves nothing else behind.
KILL_SCRIPT = r"""
import json, os, random, shutil, signal, sys, time
from pathlib import Path
from tinyinterp import checkpoint as C

t_start = time.perf_counter()
src, work, n_random, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = json.loads((src / C.CONFIG_FILE).read_text())
config.pop("files")
files = {name: (src / name).read_bytes() for name in (C.PARAMS_FILE, C.STATE_FILE)}
out, rng = work / "run", random.Random(seed)
dst = out / "checkpoint"

def fresh():
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(src, dst)

def save(i):
    config["extra"] = {"save": i}
    C._atomic_write_dir(dst, files, config)

def in_child(fn):
    # SIGINT is blocked across the fork and unblocked in the child inside the try. Without the
    # block, a SIGINT sent right after the fork could be lost: CPython's fork clears the child's
    # pending signal flags after the kernel has already delivered it, and the child then saved
    # for ever (a 300 s timeout in one CI run; reproduced every time with kills at t = 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            fn()
        except BaseException:
            os._exit(1)
        os._exit(0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return pid

def wait_or_fail(pid, what, limit=60.0):
    # a child that outlives its signal by a minute is a save that ignored it: say so, not hang
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.exit(f"{what}: the saving child was still running {limit:.0f} s after its signal")

def kill_at(k, torn):
    # SIGKILL this process just before filesystem step k of the save (or, torn: halfway
    # through step k if it is a file write)
    count = [0]
    def wrap(fn, is_write=False):
        def wrapped(*a, **kw):
            if count[0] == k:
                if torn and is_write:
                    with open(a[0], "wb") as f:
                        f.write(a[1][: len(a[1]) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                if not torn or is_write:
                    os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return fn(*a, **kw)
        return wrapped
    C._write_file = wrap(C._write_file, is_write=True)
    C._fsync_dir, C._remove_ours = wrap(C._fsync_dir), wrap(C._remove_ours)
    os.replace, os.rmdir, os.unlink, os.mkdir = map(wrap, (os.replace, os.rmdir, os.unlink,
                                                           os.mkdir))
    save(1)
    os._exit(0 if count[0] <= k else 3)  # 0: k is past the save's last step; 3: not a write

n_states = 0
for torn in (False, True):
    for k in range(100):
        fresh()
        status = wait_or_fail(in_child(lambda: kill_at(k, torn)), f"kill at step {k}")
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            break
        if os.WIFEXITED(status):
            continue
        shutil.copytree(out, work / "states" / f"step{k}{'-torn' * torn}", symlinks=True)
        n_states += 1
fresh()
t0 = time.perf_counter()
for i in range(5):
    save(i)
per_save = (time.perf_counter() - t0) / 5
for j in range(n_random):
    sig = (signal.SIGKILL, signal.SIGINT)[j % 2]
    fresh()
    pid = in_child(lambda: [save(i) for i in range(10**9)])
    time.sleep(rng.uniform(0, 3 * per_save))
    os.kill(pid, sig)
    wait_or_fail(pid, f"random kill {j} ({sig.name})")
    shutil.copytree(out, work / "states" / f"random{j}-{sig.name}", symlinks=True)
print(json.dumps({"steps": n_states, "per_save_s": per_save, "s": time.perf_counter() - t_start}))
"""


def test_killed_saves_leave_a_checkpoint_that_loads_and_resumes(tmp_path):
    import os
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    tc = TC  # (shares its compiled code with the tests above)
    reference = train(CFG, TASK, tc)
    train(CFG, TASK, tc, out_dir=tmp_path / "src", callback=lambda info: info["step"] < 16)
    assert C.read_config(tmp_path / "src/checkpoint")["step"] == 16
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "src/checkpoint"),
                           str(tmp_path / "work"), "8", "0"], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["steps"] >= 10  # every step of a replacing save was struck at least once
    states = sorted((tmp_path / "work/states").iterdir())
    assert len(states) == info["steps"] + 8
    kinds = set()
    for state in states:
        names = sorted(p.name for p in state.iterdir())
        kinds.add(tuple(names))
        if "SIGINT" in state.name:  # SIGINT is held until the save is done: nothing is left
            assert names == ["checkpoint"], (state.name, names)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = C.load_model(state / "checkpoint")
        assert trees_equal(model.params, C.load_model(tmp_path / "src/checkpoint").params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = C.read_config(state / "checkpoint")["extra"]
        # the previous checkpoint or a complete new one (the saves number themselves in extra)
        assert extra == {} or (set(extra) == {"save"} and isinstance(extra["save"], int)), extra
        if state.name.startswith("step"):
            assert extra in ({}, {"save": 1}), (state.name, extra)
        assert bool(caught) == ("checkpoint" not in names), (state.name, names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the .old recovery warns)
            seen: list[int] = []
            resumed = train(CFG, TASK, tc, out_dir=state, resume=True,
                            callback=lambda info, seen=seen: seen.append(info["step"]))
        assert seen == [24], (state.name, seen)  # resumed at step 16, not from 0
        assert resumed.history["step"] == list(range(24)), state.name
        assert trees_equal(resumed.params, reference.params), state.name
        assert sorted(p.name for p in state.iterdir()) == ["checkpoint"], state.name
    # the kills produced every kind of leftover: none, a temp dir, an old copy, only the old copy
    assert {("checkpoint",), (".checkpoint.tmp", "checkpoint"), (".checkpoint.old", "checkpoint"),
            (".checkpoint.old", ".checkpoint.tmp")} <= kinds, kinds
