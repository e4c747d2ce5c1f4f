"""Checkpoints: exact round trips, atomic replacement, and a clear CheckpointError (naming the file)
for every way a checkpoint can be broken."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp import checkpoint as C
from tinyinterp.params import flatten_params

CFG = TransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, d_vocab=11, n_ctx=8,
                        attn_only=False, d_mlp=32)


def trees_equal(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype
                            and np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(la, lb, strict=True))


def opt_and_state(params, steps=2):
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(1e-2, mask=lambda p: jax.tree_util.tree_map(
                          lambda x: x.ndim >= 2, p)))
    @jax.jit
    def run(params):
        with jax.numpy_dtype_promotion("standard"):  # optax mixes float and int32 internally
            state = opt.init(params)
            for _ in range(steps):  # non-trivial moments and counts
                grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.3, params)
                updates, state = opt.update(grads, state, params)
                params = optax.apply_updates(params, updates)
        return params, state

    params, state = run(params)
    return opt, params, state


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31 - 1),
       cfg=st.sampled_from([CFG, CFG.replace(attn_only=True, normalization_type="RMS"),
                            CFG.replace(n_layers=2, normalization_type=None)]))
def test_model_round_trip(tmp_path_factory, seed, cfg):
    path = tmp_path_factory.mktemp("m") / "model"
    model = HookedTransformer.from_config(cfg, seed=seed)
    C.save_model(model, path)
    loaded = C.load_model(path)
    assert loaded.cfg == cfg
    assert trees_equal(loaded.params, model.params)
    cfg_json = json.loads((path / "config.json").read_text())
    assert cfg_json["format_version"] == C.FORMAT_VERSION and cfg_json["kind"] == "model"
    # arrays are stored by TransformerLens name
    import safetensors.numpy
    stored = safetensors.numpy.load_file(str(path / C.PARAMS_FILE))
    assert set(stored) == set(flatten_params(model.params))


def test_train_state_round_trip(tmp_path):
    model = HookedTransformer.from_config(CFG, seed=1)
    opt, params, state = opt_and_state(model.params)
    key = jax.random.fold_in(jax.random.key(7), 3)
    history = {"step": [0, 1], "loss": [1.5, np.float32(0.1).item()], "eval": {"step": [1]}}
    C.save_checkpoint(tmp_path / "ck", params=params, model_config=CFG, opt_state=state, step=2,
                      key=key, history=history, train_config={"lr": 0.01}, task={"name": "x"})
    ck = C.load_checkpoint(tmp_path / "ck", opt_state_template=opt.init(model.params),
                           expected_config=CFG)
    assert ck.step == 2 and ck.kind == "train_state" and ck.model_config == CFG
    assert trees_equal(ck.params, params) and trees_equal(ck.opt_state, state)
    assert np.array_equal(jax.random.key_data(ck.key), jax.random.key_data(key))
    assert ck.history == history and ck.train_config == {"lr": 0.01} and ck.task == {"name": "x"}
    # a training checkpoint loads as a bare model too
    assert trees_equal(C.load_model(tmp_path / "ck").params, params)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_replace_and_crash_between_renames(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    m1 = HookedTransformer.from_config(CFG, seed=1)
    m2 = HookedTransformer.from_config(CFG, seed=2)
    C.save_model(m1, path)
    C.save_model(m2, path)  # replaces
    assert trees_equal(C.load_model(path).params, m2.params)
    assert listing(tmp_path) == ["ck"]  # no temp dirs left behind

    # a failure while writing the new files leaves the old checkpoint in place, and no temp dir
    real_write = C._write_file

    def failing_write(p, data):
        real_write(p, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "_write_file", failing_write)
    with pytest.raises(C.CheckpointError, match="No space left.*previous checkpoint.*unchanged"):
        C.save_model(m1, path)
    monkeypatch.setattr(C, "_write_file", real_write)
    assert trees_equal(C.load_model(path).params, m2.params)
    assert listing(tmp_path) == ["ck"]

    # a SIGKILL between moving the old one aside and moving the new one in leaves only .ck.old:
    # it is found (with a warning), and the next save puts a new one in place and cleans up
    os.replace(path, tmp_path / ".ck.old")
    with pytest.warns(UserWarning, match="interrupted"):
        assert trees_equal(C.load_model(path).params, m2.params)
    assert C.find_checkpoint(path) == tmp_path / ".ck.old"
    C.save_model(m1, path)
    assert trees_equal(C.load_model(path).params, m1.params)
    assert listing(tmp_path) == ["ck"]
    # the same with an empty directory at NAME (e.g. made by a script's mkdir -p)
    os.replace(path, tmp_path / ".ck.old")
    path.mkdir()
    with pytest.warns(UserWarning, match="interrupted"):
        assert trees_equal(C.load_model(path).params, m1.params)
    assert C.recover_interrupted_save(path)
    assert listing(tmp_path) == ["ck"] and trees_equal(C.load_model(path).params, m1.params)


def _count_ops(monkeypatch, fail_at=None, exc=None):
    """Wrap every filesystem step of a save (file writes, fsyncs, renames, removals, mkdir) to
    count them, raising ``exc`` just before step ``fail_at``."""
    calls = [0]

    def wrap(fn):
        def wrapped(*a, **kw):
            if calls[0] == fail_at:
                calls[0] += 1
                raise exc
            calls[0] += 1
            return fn(*a, **kw)
        return wrapped

    for name in ("_write_file", "_fsync_dir", "_remove_ours"):
        monkeypatch.setattr(C, name, wrap(getattr(C, name)))
    for name in ("replace", "rmdir", "unlink"):
        monkeypatch.setattr(C.os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(C.Path, "mkdir", wrap(Path.mkdir))
    return calls


@pytest.mark.parametrize("exc", [OSError(5, "Input/output error"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_a_save_that_fails_at_any_step_rolls_back(tmp_path, monkeypatch, exc):
    """An exception at any step of a save (an OSError, or a KeyboardInterrupt where SIGINT cannot
    be held: outside the main thread) leaves one complete checkpoint, the old one or the new one,
    and nothing else: the old one goes back in place, the temporary directory is removed."""
    m1 = HookedTransformer.from_config(CFG, seed=1)
    m2 = HookedTransformer.from_config(CFG, seed=2)
    with monkeypatch.context() as mp:
        n_ops = _count_ops(mp)
        C.save_model(m1, tmp_path / "count")
        C.save_model(m1, tmp_path / "count")  # a replacing save: the longest sequence
    n = n_ops[0] // 2 + 1
    assert n >= 8
    for k in range(n):
        d = tmp_path / f"k{k}"
        C.save_model(m1, d / "ck")
        with monkeypatch.context() as mp:
            _count_ops(mp, fail_at=k, exc=exc)
            try:
                C.save_model(m2, d / "ck")
                saved = True
            except (C.CheckpointError, KeyboardInterrupt) as e:
                assert isinstance(e, C.CheckpointError) == isinstance(exc, OSError)
                saved = False
        # only the removal of the old copy after a successful save may leave it (with a warning)
        assert listing(d) == ["ck"] or (saved and listing(d) == [".ck.old", "ck"]), (k, listing(d))
        got = C.load_model(d / "ck").params
        assert trees_equal(got, m2.params) if saved else (
            trees_equal(got, m1.params) or trees_equal(got, m2.params)), k
        C.save_model(m1, d / "ck")  # the next save cleans whatever was left
        assert listing(d) == ["ck"] and trees_equal(C.load_model(d / "ck").params, m1.params)


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("x")
    with pytest.raises(C.CheckpointError, match="not a tinyinterp checkpoint"):
        C.save_model(HookedTransformer.from_config(CFG), tmp_path / "d")
    assert (tmp_path / "d" / "precious.txt").read_text() == "x"


# ----------------------------------------------------------------------------- corrupt files
@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    model = HookedTransformer.from_config(CFG, seed=3)
    opt, params, state = opt_and_state(model.params)
    path = tmp_path_factory.mktemp("src") / "ck"
    C.save_checkpoint(path, params=params, model_config=CFG, opt_state=state, step=5,
                      key=jax.random.key(0), train_config={}, task=None)
    with jax.numpy_dtype_promotion("standard"):
        template = opt.init(model.params)
    return path, template


@pytest.fixture
def saved(saved_once, tmp_path):
    """A fresh copy of a good training checkpoint, for a test to damage."""
    src, template = saved_once
    shutil.copytree(src, tmp_path / "ck")
    return tmp_path / "ck", template


def load(path, template):
    return C.load_checkpoint(path, opt_state_template=template, expected_config=CFG)


@pytest.mark.parametrize("fname", [C.PARAMS_FILE, C.STATE_FILE])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "missing", "empty"])
def test_damaged_array_file(saved, fname, damage):
    path, template = saved
    f = path / fname
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(data)))
    elif damage == "flip":  # same size, one byte changed inside the tensor data
        f.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif damage == "missing":
        f.unlink()
    else:
        f.write_bytes(b"")
    with pytest.raises(C.CheckpointError, match=fname):
        load(path, template)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "not_ours"])
def test_damaged_config(saved, damage):
    path, template = saved
    f = path / C.CONFIG_FILE
    text = f.read_text()
    if damage == "truncate":
        f.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(200))
    elif damage == "missing":
        f.unlink()
    else:
        f.write_text(json.dumps({"hello": 1}))
    with pytest.raises(C.CheckpointError, match="config.json"):
        load(path, template)


def edit_config(path: Path, fn) -> None:
    f = path / C.CONFIG_FILE
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def test_wrong_format_version(saved):
    path, template = saved
    edit_config(path, lambda d: d.update(format_version=C.FORMAT_VERSION + 1))
    with pytest.raises(C.CheckpointError, match=r"config.json.*format_version 2 is not supported"):
        load(path, template)


def test_config_mismatch(saved):
    path, template = saved
    with pytest.raises(C.CheckpointError, match=r"config.json.*d_vocab=11 \(expected 12\)"):
        C.load_checkpoint(path, expected_config=CFG.replace(d_vocab=12))
    # a config edited so the stored arrays no longer fit it
    edit_config(path, lambda d: d["model_config"].update(d_vocab=12))
    with pytest.raises(C.CheckpointError, match=r"params.safetensors.*embed.W_E.*shape"):
        C.load_model(path)
    edit_config(path, lambda d: d["model_config"].update(d_head=5))
    with pytest.raises(C.CheckpointError, match=r"config.json: invalid model_config"):
        C.load_model(path)


def test_optimizer_mismatch(saved):
    path, _ = saved
    other = optax.sgd(0.1, momentum=0.9).init(HookedTransformer.from_config(CFG).params)
    with pytest.raises(C.CheckpointError, match=r"train_state.safetensors.*does not match"):
        C.load_checkpoint(path, opt_state_template=other)
    bigger = HookedTransformer.from_config(CFG.replace(d_mlp=48)).params
    with jax.numpy_dtype_promotion("standard"):
        st2 = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, mask=lambda p: (
            jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)))).init(bigger)
    with pytest.raises(C.CheckpointError, match=r"train_state.safetensors.*W_in.*shape"):
        C.load_checkpoint(path, opt_state_template=st2)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CheckpointError, match=r"empty/config.json: missing"):
        C.load_model(tmp_path / "empty")
    C.save_model(HookedTransformer.from_config(CFG), tmp_path / "bare")
    with pytest.raises(C.CheckpointError, match="no optimizer state"):
        C.load_checkpoint(tmp_path / "bare", opt_state_template={"x": jnp.zeros(1)})


def test_no_pickle_anywhere(saved):
    path, _ = saved
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x05"  # pickle protocol markers


@settings(max_examples=40)
@given(fname=st.sampled_from([C.PARAMS_FILE, C.STATE_FILE, C.CONFIG_FILE]),
       frac=st.floats(0.0, 1.0, exclude_max=True), flip=st.booleans())
def test_any_truncation_or_flipped_byte_in_array_files(saved_once, tmp_path_factory, fname, frac,
                                                       flip):
    """Cutting a file anywhere, or flipping any byte of an array file, is a CheckpointError."""
    src, template = saved_once
    path = tmp_path_factory.mktemp("h") / "ck"
    shutil.copytree(src, path)
    f = path / fname
    data = f.read_bytes()
    at = int(frac * len(data))
    if flip and fname != C.CONFIG_FILE:  # (a flipped byte can leave JSON valid: not detectable)
        f.write_bytes(data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:])
    else:
        f.write_bytes(data[:at])
    with pytest.raises(C.CheckpointError, match=fname):
        load(path, template)
