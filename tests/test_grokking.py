"""Grokking modular addition: the task, the paper's model, the lean training step (the same
function as the model's forward), training, and the CI form of `tinyinterp reproduce grokking`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyinterp import fourier
from tinyinterp.checkpoint import load_model
from tinyinterp.model import HookedTransformer, forward
from tinyinterp.reproduce import grokking as g
from tinyinterp.tasks import modular_addition_split


def test_modular_addition_split():
    d = modular_addition_split(11, 0.3, seed=4)
    assert d.name == "modular-addition" and d.d_vocab == 12 and d.d_vocab_out == 11
    assert d.tokens.shape == (121, 3) and d.tokens.dtype == np.int32
    a, b, eq = d.tokens.T
    np.testing.assert_array_equal(a * 11 + b, np.arange(121))  # pair = a * p + b
    assert np.all(eq == 11) and d.token_labels[-1] == "=" and d.token_labels[3] == "3"
    np.testing.assert_array_equal(d.labels, (a + b) % 11)
    assert d.is_train.sum() == int(0.3 * 121) == len(d.train_idx)
    assert len(np.intersect1d(d.train_idx, d.test_idx)) == 0
    assert len(d.train_idx) + len(d.test_idx) == 121
    again = modular_addition_split(11, 0.3, seed=4)
    np.testing.assert_array_equal(again.is_train, d.is_train)
    assert not np.array_equal(modular_addition_split(11, 0.3, seed=5).is_train, d.is_train)
    assert d.describe(int(d.train_idx[0])).endswith("(mod 11), train")
    assert modular_addition_split(**d.to_dict()).to_dict() == d.to_dict()
    for bad, match in (({"p": 1}, "p must be"), ({"train_fraction": 1.0}, "train_fraction"),
                       ({"train_fraction": 0.001, "p": 5}, "non-empty"), ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=match):
            modular_addition_split(**{"p": 11, **bad})


def test_model_config_is_the_papers():
    cfg = g.model_config(23)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (1, 128, 4, 32, 512)
    assert cfg.normalization_type is None and cfg.act_fn == "relu" and not cfg.attn_only
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (24, 23, 3)
    params = g.init_paper_params(cfg, 0)
    assert "ln_final" not in params and "ln1" not in params["blocks"][0]
    assert params["embed"]["W_E"].shape == (24, 128) and params["unembed"]["W_U"].shape == (128, 23)
    np.testing.assert_allclose(float(jnp.std(params["blocks"][0]["mlp"]["W_in"])), 128 ** -0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(params["unembed"]["W_U"])), 24 ** -0.5, rtol=0.1)
    frozen = g.frozen_mask(params)
    assert frozen["unembed"]["b_U"] and frozen["blocks"][0]["attn"]["b_Q"]
    assert not frozen["blocks"][0]["mlp"]["b_in"] and not frozen["embed"]["W_E"]


def test_paper_config_is_the_published_setup():
    """--paper is Nanda et al.'s setup whatever the (fast) defaults are."""
    tc = g.GrokkingConfig.paper()
    assert (tc.p, tc.train_fraction, tc.lr, tc.weight_decay) == (113, 0.3, 1e-3, 1.0)
    assert (tc.beta1, tc.beta2, tc.warmup_steps) == (0.9, 0.98, 10)
    assert (tc.d_model, tc.n_heads, tc.d_mlp) == (128, 4, 512)


