"""Checkpoints: a directory of JSON + safetensors, written atomically, never pickled.

Layout of a checkpoint directory::

    config.json                 format + format_version (the marker, see below), kind ("model" |
                                "train_state"), model_config, train_config, task, step, metrics
                                history, rng key impl, and for each array file its byte size and
                                sha256
    params.safetensors          parameters by TransformerLens state-dict name ("blocks.0.attn.W_Q")
    train_state.safetensors     (train_state only) optimizer-state leaves by their pytree path
                                ("opt_state.1.0.mu.blocks.0.attn.W_Q") and the RNG key data
                                ("rng.key")

What counts as a checkpoint (the marker): a directory whose config.json is JSON with
``"format": "tinyinterp-checkpoint"``, and which holds nothing but that config.json and the array
files it lists. A save replaces only such a directory (or an empty one, or nothing). Anything else
(a folder of another tool's model with its own config.json, a file, a checkpoint into which you put
a notes.txt, the current directory) is refused with a ``CheckpointError`` before anything is
written: a save never deletes what it did not write.

Atomic writes into ``NAME``:

1. leftovers of an interrupted save are removed: ``.NAME.tmp``, and ``.NAME.old`` once ``NAME``
   exists (each only if it holds nothing but checkpoint files: anything else is refused);
2. everything is written into ``.NAME.tmp``, each file fsynced, config.json last;
3. ``NAME`` is renamed to ``.NAME.old``, ``.NAME.tmp`` to ``NAME``, the parent fsynced, and
   ``.NAME.old`` removed (its config.json last, so a half-removed one is still recognised).

A SIGKILL at any moment leaves ``NAME`` complete (old or new), or, between the two renames, only
``.NAME.old``: ``load_model``/``load_checkpoint`` then load that one with a warning,
``train(resume=True)`` moves it back into place, and the next save cleans up. SIGINT (Ctrl-C) in
the main thread is held until the save is done; any other exception rolls the save back (the old
checkpoint goes back in place, the temporary directory is removed). ``NAME`` may be a symlink to a
directory: the checkpoint is written at its target and the link is kept.

Every problem on load (missing file, truncated or corrupt bytes, wrong format version, malformed
fields, arrays that do not match the config or the optimizer, permission errors) raises
``CheckpointError`` (a ``ValueError``) naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import stat
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from tinyinterp.config import TransformerConfig

FORMAT = "tinyinterp-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
STATE_FILE = "train_state.safetensors"
CHECKPOINT_FILES = frozenset({CONFIG_FILE, PARAMS_FILE, STATE_FILE})
RUN_CHECKPOINT_DIR = "checkpoint"  # where a training run's out_dir keeps its checkpoint


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not match what the caller expects."""


