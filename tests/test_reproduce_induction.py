"""The CI form of ``tinyinterp reproduce induction-heads``: a reduced but real run that must find the
induction circuit (every check of the report), write its files and a loadable checkpoint."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One reduced run of the command, shared by the tests that read its report."""
    from tinyinterp.reproduce import induction as rep

    out = tmp_path_factory.mktemp("induction")
    return out, rep.run(out, quick=True, progress=False, verbose=False)


@pytest.mark.slow
def test_reproduce_induction_heads_quick_finds_the_circuit(quick_run):
    from tinyinterp.checkpoint import load_model
    from tinyinterp.reproduce import induction as rep

    tmp_path, report = quick_run
    failed = {n: c for n, c in report["checks"].items() if not c["holds"]}
    assert not failed, failed
    assert "every layout within the induction predictor's loss" in report["checks"]
    # the layouts' targets: test_every_layout_meets_its_target
    lay = report["layouts"]
    assert lay["n_layouts"] == 192
    on_disk_layouts = json.loads((tmp_path / "report.json").read_text())["layouts"]
    assert on_disk_layouts["n_layouts"] == 192
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


def _predictor_by_loops(tokens):
    """The best induction predictor, written independently: for each prediction i, the followers
    of every earlier occurrence of tokens[i], one vote each; the loss of the true next token."""
    out = np.full((tokens.shape[0], tokens.shape[1] - 1), np.nan)
    for b, row in enumerate(tokens.tolist()):
        for i in range(len(row) - 1):
            followers = [row[j + 1] for j in range(i) if row[j] == row[i]]
            if followers:
                out[b, i] = -np.log(followers.count(row[i + 1]) / len(followers))
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 6), n=st.integers(2, 14))
def test_induction_predictor_matches_an_independent_loop(seed, vocab, n):
    from tinyinterp.reproduce import induction as rep

    tokens = np.random.default_rng(seed).integers(0, vocab, (3, n))
    np.testing.assert_allclose(rep.induction_predictor_loss(tokens), _predictor_by_loops(tokens),
                               rtol=1e-12, equal_nan=True)


def test_induction_predictor_on_the_standard_layout():
    """On 32 tokens drawn with replacement from 64 ids and repeated (the TransformerLens/ARENA
    layout) the predictor's repeated-part loss is the issue's 0.38-0.40 nats (duplicates make
    some predictions ambiguous); on distinct tokens it is exactly 0."""
    from tinyinterp.reproduce import induction as rep

    rng = np.random.default_rng(0)
    for bos in (False, True):
        t = rep.layout_tokens(rng, 256, 64, 65, 32, bos=bos, replacement=True)
        o = int(bos)
        assert t.shape == (256, 65) and t.dtype == np.int32
        if bos:
            assert (t[:, 0] == 0).all()
        np.testing.assert_array_equal(t[:, o:o + 32], t[:, o + 32:o + 64])
        loss = rep.induction_predictor_loss(t[:, :o + 64])[:, o + 32:]
        assert 0.33 < loss.mean() < 0.43, loss.mean()
        assert np.isfinite(loss).all()
        d = rep.layout_tokens(rng, 64, 64, 65, 32, bos=bos, replacement=False)
        assert all(len(set(r[o:o + 32].tolist())) == 32 for r in d)
        assert (rep.induction_predictor_loss(d)[:, o + 32:] == 0).all()


def test_layout_check_targets():
    from tinyinterp.reproduce import induction as rep

    base = {"period": 8, "repeats": 2, "bos": False, "replacement": True, "n_predictions": 7,
            "frac_above_1_nat": 0.0}
    ok = {**base, "model_loss": 0.5, "predictor_loss": 0.4, "gap": 0.1}
    far = {**base, "model_loss": 0.6, "predictor_loss": 0.4, "gap": 0.2}
    exact_ok = {**base, "replacement": False, "model_loss": 0.04, "predictor_loss": 0.0, "gap": 0.04}
    exact_bad = {**exact_ok, "model_loss": 0.06, "gap": 0.06}
    c = rep.layout_check([ok, exact_ok])
    assert c["n_failing"] == 0 and c["worst_gap"] is ok and c["worst_exact"] is exact_ok
    assert rep.layout_check([ok, far, exact_bad])["failing"] == [far, exact_bad]


@pytest.mark.slow
def test_every_layout_meets_its_target(quick_run):
    """Every one of the 192 held-out layouts (with and without replacement and BOS, periods 8-32,
    2-4 repeats) within 0.15 nats of the best induction predictor, below 0.05 where its loss is
    0 (measured, issue 19 session 10: none failing on seeds 0-7; 14 on seed 0 before the loss
    weights)."""
    _, report = quick_run
    assert report["layouts"]["n_failing"] == 0, report["layouts"]["failing"]


@pytest.mark.slow
def test_seeds_train_as_one_program_and_report_each(tmp_path):
    """--seeds: two seeds in one vmapped program; each forms the circuit, with its own
    phase-change step, and the report says so."""
    from tinyinterp.reproduce import induction as rep

    # 600 steps: the phase change comes at ~190 (measured at 1500 steps: seeds 0 and 1 at 189 and
    # 195, both forming the circuit); the layouts' targets need the full 1500 (not asserted here)
    report = rep.run_seeds(tmp_path, 2, seed=0, steps=600, verbose=False)
    assert [r["seed"] for r in report["per_seed"]] == [0, 1]
    assert report["fraction_circuit_formed"] == 1.0, report["per_seed"]
    assert report["phase_change_step"]["n_found"] == 2
    assert "formed the induction circuit" in report["summary"]
    assert json.loads((tmp_path / "seeds_report.json").read_text())["seeds"] == [0, 1]
