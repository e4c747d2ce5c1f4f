"""The CI form of ``tinyinterp reproduce induction-heads``: a reduced but real run that must find the
induction circuit (every check of the report), write its files and a loadable checkpoint."""

import json

import jax
import numpy as np
import pytest


@pytest.mark.slow
def test_reproduce_induction_heads_quick_finds_the_circuit(tmp_path):
    from tinyinterp.checkpoint import load_model
    from tinyinterp.reproduce import induction as rep

    report = rep.run(tmp_path, quick=True, progress=False, verbose=False)
    failed = {n: c for n, c in report["checks"].items() if not c["holds"]}
    assert not failed, failed
    p, i, k = report["previous_token_head"], report["induction_head"], report["k_composition"]
    assert p["layer"] == 0 and p["score"] > 0.5
    assert i["layer"] == 1 and i["score"] > 0.5 and i["copying"] > 0
    assert k["pair"] > k["baseline_p99"] > k["baseline_mean"] > 0
    assert report["eval_loss"]["repeated_half"] < 0.05
    assert report["eval_loss"]["first_half"] > 3.5  # the first half stays unpredictable
    assert report["train_distribution_loss"]["repeats"] < 0.05
    assert report["phase_change"]["found"]
    assert 0 < report["phase_change"]["step"] < report["train"]["steps"]

    on_disk = json.loads((tmp_path / "report.json").read_text())  # valid JSON (no NaN)
    assert on_disk["checks"].keys() == report["checks"].keys()
    assert (tmp_path / "report.md").read_text().startswith("# Induction heads")
    for name in report["figures"].values():
        assert (tmp_path / name).stat().st_size > 5000, name

    model = load_model(tmp_path / report["checkpoint"])
    assert model.cfg.n_layers == 2 and model.cfg.attn_only
    toks = rep.distinct_repeated_tokens(jax.random.key(1), 8, model.cfg.d_vocab,
                                        rep.SEQ_LEN, rep.N_REPEATS)
    per_token = np.asarray(model(toks, return_type="loss", loss_per_token=True))
    assert per_token[:, rep.SEQ_LEN:].mean() < 0.05  # the loaded model still does induction
