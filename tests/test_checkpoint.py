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


def snapshot(d: Path) -> dict:
    """Every path under d (symlinks not followed) -> its bytes (files), target (links) or None."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p.relative_to(d))] = (os.readlink(p) if p.is_symlink() else
                                          p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture(scope="module")
def model1():
    return HookedTransformer.from_config(CFG, seed=1)


@pytest.mark.parametrize("make", ["other_tools_model", "notes_in_checkpoint", "damaged_config",
                                  "plain_folder"])
def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, model1, make):
    """A save only replaces a folder carrying tinyinterp's marker and nothing else; anything
    else is refused before a byte is written, and left exactly as it was."""
    d = tmp_path / "d"
    if make == "other_tools_model":  # another tool's model: a config.json, weights, a README
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
        (d / "model.safetensors").write_bytes(b"weights")
        (d / "README.md").write_text("my model")
        match = r"not a tinyinterp checkpoint \(its config.json has no \"format\""
    elif make == "notes_in_checkpoint":  # a real checkpoint into which the user put a file
        C.save_model(model1, d)
        (d / "notes.txt").write_text("results of run 3")
        match = r"is a tinyinterp checkpoint but also holds \['notes.txt'\]"
    elif make == "damaged_config":
        d.mkdir()
        (d / "config.json").write_text('{"format": "tinyinterp-chec')
        match = "its config.json is not valid JSON"
    else:
        d.mkdir()
        (d / "precious.txt").write_text("x")
        match = "it has no config.json; it holds precious.txt"
    before = snapshot(tmp_path)
    with pytest.raises(C.CheckpointError, match=match):
        C.save_model(model1, d)
    with pytest.raises(C.CheckpointError, match=match):
        C.save_checkpoint(d, params=model1.params, model_config=CFG, step=1)
    assert snapshot(tmp_path) == before


def test_empty_folder_is_replaced(tmp_path, model1):
    (tmp_path / "d").mkdir()
    C.save_model(model1, tmp_path / "d")
    assert trees_equal(C.load_model(tmp_path / "d").params, model1.params)
    assert listing(tmp_path) == ["d"]


def test_save_to_a_file_the_cwd_or_below_a_file(tmp_path, model1, monkeypatch):
    (tmp_path / "f").write_text("keep")
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "config.json").write_text("{}")
    C.save_model(model1, cwd / "sub" / "model")  # a checkpoint below the cwd is fine
    before = snapshot(tmp_path)
    with pytest.raises(C.CheckpointError, match="is an existing file, not a directory"):
        C.save_model(model1, tmp_path / "f")
    with pytest.raises(C.CheckpointError, match=r"f is a file, not a directory"):
        C.save_model(model1, tmp_path / "f" / "model")
    monkeypatch.chdir(cwd)
    for p in (".", "", tmp_path, "sub/.."):
        with pytest.raises(C.CheckpointError, match="current directory or contains it"):
            C.save_model(model1, p)
    monkeypatch.chdir(cwd / "sub" / "model")  # even when the cwd is a checkpoint
    with pytest.raises(C.CheckpointError, match="current directory"):
        C.save_model(model1, ".")
    assert snapshot(tmp_path) == before


def test_symlinked_paths(tmp_path, model1):
    m2 = HookedTransformer.from_config(CFG, seed=2)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real" / "ck")  # dangling until the first save
    C.save_model(model1, tmp_path / "link")
    C.save_model(m2, tmp_path / "link")  # replaces the target; the link stays a link
    assert (tmp_path / "link").is_symlink() and listing(tmp_path) == ["link", "real"]
    assert listing(tmp_path / "real") == ["ck"]  # no .ck.old / .ck.tmp / .link.old left
    assert trees_equal(C.load_model(tmp_path / "link").params, m2.params)
    # a link in the parent path is followed too
    (tmp_path / "dirlink").symlink_to(tmp_path / "real", target_is_directory=True)
    C.save_model(model1, tmp_path / "dirlink" / "ck")
    assert trees_equal(C.load_model(tmp_path / "real" / "ck").params, model1.params)
    assert listing(tmp_path / "real") == ["ck"]
    # a link to something that is not a checkpoint is refused like the thing itself
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    (tmp_path / "link2").symlink_to(tmp_path / "other")
    with pytest.raises(C.CheckpointError, match="not a tinyinterp checkpoint"):
        C.save_model(model1, tmp_path / "link2")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(C.CheckpointError, match="cannot be resolved"):
        C.save_model(model1, tmp_path / "loop")
    assert (tmp_path / "other" / "x.txt").read_text() == "x"


def test_leftovers_are_cleaned_only_when_they_are_ours(tmp_path, model1):
    path = tmp_path / "ck"
    C.save_model(model1, path)
    # a half-written temp dir and a half-removed old copy (a SIGKILL's leftovers)
    (tmp_path / ".ck.tmp").mkdir()
    (tmp_path / ".ck.tmp" / C.PARAMS_FILE).write_bytes(b"half")
    shutil.copytree(path, tmp_path / ".ck.old")
    (tmp_path / ".ck.old" / C.PARAMS_FILE).unlink()
    C.save_model(model1, path)
    assert listing(tmp_path) == ["ck"]
    # something of the user's under those names is refused and left alone
    for name in (".ck.tmp", ".ck.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("x")
        before = snapshot(tmp_path)
        with pytest.raises(C.CheckpointError, match=f"{name} is in the way"):
            C.save_model(model1, path)
        assert snapshot(tmp_path) == before
        shutil.rmtree(tmp_path / name)


def test_params_that_do_not_fit_the_config_are_not_saved(tmp_path, model1):
    from types import SimpleNamespace

    params = jax.tree_util.tree_map(lambda x: x, model1.params)
    params["blocks"][0]["attn"]["W_O"] = jnp.zeros((3, 4, 16), jnp.float32)
    with pytest.raises(C.CheckpointError, match=r"W_O.*shape \(3, 4, 16\).*\(4, 4, 16\)"):
        C.save_model(SimpleNamespace(cfg=CFG, params=params), tmp_path / "m")
    with pytest.raises(TypeError, match="step must be an int"):
        C.save_checkpoint(tmp_path / "m", params=model1.params, step=2.5)
    assert listing(tmp_path) == []


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
    edit_config(path, lambda d: d["model_config"].update(act_fn="gleu"))  # no such activation
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
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.CheckpointError, match=r"file is a file; a tinyinterp checkpoint is a dir"):
        C.load_model(tmp_path / "file")
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


# ----------------------------------------------------------------------------- malformed fields
@pytest.mark.parametrize("field, value, match", [
    ("step", "5", r"field 'step' is '5', expected an int >= 0"),
    ("step", 5.5, r"field 'step' is 5.5"),
    ("step", -1, r"field 'step' is -1"),
    ("step", True, r"field 'step' is True"),
    ("kind", "weights", r"field 'kind' is 'weights'"),
    ("files", [], r"field 'files' is \[\]"),
    ("files", {C.PARAMS_FILE: "abc"}, r"files entry 'params.safetensors': 'abc' is malformed"),
    ("files", {C.PARAMS_FILE: {"bytes": "10", "sha256": "0" * 64}}, r"files entry.*malformed"),
    ("files", {C.PARAMS_FILE: {"bytes": 10}}, r"files entry.*malformed"),
    ("files", {C.PARAMS_FILE: {"bytes": 10, "sha256": "xyz"}}, r"files entry.*malformed"),
    ("files", {"../../etc/passwd": {"bytes": 10, "sha256": "0" * 64}}, r"files entry '../../etc"),
    ("history", [1, 2], r"field 'history' is \[1, 2\], expected a dict or null"),
    ("model_config", "gpt2", r"field 'model_config' is 'gpt2'"),
    ("train_config", 3, r"field 'train_config' is 3"),
    ("has_opt_state", "yes", r"field 'has_opt_state' is 'yes'"),
    ("rng_impl", 7, r"field 'rng_impl' is 7"),
])
def test_malformed_config_fields(saved, field, value, match):
    path, template = saved
    edit_config(path, lambda d: d.update({field: value}))
    with pytest.raises(C.CheckpointError, match="config.json: " + match):
        load(path, template)
    with pytest.raises(C.CheckpointError, match=match):
        C.load_model(path)


@pytest.mark.parametrize("edit, match", [
    (lambda mc: mc.update(initializer_range="0.1"), "initializer_range must be a number"),
    (lambda mc: mc.update(d_model="16"), "d_model must be an int"),
    (lambda mc: mc.pop("d_model") and mc.update(d_modle=16), "unknown fields"),
])
def test_malformed_model_config(saved, edit, match):
    path, _ = saved
    edit_config(path, lambda d: edit(d["model_config"]))
    with pytest.raises(C.CheckpointError, match="config.json: invalid model_config.*" + match):
        C.load_model(path)


def rewrite_params(path: Path, fn) -> None:
    """Replace params.safetensors by fn(arrays) and record its size and hash, as a save would."""
    import hashlib

    import safetensors.numpy

    arrays = fn(safetensors.numpy.load_file(str(path / C.PARAMS_FILE)))
    data = safetensors.numpy.save(arrays)
    (path / C.PARAMS_FILE).write_bytes(data)
    edit_config(path, lambda d: d["files"].update({C.PARAMS_FILE: {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.float16])
def test_params_stored_with_another_dtype_are_refused(saved, dtype):
    path, template = saved
    rewrite_params(path, lambda a: {k: v.astype(dtype) for k, v in a.items()})
    name = np.dtype(dtype).name
    with pytest.raises(C.CheckpointError, match=rf"params.safetensors: parameter '.*' is stored "
                                                rf"as {name}; .* float32"):
        C.load_model(path)
    with pytest.raises(C.CheckpointError, match=rf"params.safetensors: parameter .* as {name}"):
        load(path, template)
    params = HookedTransformer.from_config(CFG).params  # train's path: a template's dtypes
    with pytest.raises(C.CheckpointError, match=rf"params.safetensors: array .* dtype {name}"):
        C.load_checkpoint(path, params_template=params)


def test_params_with_wrong_shape_name_the_leaf(saved):
    path, _ = saved
    rewrite_params(path, lambda a: {**a, "embed.W_E": np.zeros((4, 16), np.float32)})
    with pytest.raises(C.CheckpointError, match=r"params.safetensors: .*'embed.W_E' has shape "
                                                r"\(4, 16\), the config expects \(11, 16\)"):
        C.load_model(path)


@pytest.mark.parametrize("which", [C.CONFIG_FILE, C.PARAMS_FILE, C.STATE_FILE])
def test_permission_errors_are_checkpoint_errors(saved, monkeypatch, which):
    """(Tests run as root, where chmod does not deny reads: the denial is injected.)"""
    path, template = saved
    real = Path.read_bytes

    def denied(self):
        if self.name == which:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(C.CheckpointError, match=f"{which}: cannot be read \\(Permission denied\\)"):
        load(path, template)


def test_unreadable_folder_is_a_checkpoint_error(tmp_path, monkeypatch):
    def denied(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(C.CheckpointError, match="cannot be accessed \\(Permission denied\\)"):
        C.load_model(tmp_path / "ck")


def test_unwritable_parent_is_refused_before_writing(tmp_path, model1, monkeypatch):
    monkeypatch.setattr(C.os, "access", lambda p, mode: False)
    with pytest.raises(C.CheckpointError, match="no permission to write in"):
        C.save_model(model1, tmp_path / "ck")
    assert listing(tmp_path) == []