@dataclasses.dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns. ``params`` is the nested params dict when the checkpoint
    has a model config (or a ``params_template`` was given), else ``{name: array}``."""

    path: Path
    kind: str
    params: Any
    model_config: TransformerConfig | None
    opt_state: Any = None
    step: int = 0
    key: jax.Array | None = None
    history: dict = dataclasses.field(default_factory=dict)
    train_config: dict | None = None
    task: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- pytree <-> names
def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf} for any pytree (dict keys, list indices, namedtuple fields). For a params
    dict this gives exactly the TransformerLens names of ``params.flatten_params``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join([prefix] * bool(prefix) + [_key_name(k) for k in path])
        if name in out:
            raise ValueError(f"two leaves of the pytree share the name {name!r}")
        out[name] = leaf
    return out


def fill_tree(template: Any, arrays: dict[str, np.ndarray], prefix: str, file: Path) -> Any:
    """Rebuild ``template``'s structure with leaves taken from ``arrays`` by path name, checking
    that the names, shapes and dtypes match exactly."""
    names = flatten_tree(template, prefix)
    got = {k: v for k, v in arrays.items() if k == prefix or k.startswith(prefix + ".")}
    missing, unexpected = sorted(set(names) - set(got)), sorted(set(got) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: the stored {prefix} does not match the expected structure: "
            + (f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''} " if missing else "")
            + (f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
               if unexpected else "")
            + " (was it saved with different optimizer settings or model shape?)")
    leaves = []
    for name, ref in names.items():
        value = got[name]
        ref_shape, ref_dtype = tuple(np.shape(ref)), np.dtype(ref.dtype)
        if tuple(value.shape) != ref_shape or value.dtype != ref_dtype:
            raise CheckpointError(
                f"{file}: array {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"expected shape {ref_shape} and dtype {ref_dtype}")
        leaves.append(jnp.asarray(value))
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- writing
def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_numpy(tree_flat: dict[str, Any]) -> dict[str, np.ndarray]:
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,)
    return {k: np.array(v, order="C") for k, v in jax.device_get(tree_flat).items()}


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _json_safe(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tmp_old(path: Path) -> tuple[Path, Path]:
    return path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"


def _os_error(e: OSError) -> str:
    return e.strerror or str(e)


def _listdir(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError as e:
        raise CheckpointError(f"{d}: cannot be listed ({_os_error(e)})") from e


def _marker(d: Path) -> dict | str:
    """``d/config.json`` as a dict when it carries the tinyinterp marker, else why not (a str)."""
    file = d / CONFIG_FILE
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return f"it has no {CONFIG_FILE}"
    except OSError as e:
        return f"its {CONFIG_FILE} cannot be read ({_os_error(e)})"
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"its {CONFIG_FILE} is not valid JSON"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return f"its {CONFIG_FILE} has no \"format\": \"{FORMAT}\" (another tool's file?)"
    return config


def _foreign_entries(d: Path, config: dict | None) -> list[str]:
    """The entries of ``d`` that a save may not delete: anything but regular files named as a
    checkpoint's files (CHECKPOINT_FILES, or listed in ``config["files"]``)."""
    allowed = set(CHECKPOINT_FILES)
    files = config.get("files") if isinstance(config, dict) else None
    if isinstance(files, dict):
        allowed |= {k for k in files if isinstance(k, str)}
    out = []
    for name in _listdir(d):
        try:
            regular = stat.S_ISREG(os.lstat(d / name).st_mode)
        except OSError:
            regular = False
        if name not in allowed or not regular:
            out.append(name)
    return out


def _is_leftover(d: Path) -> bool:
    """Whether ``d`` (a ``.NAME.tmp`` or ``.NAME.old``) is what an interrupted save of ours left:
    a real directory holding nothing but checkpoint files (complete, partial or half-removed)."""
    if d.is_symlink() or not d.is_dir():
        return False
    m = _marker(d)
    return not _foreign_entries(d, m if isinstance(m, dict) else None)


def _remove_ours(d: Path) -> None:
    """Remove a directory that ``_is_leftover`` (or the marker check) accepted: its array files,
    then config.json, then the directory, so that a removal cut short is still recognised."""
    names = os.listdir(d)
    for name in names:
        if name != CONFIG_FILE:
            os.unlink(d / name)
    if CONFIG_FILE in names:
        os.unlink(d / CONFIG_FILE)
    os.rmdir(d)


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not _listdir(p)


def check_save_path(path: str | os.PathLike) -> Path:
    """Raise ``CheckpointError`` unless a checkpoint can be saved at ``path`` without destroying
    anything that is not a tinyinterp checkpoint; return the path a save writes (symlinks
    resolved). Touches nothing on disk. ``save_model``, ``save_checkpoint``, ``train`` (before its
    first step) and the CLI (before any work) call it.

    Refused: an existing file; a non-empty directory without the checkpoint marker, or a
    checkpoint holding other files too; the current directory or one that contains it (replacing it
    would pull the directory out from under the process); a parent that is a file or not writable;
    a ``.NAME.tmp``/``.NAME.old`` next to it that is not an interrupted save's leftover."""
    given = Path(path)
    target = Path(os.path.realpath(os.fspath(path)))
    if target.is_symlink():
        raise CheckpointError(f"{given}: the symlink cannot be resolved (a loop?); save to a real "
                              "directory path")
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise CheckpointError(
            f"cannot save a checkpoint to {given} ({target}): it is the current directory or "
            "contains it, and a save replaces the whole directory; save into a new subdirectory "
            f"instead, e.g. {given / 'model'}")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {given}: {ancestor} is a file, not a "
                              "directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot save a checkpoint to {given}: no permission to write in "
                              f"{ancestor}")
    if os.path.lexists(target):
        if not target.is_dir():
            raise CheckpointError(
                f"cannot save a checkpoint to {given}: it is an existing file, not a directory "
                "(a checkpoint is a directory); refusing to replace it. Choose another path.")
        entries = _listdir(target)
        if entries:
            m = _marker(target)
            if isinstance(m, str):
                shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
                raise CheckpointError(
                    f"cannot save a checkpoint to {given}: the directory exists and is not a "
                    f"tinyinterp checkpoint ({m}; it holds {shown}). A save replaces the whole "
                    "directory, so it refuses to touch this one: choose a new path, or empty it "
                    "yourself.")
            extra = _foreign_entries(target, m)
            if extra:
                raise CheckpointError(
                    f"cannot save a checkpoint to {given}: it is a tinyinterp checkpoint but also "
                    f"holds {extra[:5]}, which replacing it would delete; move them out first")
    for leftover in _tmp_old(target):
        if os.path.lexists(leftover) and not _is_leftover(leftover):
            raise CheckpointError(
                f"cannot save a checkpoint to {given}: {leftover} is in the way and is not the "
                "leftover of an interrupted tinyinterp save (it holds other files, or is a file "
                "or a link); move or remove it")
    return target


