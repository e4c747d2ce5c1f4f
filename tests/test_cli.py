"""The `tinyinterp` command checks --out and every flag before any work, --resume refuses flags
that contradict the stored run (and says what it does without --steps), and a user's mistake is
one line on stderr with exit code 2 (1 for a run that failed), never a traceback."""

import jax
import numpy as np
import pytest

from tinyinterp import TransformerConfig
from tinyinterp import checkpoint as C
from tinyinterp.cli import main
from tinyinterp.params import init_params
from tinyinterp.tasks import get_task
from tinyinterp.train import TrainConfig, TrainingDiverged, make_optimizer

TASK = get_task("copy", n_symbols=5, length=3)
TC = TrainConfig(steps=8, batch_size=4, lr=0.01, progress=False)
CFG = TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=64, d_vocab=TASK.d_vocab,
                        n_ctx=TASK.seq_len, attention_backend="xla", model_name="copy")
SMALL = ["--task", "copy", "--task-option", "n_symbols=5", "--task-option", "length=3",
         "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--batch-size", "4",
         "--lr", "0.01", "--attention-backend", "xla", "--no-progress"]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, match: str) -> None:
    import re

    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]


def patch_train(monkeypatch, fn) -> None:
    """Replace tinyinterp.train.train with ``fn`` for one test, also where a module bound the name
    at import. The reproduction is imported first: imported (by the command) while the stand-in
    was in place, it would keep the stand-in for the rest of the session (seen in CI: the
    induction reproduction's test ran into "training started")."""
    import tinyinterp.reproduce.induction
    import tinyinterp.train

    monkeypatch.setattr(tinyinterp.train, "train", fn)
    monkeypatch.setattr(tinyinterp.reproduce.induction, "train", fn)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training starts: these errors must come before any work."""

    def refuse(*a, **kw):
        raise AssertionError("training started")

    patch_train(monkeypatch, refuse)


@pytest.fixture
def fake_train(monkeypatch):
    """Record what train() would be called with, without training."""
    import tinyinterp.train

    calls = []

    def fake(cfg, task, tc, *, out_dir, resume, overwrite):
        calls.append(dict(cfg=cfg, task=task, tc=tc, out_dir=out_dir, resume=resume,
                          overwrite=overwrite))
        return tinyinterp.train.TrainResult(params=None, opt_state=None, step=tc.steps,
                                            history={"loss": [1.0]}, train_config=tc,
                                            checkpoint=None)

    patch_train(monkeypatch, fake)
    return calls


def stored_run(out, *, step=4, tc=TC, cfg=CFG):
    """A run's checkpoint at ``step``, written directly (no training needed to test the CLI)."""
    params = init_params(cfg, jax.random.key(0))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = make_optimizer(tc).init(params)
    C.save_checkpoint(out / "checkpoint", params=params, model_config=cfg, opt_state=opt_state,
                      step=step, key=jax.random.key(0), train_config=tc.to_dict(),
                      task=TASK.to_dict(), history={"step": list(range(step))})


# --------------------------------------------------------------------------- --out, before any work
def test_out_is_checked_before_any_work(tmp_path, capsys, no_training, monkeypatch):
    (tmp_path / "file").write_text("x")
    rc, _, err = run(["train", "--out", tmp_path / "file"], capsys)
    assert rc == 2
    one_line_error(err, r"^tinyinterp train: error: --out .*file is an existing file")
    rc, _, err = run(["train", "--out", tmp_path / "file" / "run"], capsys)
    assert rc == 2
    one_line_error(err, "file is a file, so the folder cannot be created")
    (tmp_path / "theirs" / "checkpoint").mkdir(parents=True)
    (tmp_path / "theirs" / "checkpoint" / "config.json").write_text('{"model_type": "gpt2"}')
    rc, _, err = run(["train", "--out", tmp_path / "theirs"], capsys)
    assert rc == 2
    one_line_error(err, "not a tinyinterp checkpoint")
    assert (tmp_path / "theirs" / "checkpoint" / "config.json").read_text() == '{"model_type": "gpt2"}'
    import tempfile

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)  # (tests run as root: injected)
    rc, _, err = run(["train", "--out", tmp_path / "new"], capsys)
    assert rc == 2
    one_line_error(err, r"cannot write in .* \(Permission denied\)")
    assert not (tmp_path / "new").exists()