def _random_params(cfg, seed):
    """The paper's init with every bias made non-zero, so the lean path's biases are exercised."""
    params = g.init_paper_params(cfg, seed)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, jnp.float32)
             for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def _assert_trees_close(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_lean_and_grouped_steps_are_the_models_loss_and_gradient(backend):
    """Both training steps (lean; grouped: per-token tables, each lookup's gradient by gathers
    and sums) are the model's logits, loss and gradient: on the task's pairs (one "=" for every
    row: its tables broadcast) and, for the grouped step, on random tokens at every position."""
    p = 13
    cfg = g.model_config(p, d_model=32, n_heads=4, d_mlp=64).replace(attention_backend=backend)
    data = modular_addition_split(p, 0.4, seed=1)
    params = _random_params(cfg, 0)
    tokens = jnp.asarray(data.tokens)
    lean = jax.jit(g.last_position_logits, static_argnums=1)(params, cfg, tokens)
    ref = forward(params, cfg, tokens)[:, -1]  # the whole model, full sequence
    np.testing.assert_allclose(np.asarray(lean), np.asarray(ref), atol=2e-5, rtol=1e-5)
    # both orders of the MLP-to-logits product (W_L = W_out @ W_U, or W_out then W_U)
    for via_W_L in (True, False):
        other = g.last_position_logits(params, cfg, tokens, via_W_L=via_W_L)
        np.testing.assert_allclose(np.asarray(other), np.asarray(ref), atol=2e-5, rtol=1e-5)
    grouped = g.grouped_last_position_logits(params, cfg, g.position_groups(tokens))
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(ref), atol=2e-5, rtol=1e-5)
    tr = jnp.asarray(data.train_idx)
    labels = jnp.asarray(data.labels)[tr]

    def lean_loss(pr):
        return fourier.cross_entropy(g.last_position_logits(pr, cfg, tokens[tr]), labels)

    def grouped_loss(pr, groups):
        return fourier.cross_entropy(g.grouped_last_position_logits(pr, cfg, groups), labels)

    def model_loss(pr, toks):  # the whole model on the full sequence, its last position
        return fourier.cross_entropy(forward(pr, cfg, toks)[:, -1], labels)

    model_vg = jax.jit(jax.value_and_grad(model_loss))
    l1, g1 = jax.jit(jax.value_and_grad(lean_loss))(params)
    l2, g2 = model_vg(params, tokens[tr])
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    _assert_trees_close(g1, g2)
    if backend != "xla":
        return  # the grouped step does not use the attention backend: checked once
    rng = np.random.default_rng(3)
    # random tokens, repeats included, the same shape as the pairs (no new model program)
    random_tokens = jnp.asarray(rng.integers(0, p + 1, tokens[tr].shape).astype(np.int32))
    for toks, (lm, gm) in ((tokens[tr], (l2, g2)), (random_tokens, model_vg(params, random_tokens))):
        lg, gg = jax.jit(jax.value_and_grad(grouped_loss))(params, g.position_groups(toks))
        np.testing.assert_allclose(float(lg), float(lm), rtol=1e-5)
        _assert_trees_close(gg, gm)
    with pytest.raises(ValueError, match="integer"):
        g.position_groups(np.zeros((0, 3), np.int32))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(g.position_groups)(tokens)


def test_lean_step_rejects_models_it_does_not_compute():
    cfg = g.model_config(7, d_model=16, n_heads=2, d_mlp=32).replace(n_layers=2)
    with pytest.raises(ValueError, match="one-layer"):
        g.last_position_logits({}, cfg, jnp.zeros((1, 3), jnp.int32))  # checked before params