@contextlib.contextmanager
def _sigint_held():
    """Hold SIGINT (Ctrl-C) until the block ends, then deliver it, so an interrupt never lands
    between a save's renames. Only the main thread can set signal handlers; elsewhere the save's
    roll-back handles a KeyboardInterrupt."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except ValueError:  # not the main thread of the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
            elif previous is None:
                raise KeyboardInterrupt


def _roll_back(target: Path, tmp: Path, old: Path) -> None:
    """After a save failed part-way: put the previous checkpoint back (or, if the new one is
    already in place, drop the old one) and remove the temporary directory. Best effort: whatever
    it cannot do is a leftover that the next save cleans and that loading recovers from."""
    try:
        if not os.path.lexists(target) and os.path.lexists(old):
            os.replace(old, target)
        elif os.path.lexists(old) and isinstance(_marker(target), dict) and _is_leftover(old):
            _remove_ours(old)  # the new checkpoint is in place: the old one is stale
        if os.path.lexists(tmp) and _is_leftover(tmp):
            _remove_ours(tmp)
    except BaseException:  # noqa: BLE001 - the original error is the one to report
        pass


def _atomic_write_dir(path: str | os.PathLike, files: dict[str, bytes],
                      config: dict[str, Any]) -> Path:
    target = check_save_path(path)
    parent = target.parent
    tmp, old = _tmp_old(target)
    meta = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()}
    text = json.dumps(_json_safe(dict(config, files=meta)), indent=1, sort_keys=False).encode()
    placed = False
    with _sigint_held():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(tmp):
                _remove_ours(tmp)
            if os.path.lexists(old) and _is_empty_dir(target):
                os.rmdir(target)  # only the old copy holds a checkpoint: keep it until replaced
            if os.path.lexists(old) and os.path.lexists(target):
                _remove_ours(old)  # stale: NAME is complete
            tmp.mkdir()
            for name, data in files.items():
                _write_file(tmp / name, data)
            _write_file(tmp / CONFIG_FILE, text)  # last: tmp is complete once it is there
            _fsync_dir(tmp)
            if os.path.lexists(target):
                os.replace(target, old)
            os.replace(tmp, target)
            placed = True
            _fsync_dir(parent)
            if os.path.lexists(old):
                _remove_ours(old)
        except BaseException as e:
            _roll_back(target, tmp, old)
            if placed and isinstance(e, OSError):  # saved; only the cleanup failed
                warnings.warn(f"saved {path}, but a step after the new checkpoint was in place "
                              f"failed ({e}); a leftover {old} is removed by the next save",
                              stacklevel=3)
            elif isinstance(e, OSError):
                kept = (f"; the previous checkpoint at {path} is unchanged"
                        if (target / CONFIG_FILE).exists() else "")
                raise CheckpointError(f"could not save the checkpoint to {path}: {e}{kept}") from e
            else:
                raise
    return target


def _base_config(kind: str, model_config: TransformerConfig | dict | None) -> dict[str, Any]:
    from tinyinterp import __version__

    if isinstance(model_config, TransformerConfig):
        model_config = model_config.to_dict()
    if isinstance(model_config, dict):  # the attention backend is how a run computes, not what the
        # model is: two saves that differ only in it write the same checkpoint
        model_config = {k: v for k, v in model_config.items() if k != "attention_backend"}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "tinyinterp_version": __version__,
            "kind": kind, "model_config": model_config}


def _check_model_params(params: Any, model_config: TransformerConfig | dict | None) -> None:
    from tinyinterp.params import check_params

    if model_config is None:
        return
    cfg = (model_config if isinstance(model_config, TransformerConfig)
           else TransformerConfig.from_dict(model_config))
    try:
        check_params(params, cfg)
    except ValueError as e:
        raise CheckpointError(f"refusing to save params that do not fit their config: {e}") from e


def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` (a HookedTransformer: ``.cfg`` + ``.params``) to the directory ``path``
    atomically: config.json + params.safetensors. Replaces only a tinyinterp checkpoint (see the
    module docstring); ``CheckpointError`` for anything else. Returns the path."""
    _check_model_params(model.params, model.cfg)
    params = _to_numpy(flatten_tree(model.params))
    config = _base_config("model", model.cfg)
    _atomic_write_dir(path, {PARAMS_FILE: safetensors.numpy.save(params)}, config)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, *, params: Any,
                    model_config: TransformerConfig | dict | None = None, opt_state: Any = None,
                    step: int = 0, key: jax.Array | None = None, history: dict | None = None,
                    train_config: dict | None = None, task: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write a training state atomically to the directory ``path`` (replacing only a tinyinterp
    checkpoint, see the module docstring).

    ``params``: a pytree (TL-named params dict for a transformer, checked against
    ``model_config`` when given); ``opt_state``: an optax state; ``step``: an int >= 0; ``key``: a
    typed PRNG key (``jax.random.key``); ``history``: {name: list/array of numbers or nested dict};
    ``train_config``/``task``/``extra``: JSON-safe dicts. Returns the path."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise TypeError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    _check_model_params(params, model_config)
    flat_params = _to_numpy(flatten_tree(params))
    state = _to_numpy(flatten_tree(opt_state, "opt_state")) if opt_state is not None else {}
    config = _base_config("train_state", model_config)
    if key is not None:
        config["rng_impl"] = str(jax.random.key_impl(key))
        state["rng.key"] = np.asarray(jax.random.key_data(key))
    config.update(step=int(step), train_config=train_config, task=task,
                  has_opt_state=opt_state is not None, history=history or {}, extra=extra or {})
    files = {PARAMS_FILE: safetensors.numpy.save(flat_params),
             STATE_FILE: safetensors.numpy.save(state)}
    _atomic_write_dir(path, files, config)
    return Path(path)