def test_reproduce_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import tinyinterp.reproduce.sae as module

    monkeypatch.setattr(module, "main", lambda args: pytest.fail("the reproduction started"))
    (tmp_path / "file").write_text("x")
    rc, _, err = run(["reproduce", "sae", "--out", tmp_path / "file"], capsys)
    assert rc == 2
    one_line_error(err, "^tinyinterp reproduce: error: --out .* is an existing file")


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys, no_training):
    stored_run(tmp_path)
    rc, _, err = run(["train", "--out", tmp_path, *SMALL], capsys)
    assert rc == 2
    one_line_error(err, "already holds a run .* pass --resume to continue it, --overwrite")


@pytest.mark.parametrize("flags, match", [
    (["--lr", "-1"], r"TrainConfig.lr must be a finite number >= 0, got -1.0"),
    (["--steps", "-3"], r"TrainConfig.steps must be an int >= 0"),
    (["--d-model", "30"], r"--d-model 30 must be a positive multiple of --n-heads 4"),
    (["--task", "bogus"], r"unknown task 'bogus'"),
    (["--task-option", "length"], r"--task-option needs NAME=VALUE, got 'length'"),
    (["--task-option", "colour=3"], r"has no option\(s\) \['colour'\]"),
    (["--normalization-type", "LayerNorm"], r"normalization_type='LayerNorm' is not supported"),
    (["--act-fn", "gleu"], r"Did you mean 'gelu'"),
])
def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys, no_training, flags, match):
    rc, _, err = run(["train", "--out", tmp_path / "run", *flags], capsys)
    assert rc == 2
    one_line_error(err, match)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- --resume
@pytest.mark.parametrize("flags, match", [
    (["--n-layers", "3"], r"--n-layers 3 \(stored: 1\)"),
    (["--lr", "0.5", "--task", "sort"], r"--task 'sort' \(stored: 'copy'\); --lr 0.5 \(stored: 0.01\)"),
    (["--task-option", "length=9"], r"--task-option length=9 \(stored: 3\)"),
    (["--task-option", "colour=1"], r"--task-option colour=1 \(task 'copy' has no option 'colour'"),
    (["--attn-only"], r"--attn-only True \(stored: False\)"),
    (["--grad-clip", "0"], r"--grad-clip None \(stored: 1.0\)"),
    (["--seed", "1", "--batch-size", "8"], r"--batch-size 8 \(stored: 4\); --seed 1 \(stored: 0\)"),
    (["--normalization-type", "none"], r"--normalization-type None \(stored: 'LN'\)"),
])
def test_resume_refuses_contradicting_flags(tmp_path, capsys, no_training, flags, match):
    stored_run(tmp_path)
    rc, _, err = run(["train", "--out", tmp_path, "--resume", *flags], capsys)
    assert rc == 2
    one_line_error(err, r"--resume continues the run stored in .* these flags contradict them: "
                        + match + r".*Only --steps, --eval-every")
    assert "attention-backend" not in err.split("contradict them:")[1].split(". Drop")[0]


