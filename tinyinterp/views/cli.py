"""``tinyinterp view PATH``: write an HTML view of a checkpoint's attention on a task batch, or of
a run directory's report, and print the file's path. (cli.py registers it; the work is here.)"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write an HTML view of a checkpoint's attention, or of a run's report"
DESCRIPTION = (
    "Write a self-contained HTML view and print its path. PATH is a run directory with "
    "report.md (`tinyinterp reproduce ...`): the report as one page with its figures inlined "
    "(default OUT: PATH/report.html). Otherwise PATH is a checkpoint (a model folder, a "
    "training checkpoint or a training run's --out): every layer's and head's attention on a "
    "batch of the run's own task (its stored task; repeated random tokens for a bare model), "
    "with the tokens' names (default OUT: PATH/attention.html for a training run's folder, "
    "else beside the checkpoint as NAME.attention.html).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run directory with report.md, or a checkpoint")
    p.add_argument("--out", help="the HTML file to write (its folder must exist)")
    p.add_argument("--attention", action="store_true",
                   help="view the attention even where PATH also has a report.md (a run "
                        "directory with its model in PATH/model)")
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the batch's seed (default 0)")


def _model_path(path: Path) -> Path:
    from tinyinterp import checkpoint

    if checkpoint.find_checkpoint(path) is None and (path / "model").is_dir():
        return path / "model"  # a reproduction's run directory keeps its model there
    return path


def _task_for(path: Path, cfg):
    """The run's stored task if the checkpoint has one (and it fits the model), else repeated
    random tokens over the model's vocabulary, filling its context (at most 64 tokens)."""
    from tinyinterp import checkpoint
    from tinyinterp.tasks import get_task, task_from_dict

    info = checkpoint.read_config(path)
    stored = info.get("task")
    if stored:
        try:
            task = task_from_dict(stored)
        except (TypeError, ValueError):
            task = None
        if task is not None and task.d_vocab <= cfg.d_vocab and task.seq_len <= cfg.n_ctx:
            return task
    length = max(1, min(cfg.n_ctx, 64) // 2)
    return get_task("repeated_tokens", d_vocab=cfg.d_vocab, length=length, n_repeats=2)


def _default_out(path: Path, model_path: Path | None, what: str) -> Path:
    """Inside a run directory (a report's, or a training run's --out); beside a bare checkpoint
    (never inside it: a checkpoint folder holds only the checkpoint)."""
    from tinyinterp import checkpoint

    if (what == "report" or model_path != path
            or (path / checkpoint.RUN_CHECKPOINT_DIR).is_dir()):
        return path / f"{what}.html"
    return path.parent / f"{path.name}.{what}.html"


def run(args) -> int:
    import jax
    import numpy as np

    from tinyinterp import checkpoint
    from tinyinterp.views import ReportView, attention_view

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    if (path / "report.md").is_file() and not args.attention:
        view = ReportView.from_dir(path)
        out = out or _default_out(path, None, "report")
    else:
        model_path = _model_path(path)
        model = checkpoint.load_model(model_path)
        task = _task_for(model_path, model.cfg)
        tokens = task.sample(jax.random.key(args.seed), args.batch)["tokens"]
        head = (0, 0)
        if task.name == "repeated_tokens" and model.cfg.n_layers > 1:
            from tinyinterp import detectors

            scores = np.nan_to_num(np.asarray(detectors.prefix_matching_scores(model, tokens)))
            head = np.unravel_index(int(np.argmax(scores)), scores.shape)
        name = model.cfg.model_name or model_path.name
        view = attention_view(model, tokens, token_labels=task,
                              title=f"Attention of {name} on {task.name} (seed {args.seed})",
                              layer=int(head[0]), head=int(head[1]))
        out = out or _default_out(path, model_path, "attention")
    view.save(out)
    print(out)
    return 0