# ----------------------------------------------------------------------------- reading
def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be accessed ({_os_error(e)})") from e


def _missing_or_empty(p: Path) -> bool:
    return not _exists(p) or (p.is_dir() and not _listdir(p))


def _find(path: Path, run_dir: bool = True) -> tuple[Path | None, bool]:
    """(where the checkpoint is, whether that is an interrupted save's ``.NAME.old``)."""
    for p in (path, path / RUN_CHECKPOINT_DIR)[:2 if run_dir else 1]:
        if _exists(p / CONFIG_FILE):
            return p, False
        old = _tmp_old(p)[1]
        if _missing_or_empty(p) and _exists(old / CONFIG_FILE):
            return old, True
    return None, False


def find_checkpoint(path: str | os.PathLike, *, run_dir: bool = True) -> Path | None:
    """Where the checkpoint saved at ``path`` is, or None if there is none. Touches nothing.

    ``path`` itself when it holds a config.json; ``path/checkpoint`` for a training run's
    ``out_dir`` (unless ``run_dir=False``); or, after a save interrupted between its two renames
    (``path`` missing or empty), the complete previous checkpoint at ``.NAME.old``
    (``recover_interrupted_save`` moves it back)."""
    return _find(Path(path), run_dir)[0]


def recover_interrupted_save(path: str | os.PathLike) -> bool:
    """If a save to ``path`` was interrupted between its two renames (``path`` missing or empty,
    the previous checkpoint complete at ``.NAME.old``), move that checkpoint back to ``path`` and
    return True (with a warning); otherwise change nothing and return False."""
    path = Path(path)
    old = _tmp_old(path)[1]
    if not (_missing_or_empty(path) and _exists(old / CONFIG_FILE)):
        return False
    read_config(old)  # only a readable tinyinterp checkpoint is moved
    try:
        if _exists(path):
            os.rmdir(path)
        os.replace(old, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot move the interrupted save's previous checkpoint {old} back "
                              f"to {path}: {e}") from e
    warnings.warn(f"{path}: a save was interrupted between two renames; the previous checkpoint "
                  f"(complete) was moved back from {old}", stacklevel=2)
    return True