@pytest.mark.parametrize("flags, match", [
    (["--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
    (["--steps", "3"], "--steps 3 is before the checkpoint's step 4"),
])
def test_resume_other_mistakes(tmp_path, capsys, no_training, flags, match):
    stored_run(tmp_path)
    rc, _, err = run(["train", "--out", tmp_path, "--resume", *flags], capsys)
    assert rc == 2
    one_line_error(err, match)
    rc, _, err = run(["train", "--out", tmp_path / "none", "--resume"], capsys)
    assert rc == 2
    one_line_error(err, "there is no run to resume in .*none")


def test_resume_of_a_cosine_run_cannot_change_steps(tmp_path, capsys, no_training):
    stored_run(tmp_path, tc=TC.replace(schedule="cosine"))
    rc, _, err = run(["train", "--out", tmp_path, "--resume", "--steps", "20"], capsys)
    assert rc == 2
    one_line_error(err, "cosine learning-rate schedule was planned for 8 steps")


def test_resume_keeps_the_stored_settings_and_says_so(tmp_path, capsys, fake_train):
    stored_run(tmp_path)
    # repeating a stored setting is fine; without --steps the stored run's steps are the target
    rc, out, err = run(["train", "--out", tmp_path, "--resume", "--n-layers", "1", "--lr", "0.01",
                        "--task", "copy", "--eval-every", "2", "--attention-backend", "xla"],
                       capsys)
    assert rc == 0, err
    assert "resuming" in out and "at step 4 and training to step 8 (the stored run's steps" in out
    assert "attention backend 'xla'" in out
    (call,) = fake_train
    assert call["resume"] and call["cfg"] == CFG and call["task"] == TASK
    assert call["tc"] == TC.replace(eval_every=2, progress=None)
    rc, out, _ = run(["train", "--out", tmp_path, "--resume", "--steps", "12"], capsys)
    assert rc == 0 and fake_train[-1]["tc"].steps == 12 and "training to step 12" in out
    # the attention backend is a run option (never stored): each run picks it, default auto
    assert fake_train[-1]["cfg"] == CFG.replace(attention_backend="auto")
    # a run already at its last step: nothing to do, and it says how to go on
    stored_run(tmp_path / "done", step=8)
    rc, out, _ = run(["train", "--out", tmp_path / "done", "--resume"], capsys)
    assert rc == 0 and len(fake_train) == 2
    assert "already at step 8, the run's last step; nothing to do (pass --steps N" in out


# --------------------------------------------------------------------------- errors while running
@pytest.mark.parametrize("error, code, match", [
    (TrainingDiverged("training diverged at step 3: loss = nan", step=3, state={}, history={},
                      checkpoint=None), 1, "training diverged at step 3"),
    (FileExistsError("x already holds a checkpoint"), 2, "already holds a checkpoint"),
    (C.CheckpointError("ck/config.json: field 'step' is '5'"), 2, "field 'step'"),
    (ValueError("bad\nvalue"), 2, "error: bad value$"),
    (KeyError("missing"), 2, "error: missing$"),
    (OSError(28, "No space left on device"), 1, "No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_errors_while_running_are_one_line(tmp_path, capsys, monkeypatch, error, code, match):
    def boom(*a, **kw):
        raise error

    patch_train(monkeypatch, boom)
    rc, _, err = run(["train", "--out", tmp_path / "run", *SMALL], capsys)
    assert rc == code
    one_line_error(err, match)


def test_inspect_errors_are_one_line(tmp_path, capsys):
    rc, _, err = run(["inspect", tmp_path / "nothing"], capsys)
    assert rc == 2
    one_line_error(err, "no checkpoint at .*nothing")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")
    rc, _, err = run(["inspect", tmp_path / "theirs"], capsys)
    assert rc == 2
    one_line_error(err, "not a tinyinterp checkpoint")


# --------------------------------------------------------------------------- end to end
def test_train_then_resume_end_to_end(tmp_path, capsys):
    """A real run cut at step 4 and resumed to 6 equals a 6-step run, bit for bit."""
    rc, out, err = run(["train", "--out", tmp_path / "a", "--steps", "4", *SMALL], capsys)
    assert rc == 0, err
    assert "trained copy for 4 steps" in out
    rc, out, err = run(["train", "--out", tmp_path / "a", "--resume", "--steps", "6",
                        "--attention-backend", "xla"], capsys)  # (the same backend: same bits)
    assert rc == 0, err
    assert "resuming" in out and "trained copy for 6 steps" in out
    rc, _, err = run(["train", "--out", tmp_path / "b", "--steps", "6", *SMALL], capsys)
    assert rc == 0, err
    a, b = (C.load_checkpoint(tmp_path / d) for d in ("a", "b"))
    assert a.step == b.step == 6
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # --overwrite replaces the run
    rc, out, err = run(["train", "--out", tmp_path / "a", "--steps", "2", "--overwrite", *SMALL],
                       capsys)
    assert rc == 0, err
    assert C.read_config(tmp_path / "a")["step"] == 2