def test_training_is_deterministic_and_keeps_the_missing_biases_at_zero():
    tc = g.GrokkingConfig(p=11, d_model=32, n_heads=4, d_mlp=64, max_steps=40, eval_every=10,
                          snapshot_every=20, weight_decay=1.0, lr=3e-3)
    r1, r2 = g.train(tc), g.train(tc)
    for a, b in zip(jax.tree_util.tree_leaves(r1.params), jax.tree_util.tree_leaves(r2.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(r1.train_loss_every_step, r2.train_loss_every_step)
    attn = r1.params["blocks"][0]["attn"]
    for name in ("b_Q", "b_K", "b_V", "b_O"):
        assert not np.any(np.asarray(attn[name])), name
    assert not np.any(np.asarray(r1.params["unembed"]["b_U"]))
    assert np.any(np.asarray(r1.params["blocks"][0]["mlp"]["b_in"]))  # trained
    assert r1.total_steps == 40 and len(r1.train_loss_every_step) == 40
    assert list(r1.steps) == [0, 10, 20, 30, 40] and list(r1.snapshot_steps) == [0, 20, 40]
    assert r1.train_loss_every_step[-1] < r1.train_loss_every_step[0]
    # the eval row at step 0 is the loss of the initial params, as the first step's loss
    np.testing.assert_allclose(r1.train_loss[0], r1.train_loss_every_step[0], rtol=1e-5)
    # the model path trains the same function (same losses to float32 rounding)
    r3 = g.train(tc.replace(step_path="model"))
    np.testing.assert_allclose(r3.train_loss_every_step[:10], r1.train_loss_every_step[:10],
                               rtol=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        g.GrokkingConfig(eval_every=30, snapshot_every=100)


def test_label_is_top_is_argmax_accuracy_with_ties_counted():
    """The training step's accuracy: argmax == label on untied rows (random logits, large and
    negative ones included); a label tied for the largest logit counts as correct."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32) * np.float32(50.0)
    labels = rng.integers(0, 7, 200).astype(np.int32)
    got = np.asarray(g.label_is_top(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_array_equal(got, (logits.argmax(-1) == labels).astype(np.float32))
    tied = np.asarray(g.label_is_top(jnp.asarray([[1.0, 3.0, 3.0], [3.0, 3.0, 1.0]]),
                                     jnp.asarray([2, 0])))
    np.testing.assert_array_equal(tied, [1.0, 1.0])  # argmax would say [0, 1]


def test_phases_on_synthetic_curves():
    """The phase marks read the curves they are given (no training): memorisation ends at the
    test-loss peak, cleanup starts at half the peak, ends at 99% test accuracy."""
    steps = np.arange(0, 3001, 10)
    test_loss = np.where(steps < 500, 4.0 + steps / 250, 6.0 * np.exp(-np.maximum(steps - 1500, 0) / 200))
    train_acc = np.minimum(1.0, steps / 100)
    test_acc = np.where(steps < 2000, 0.05, 1.0)
    r = g.TrainResult(config=g.GrokkingConfig(), model_cfg=g.model_config(5), data=None, params={},
                      steps=steps, train_loss_every_step=np.zeros(3000), train_loss=np.zeros(len(steps)),
                      train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
                      snapshot_steps=steps[::10], snapshots={}, grok_step=2000, total_steps=3000,
                      wall_s=0.0, compile_s=0.0)
    ph = g.phases(r)
    assert ph["train_99_step"] == 100 and ph["memorisation_end"] == 500  # first step at the peak
    assert ph["peak_test_loss"] == 6.0
    assert ph["cleanup_start"] == 1640  # 6 exp(-(s - 1500) / 200) <= 3 from s = 1638.6
    assert ph["grok_step"] == 2000 and ph["end"] == 3000


def test_quick_is_the_default_setup_capped_and_refuses_paper(tmp_path):
    assert g.GrokkingConfig().replace(**g.QUICK) == g.GrokkingConfig(max_steps=g.QUICK["max_steps"])
    with pytest.raises(ValueError, match="does not combine with paper"):
        g.run(tmp_path, paper=True, quick=True, verbose=False)
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.slow
def test_reproduce_grokking_quick_finds_every_progress_measure(tmp_path):
    report = g.run(tmp_path, quick=True, verbose=False)  # strict: raises if a finding fails
    assert all(c["holds"] for c in report["checks"].values())
    f = report["findings"]
    assert 3 <= len(f["key_frequencies"]) <= 7
    assert f["neurons"]["fraction_explained_by_one_frequency"] > 0.5
    assert f["W_E"]["gini"] > f["progress"]["gini_W_E"][0]  # sparser in Fourier than at init
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["checks"].keys() == report["checks"].keys()
    assert (tmp_path / "report.md").read_text().startswith("# Grokking")
    for name in report["figures"]:
        assert (tmp_path / name).stat().st_size > 5000, name
    model = load_model(tmp_path / "model")
    assert isinstance(model, HookedTransformer) and model.cfg.d_vocab_out == report["data"]["p"]
    data = modular_addition_split(report["data"]["p"], report["data"]["train_fraction"],
                                  report["data"]["seed"])
    logits = np.asarray(model(jnp.asarray(data.tokens))[:, -1])
    test = data.test_idx
    assert (logits[test].argmax(-1) == data.labels[test]).mean() > 0.99  # the saved model groks