def _resolve(path: Path) -> Path:
    found, interrupted = _find(path)
    if interrupted:
        warnings.warn(f"{found.parent / found.name[1:-4]} is missing but a complete previous "
                      f"checkpoint is at {found} (a save was interrupted between two renames); "
                      "loading that one", stacklevel=3)
    if found is not None:
        return found
    if not _exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a tinyinterp checkpoint is a directory (with "
                              f"{CONFIG_FILE} and {PARAMS_FILE})")
    raise CheckpointError(f"{path / CONFIG_FILE}: missing; {path} is not a tinyinterp checkpoint "
                          f"(expected {CONFIG_FILE} and {PARAMS_FILE})")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_fields(config: dict[str, Any], file: Path) -> None:
    """Every field a loader reads has the type it needs: a hand-edited or damaged config.json is a
    CheckpointError naming the field, never a TypeError or KeyError deep in the loader."""
    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{file}: field {field!r} is {config.get(field)!r}, expected "
                               f"{expected} (the file was edited or is damaged)")

    if config.get("kind") not in ("model", "train_state"):
        raise bad("kind", "'model' or 'train_state'")
    step = config.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad("step", "an int >= 0")
    files = config.get("files")
    if not isinstance(files, dict):
        raise bad("files", "a dict {file name: {\"bytes\": int, \"sha256\": hex}}")
    for name, meta in files.items():
        ok = (name in (PARAMS_FILE, STATE_FILE) and isinstance(meta, dict)
              and isinstance(meta.get("bytes"), int) and not isinstance(meta.get("bytes"), bool)
              and meta["bytes"] >= 0 and isinstance(meta.get("sha256"), str)
              and _SHA256.match(meta["sha256"]) is not None)
        if not ok:
            raise CheckpointError(
                f"{file}: files entry {name!r}: {meta!r} is malformed; expected a file name among "
                f"{[PARAMS_FILE, STATE_FILE]} with {{\"bytes\": int >= 0, \"sha256\": 64 hex "
                "digits}} (the file was edited or is damaged)")
    for field in ("model_config", "train_config", "task", "history", "extra"):
        if not isinstance(config.get(field), (dict, type(None))):
            raise bad(field, "a dict or null")
    if not isinstance(config.get("has_opt_state", False), bool):
        raise bad("has_opt_state", "true or false")
    if not isinstance(config.get("rng_impl", ""), str):
        raise bad("rng_impl", "a str")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, with the format, version and field types checked."""
    path = _resolve(Path(path))
    file = path / CONFIG_FILE
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({_os_error(e)})") from e
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e}); the file is corrupt or "
                              "truncated") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a tinyinterp checkpoint config (expected "
                              f"\"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported; this "
                              f"tinyinterp reads format_version {FORMAT_VERSION}")
    _check_fields(config, file)
    config["_path"] = path
    return config


def _read_arrays(config: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    file = config["_path"] / name
    meta = config["files"].get(name)
    if meta is None:
        raise CheckpointError(f"{config['_path'] / CONFIG_FILE}: lists no {name}")
    try:
        data = file.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing (the checkpoint is incomplete)") from e
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({_os_error(e)})") from e
    if len(data) != meta["bytes"]:
        raise CheckpointError(f"{file}: truncated or altered: {len(data)} bytes, expected "
                              f"{meta['bytes']}")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{file}: corrupt: its sha256 does not match the one recorded in "
                              f"{CONFIG_FILE}")
    try:
        return safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError) as e:  # pragma: no cover - hash caught it
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e


def _model_config(config: dict[str, Any]) -> TransformerConfig | None:
    d = config.get("model_config")
    if d is None:
        return None
    try:
        return TransformerConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config['_path'] / CONFIG_FILE}: invalid model_config: {e}") from e


def _params(config: dict[str, Any], cfg: TransformerConfig | None, template: Any) -> Any:
    from tinyinterp.params import check_params, unflatten_params

    arrays = _read_arrays(config, PARAMS_FILE)
    file = config["_path"] / PARAMS_FILE
    if template is not None:
        params = fill_tree(template, {f"params.{k}": v for k, v in arrays.items()}, "params",
                           file)
    elif cfg is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    else:
        for name, value in arrays.items():
            if value.dtype != np.float32:  # unflatten_params would cast it silently
                raise CheckpointError(f"{file}: parameter {name!r} is stored as {value.dtype}; "
                                      "a transformer's parameters are float32")
        try:
            params = unflatten_params(arrays, cfg)
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from e
    if cfg is not None:
        try:
            check_params(params, cfg)
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from e
    return params


def _check_expected(config: dict, cfg: TransformerConfig | None,
                    expected: TransformerConfig | None) -> None:
    if expected is None:
        return
    if cfg is None:
        raise CheckpointError(f"{config['_path'] / CONFIG_FILE}: has no model_config, expected "
                              f"{expected}")
    if cfg.replace(attention_backend=expected.attention_backend) == expected:
        return  # the attention backend is a run option, never stored
    a, b = cfg.to_dict(), expected.to_dict()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "attention_backend"}
    raise CheckpointError(f"{config['_path'] / CONFIG_FILE}: model config does not match: "
                          + ", ".join(f"{k}={v[0]!r} (expected {v[1]!r})" for k, v in diff.items()))


def load_model(path: str | os.PathLike, *, expected_config: TransformerConfig | None = None):
    """Load a HookedTransformer from a model or training checkpoint directory (or a training
    run's out_dir). Params are checked against the stored config (``check_params``)."""
    from tinyinterp.model import HookedTransformer

    config = read_config(path)
    cfg = _model_config(config)
    if cfg is None:
        raise CheckpointError(f"{config['_path'] / CONFIG_FILE}: has no model_config, so it "
                              "cannot be loaded as a HookedTransformer")
    _check_expected(config, cfg, expected_config)
    return HookedTransformer(cfg, _params(config, cfg, None))


def load_checkpoint(path: str | os.PathLike, *, opt_state_template: Any = None,
                    params_template: Any = None,
                    expected_config: TransformerConfig | None = None) -> Checkpoint:
    """Read a checkpoint. The optimizer state is rebuilt only when ``opt_state_template`` (e.g.
    ``optimizer.init(params)``) is given: its structure is filled leaf by leaf by path name, with
    shapes and dtypes checked. ``expected_config``: raise unless the stored model config equals it.
    """
    config = read_config(path)
    p = config["_path"]
    cfg = _model_config(config)
    _check_expected(config, cfg, expected_config)
    params = _params(config, cfg, params_template)
    ckpt = Checkpoint(path=p, kind=config["kind"], params=params, model_config=cfg,
                      step=config.get("step", 0), history=config.get("history") or {},
                      train_config=config.get("train_config"), task=config.get("task"),
                      extra=config.get("extra") or {})
    if config["kind"] != "train_state":
        if opt_state_template is not None:
            raise CheckpointError(f"{p / CONFIG_FILE}: is a bare model checkpoint (kind "
                                  f"{config['kind']!r}); it holds no optimizer state to "
                                  "resume from")
        return ckpt
    state = _read_arrays(config, STATE_FILE)
    if "rng.key" in state:
        impl = config.get("rng_impl", "threefry2x32")
        try:
            ckpt.key = jax.random.wrap_key_data(jnp.asarray(state["rng.key"]), impl=impl)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{p / STATE_FILE}: bad rng.key for impl {impl!r}: {e}") from e
    if opt_state_template is not None:
        if not config.get("has_opt_state"):
            raise CheckpointError(f"{p / STATE_FILE}: holds no optimizer state")
        opt = {k: v for k, v in state.items() if k.startswith("opt_state")}
        ckpt.opt_state = fill_tree(opt_state_template, opt, "opt_state", p / STATE_FILE)
    return ckpt
