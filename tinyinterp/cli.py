"""The ``tinyinterp`` command.

    tinyinterp reproduce induction-heads [--out DIR] [--seed N]   the main job
    tinyinterp reproduce superposition [--out DIR]
    tinyinterp reproduce sae [--out DIR]
    tinyinterp reproduce grokking [--out DIR] [--seed S] [--paper]
    tinyinterp reproduce attribution-graphs [--out DIR] [--seed S] [--quick]
    tinyinterp train --task repeated_tokens --out DIR [--resume | --overwrite]
    tinyinterp inspect PATH
    tinyinterp view PATH [--out FILE]                             an HTML view, its path printed
    tinyinterp evaluate-methods [--out DIR]                       every method on planted circuits
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPRODUCTIONS = {
    "induction-heads": ("tinyinterp.reproduce.induction",
                        "train a 2-layer attention-only model on repeated random tokens, find the "
                        "phase change, the previous-token and induction heads and their "
                        "K-composition (Olsson et al. 2022)"),
    "superposition": ("tinyinterp.reproduce.superposition",
                      "toy models of superposition: dropped/orthogonal/antipodal/pentagon "
                      "geometry, represented features vs sparsity, phase diagram, feature "
                      "dimensionality (Elhage et al. 2022)"),
    "sae": ("tinyinterp.reproduce.sae",
            "sparse autoencoders on data with known features: MMCS/L0/dead sweep over lambda and "
            "dictionary size, and an SAE recovering a superposition model's features"),
    "grokking": ("tinyinterp.reproduce.grokking",
                 "grok (a + b) mod p with a 1-layer transformer: memorisation, circuit formation "
                 "and cleanup, the Fourier circuit and the progress measures (Nanda et al. 2023)"),
    "attribution-graphs": ("tinyinterp.reproduce.attribution_graphs",
                           "attribution graphs of a two-hop lookup through cross-layer "
                           "transcoders: does a feature on the path encode the intermediate, and "
                           "does swapping it change the answer (Ameisen et al. 2025)"),
}


# Flags of `tinyinterp train` that describe the run (model, task, optimizer), with their defaults.
# They are None in the parsed args unless given, so that --resume can tell what the user asked for.
_MODEL_DEFAULTS = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": -1, "n_ctx": None,
                   "act_fn": "gelu", "normalization_type": "LN", "attn_only": False,
                   "attention_backend": "auto"}
_OPT_DEFAULTS = {"steps": 1000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 0,
                 "schedule": "constant", "weight_decay": 0.01, "grad_clip": 1.0, "seed": 0,
                 "eval_every": 0, "checkpoint_every": 0}
# What may change when a run is resumed (host-side loop settings: they do not change the bits).
_RESUME_FREE = ("steps", "eval_every", "checkpoint_every")
# How a run computes, not what the model is: never stored in a checkpoint, chosen anew by each run
# (a run resumes bit for bit on the backend it was trained with; another one agrees to rounding).
_RUN_OPTIONS = ("attention_backend",)


def _add_train(sub) -> None:
    from tinyinterp.tasks import TASKS

    p = sub.add_parser(
        "train", help="train a transformer on a synthetic task",
        description="Train a transformer on a synthetic task with AdamW; writes a resumable "
                    "checkpoint (with the loss history) to OUT/checkpoint. --out and every flag "
                    "are checked before any work. With --resume the run continues with the "
                    "settings stored in its checkpoint: model, task and optimizer flags may only "
                    "repeat them (a contradiction is an error); --steps (default: the stored "
                    "run's steps), --eval-every, --checkpoint-every, --no-progress and "
                    "--attention-backend (a run option, never stored) may change.")
    p.add_argument("--task", default=None,
                   help=f"one of {sorted(TASKS)} (default: repeated_tokens)")
    p.add_argument("--task-option", action="append", default=[], metavar="NAME=VALUE",
                   help="task option, e.g. --task-option length=16 (repeatable)")
    p.add_argument("--out", required=True, help="output folder; the checkpoint goes to OUT/checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue the run stored in --out (bitwise as if never interrupted)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    m = p.add_argument_group("model")
    m.add_argument("--n-layers", type=int, help="default: 2")
    m.add_argument("--d-model", type=int, help="default: 64")
    m.add_argument("--n-heads", type=int, help="default: 4 (d_head = d_model / n_heads)")
    m.add_argument("--d-mlp", type=int, help="default: -1, meaning 4 * d_model")
    m.add_argument("--n-ctx", type=int, help="default: the task's sequence length")
    m.add_argument("--act-fn", help="default: gelu")
    m.add_argument("--normalization-type", help="LN (default), LNPre, RMS, RMSPre or none")
    m.add_argument("--attn-only", action="store_true", default=None)
    m.add_argument("--attention-backend", choices=("auto", "numba", "xla"),
                   help="default: auto; how this run computes, not stored in the checkpoint (a "
                        "run resumes bit for bit on the backend it was trained with)")
    o = p.add_argument_group("optimizer")
    o.add_argument("--steps", type=int,
                   help="total steps (default: 1000; with --resume: the stored run's steps)")
    o.add_argument("--batch-size", type=int, help="default: 64")
    o.add_argument("--lr", type=float, help="default: 0.001")
    o.add_argument("--warmup-steps", type=int, help="default: 0")
    o.add_argument("--schedule", choices=("constant", "cosine", "linear"),
                   help="default: constant")
    o.add_argument("--weight-decay", type=float, help="default: 0.01")
    o.add_argument("--grad-clip", type=float, help="default: 1.0; 0 disables clipping")
    o.add_argument("--seed", type=int, help="default: 0")
    o.add_argument("--eval-every", type=int, help="default: 0 (only at the end)")
    o.add_argument("--checkpoint-every", type=int, help="default: 0 (only at the end)")
    o.add_argument("--no-progress", action="store_true")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _task_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--task-option needs NAME=VALUE, got {item!r}")
        options[name.replace("-", "_")] = _parse_value(value)
    return options


def _given(args, name: str, defaults: dict):
    value = getattr(args, name)
    return defaults[name] if value is None else value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_out_dir(out: str | Path, what: str = "--out") -> Path:
    """Raise ValueError unless ``out`` can be the output folder of a run: not an existing file,
    inside a directory this process may write (checked by creating and dropping an unnamed
    temporary file there). Creates nothing; called before any work, so a run never trains and
    then dies for want of a place to put its result."""
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is an existing file; it must be a folder (new or existing)")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {out}: {ancestor} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"{what} {out}: cannot write in {ancestor} ({e.strerror or e})") from e
    return out


def _resume_settings(args):
    """The stored run's (cfg, task, train config), after checking that every flag the user gave
    agrees with it; the changes allowed on resume applied."""
    from tinyinterp import checkpoint
    from tinyinterp.tasks import get_task
    from tinyinterp.train import CHECKPOINT_DIR, resume_task

    if args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "choose one")
    if checkpoint.find_checkpoint(Path(args.out) / CHECKPOINT_DIR, run_dir=False) is None:
        raise ValueError(f"--resume: there is no run to resume in {args.out} (no checkpoint at "
                         f"{Path(args.out) / CHECKPOINT_DIR}); drop --resume to start one")
    cfg, task, tc = resume_task(args.out)
    stored_step = checkpoint.read_config(Path(args.out) / CHECKPOINT_DIR)["step"]
    conflicts = []

    def compare(flag: str, given, stored) -> None:
        if given != stored:
            conflicts.append(f"{flag} {given!r} (stored: {stored!r})")

    for name in _MODEL_DEFAULTS:
        given = getattr(args, name)
        if given is None or name in _RUN_OPTIONS:
            continue
        if name == "normalization_type":
            stored = cfg.normalization_type
            given = None if given.lower() == "none" else given
        elif name == "d_mlp":
            stored = cfg.d_mlp
            given = 4 * cfg.d_model if given == -1 else given
        else:
            stored = getattr(cfg, name)
        compare(_flag(name), given, stored)
    if args.task is not None:
        compare("--task", get_task(args.task).name, task.name)
    stored_opts = task.opts
    for name, value in _task_options(args.task_option).items():
        if name not in stored_opts:
            conflicts.append(f"--task-option {name}={value!r} (task {task.name!r} has no option "
                             f"{name!r}; its options: {sorted(stored_opts)})")
        elif value != stored_opts[name]:
            conflicts.append(f"--task-option {name}={value!r} (stored: {stored_opts[name]!r})")
    for name in _OPT_DEFAULTS:
        given = getattr(args, name)
        if given is None or name in _RESUME_FREE:
            continue
        stored = getattr(tc, name)
        if name == "grad_clip":
            given, stored = (given or None), (stored or None)
        compare(_flag(name), given, stored)
    if conflicts:
        raise ValueError(
            f"--resume continues the run stored in {args.out} with its stored settings, and "
            f"these flags contradict them: {'; '.join(conflicts)}. Drop them (the stored "
            "settings are used), or start a new run with another --out. Only --steps, "
            "--eval-every, --checkpoint-every, --no-progress and --attention-backend may change "
            "on resume.")
    changes = {name: getattr(args, name) for name in _RESUME_FREE if getattr(args, name) is not None}
    if "steps" in changes:
        if changes["steps"] < stored_step:
            raise ValueError(f"--steps {changes['steps']} is before the checkpoint's step "
                             f"{stored_step}; a run cannot be resumed backwards")
        if tc.schedule != "constant" and changes["steps"] != tc.steps:
            raise ValueError(f"--steps {changes['steps']}: the run's {tc.schedule} learning-rate "
                             f"schedule was planned for {tc.steps} steps, and changing it would "
                             "change the trajectory already trained; resume without --steps, or "
                             "start a new run")
    tc = tc.replace(progress=False if args.no_progress else None, **changes)
    cfg = cfg.replace(attention_backend=_given(args, "attention_backend", _MODEL_DEFAULTS))
    return cfg, task, tc, stored_step


def _new_settings(args):
    from tinyinterp import checkpoint
    from tinyinterp.config import TransformerConfig
    from tinyinterp.tasks import get_task
    from tinyinterp.train import CHECKPOINT_DIR, TrainConfig

    ckpt = Path(args.out) / CHECKPOINT_DIR
    checkpoint.check_save_path(ckpt)
    found = checkpoint.find_checkpoint(ckpt, run_dir=False)
    if found is not None and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds a run (checkpoint {found}); pass "
                              "--resume to continue it, --overwrite to replace it, or choose "
                              "another --out")
    task = get_task(args.task or "repeated_tokens", **_task_options(args.task_option))
    m = {name: _given(args, name, _MODEL_DEFAULTS) for name in _MODEL_DEFAULTS}
    if m["n_heads"] <= 0 or m["d_model"] <= 0 or m["d_model"] % m["n_heads"]:
        raise ValueError(f"--d-model {m['d_model']} must be a positive multiple of --n-heads "
                         f"{m['n_heads']} (each head gets d_model / n_heads dimensions)")
    norm = None if m["normalization_type"].lower() == "none" else m["normalization_type"]
    cfg = TransformerConfig(
        n_layers=m["n_layers"], d_model=m["d_model"], n_heads=m["n_heads"],
        d_head=m["d_model"] // m["n_heads"], d_mlp=m["d_mlp"], d_vocab=task.d_vocab,
        n_ctx=m["n_ctx"] or task.seq_len, act_fn=m["act_fn"], normalization_type=norm,
        attn_only=m["attn_only"], attention_backend=m["attention_backend"],
        model_name=task.name)
    o = {name: _given(args, name, _OPT_DEFAULTS) for name in _OPT_DEFAULTS}
    tc = TrainConfig(**{**o, "grad_clip": o["grad_clip"] or None},
                     progress=False if args.no_progress else None)
    return cfg, task, tc


def _run_train(args) -> int:
    from tinyinterp.train import train

    check_out_dir(args.out)
    if args.resume:
        cfg, task, tc, stored_step = _resume_settings(args)
        if stored_step >= tc.steps:
            print(f"{args.out} is already at step {stored_step}, the run's last step; nothing to "
                  f"do (pass --steps N with N > {stored_step} to train further)")
            return 0
        print(f"resuming {args.out} at step {stored_step} and training to step {tc.steps}"
              + ("" if args.steps is not None else " (the stored run's steps; --steps N trains "
                 "further)") + f", attention backend {cfg.attention_backend!r}", flush=True)
    else:
        cfg, task, tc = _new_settings(args)
    result = train(cfg, task, tc, out_dir=args.out, resume=args.resume, overwrite=args.overwrite)
    last = {k: float(v[-1]) for k, v in result.history.items()
            if isinstance(v, list) and v and k != "step"}
    print(f"trained {task.name} for {result.step} steps: "
          + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    ev = result.history.get("eval") or {}
    if ev.get("accuracy"):
        print(f"eval accuracy {ev['accuracy'][-1]:.3f}, eval loss {ev['loss'][-1]:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _run_inspect(args) -> int:
    import numpy as np

    from tinyinterp import checkpoint

    path = Path(args.path)
    model = checkpoint.load_model(path)
    cfg = model.cfg
    info = checkpoint.read_config(path)
    print(f"{path}: {model!r}")
    for key in ("kind", "format_version", "step"):
        if key in info:
            print(f"  {key}: {info[key]}")
    print("  config: " + json.dumps(cfg.to_dict()))
    if args.scores and cfg.d_vocab >= 4:
        from tinyinterp import detectors
        from tinyinterp.tasks import get_task

        length = max(2, min(cfg.n_ctx // 2, 32))
        task = get_task("repeated_tokens", d_vocab=cfg.d_vocab, length=length, n_repeats=2)
        import jax

        tokens = task.sample(jax.random.key(0), 32)["tokens"]
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        pats = [cache["pattern", layer] for layer in range(cfg.n_layers)]
        rows = {"previous-token": detectors.previous_token_scores(pats, tokens),
                "induction": detectors.induction_scores(pats, tokens),
                "duplicate-token": detectors.duplicate_token_scores(pats, tokens)}
        if cfg.d_vocab == cfg.d_vocab_out:
            rows["copying"] = detectors.copying_scores(model)
        print(f"  head scores on repeated random tokens ({length} tokens x 2, 32 sequences):")
        header = "    layer.head " + " ".join(f"{n:>15}" for n in rows)
        print(header)
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_heads):
                vals = " ".join(f"{float(np.asarray(v)[layer, head]):15.3f}" for v in rows.values())
                print(f"    L{layer}H{head:<7} {vals}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyinterp",
        description="A small hookable JAX transformer for interpretability research on a CPU: "
                    "reproduce toy-model results, train on synthetic tasks, inspect checkpoints.")
    parser.add_argument("--version", action="version",
                        version=f"tinyinterp {importlib.import_module('tinyinterp').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = sub.add_parser("reproduce", help="reproduce a classic toy-model result end to end",
                         description="Reproduce a published toy-model result: trains, analyses, "
                                     "and writes report.md, report.json and figures to --out.")
    rep_sub = rep.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, (module, help_text) in REPRODUCTIONS.items():
        p = rep_sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # pragma: no cover - only while a module is missing
            p.set_defaults(_missing=str(e))
        p.set_defaults(_module=module)
    _add_train(sub)
    ins = sub.add_parser("inspect", help="print a checkpoint's config, size and head scores",
                         description="Print a saved model's (or training run's) config, parameter "
                                     "count and per-head previous-token / induction / "
                                     "duplicate-token / copying scores.")
    ins.add_argument("path", help="a model folder (model.save) or a training run's --out folder")
    ins.add_argument("--no-scores", dest="scores", action="store_false",
                     help="skip the head scores")
    from tinyinterp.views import cli as view_cli

    view_cli.add_arguments(sub.add_parser("view", help=view_cli.HELP,
                                          description=view_cli.DESCRIPTION))
    ev = sub.add_parser("evaluate-methods", help="check every attribution method on models with "
                        "known ground truth (planted circuits, tracr programs)",
                        description="Every attribution and intervention method, and two broken "
                                    "ones, on planted circuits and compiled programs: a table of "
                                    "method x property, a figure and report.md in --out.")
    try:
        importlib.import_module("tinyinterp.evaluate").add_arguments(ev)
    except ModuleNotFoundError as e:  # hypothesis (the [test] extra) is missing
        ev.set_defaults(_missing=str(e))
    return parser


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake (bad flag value, --out in the way, a checkpoint that is
    not one, a run that diverged) is one line on stderr and exit code 2 (1 for a run that failed:
    divergence, an OS error), never a traceback."""
    from tinyinterp.checkpoint import CheckpointError
    from tinyinterp.compile_cache import enable_compile_cache
    from tinyinterp.memory import tune_malloc
    from tinyinterp.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    tune_malloc()  # keep freed buffers for reuse (TINYINTERP_MALLOC=default opts out)
    enable_compile_cache()  # keep compiled programs between runs (TINYINTERP_COMPILE_CACHE=0 opts out)
    name = f"tinyinterp {args.command}"
    try:
        if args.command == "reproduce":
            if getattr(args, "_missing", None):
                print(f"tinyinterp: {args.experiment} is not available: {args._missing}",
                      file=sys.stderr)
                return 2
            if getattr(args, "out", None) is not None:
                check_out_dir(args.out)
            return int(importlib.import_module(args._module).main(args) or 0)
        if args.command == "train":
            return _run_train(args)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "view":
            from tinyinterp.views.cli import run as run_view

            return run_view(args)
        if args.command == "evaluate-methods":
            if getattr(args, "_missing", None):
                print(f"{name}: not available: {args._missing} (pip install 'tinyinterp[test]')",
                      file=sys.stderr)
                return 2
            return importlib.import_module("tinyinterp.evaluate").run(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted (checkpoints already written are complete)", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, TypeError,
            KeyError) as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
