"""The HTML views open in a real browser, offline, and show what they claim.

Each view is saved to disk and opened in headless Chromium (Debian's ``chromium``) with the network
off: the browser starts with every host unresolvable and every proxy refused, and the page runs
under the DevTools protocol's offline emulation, with every request it makes recorded. The tests
assert no console errors or exceptions, no request but the file itself (and the data: URIs it
carries), the number of heads / tokens / cells rendered, and that hovering a cell (real mouse
events) shows its value. A screenshot of each view goes to the test's tmp dir.

Why the DevTools protocol over Chromium's debugging pipe (``--remote-debugging-pipe``,
``tinyinterp.views._chromium``) rather than selenium + chromium-driver or a websocket client: it
needs no Python dependency and no driver binary whose version must match the browser's, opens no
port (nothing to reach from the network, nothing to collide with another job's), and gives the
console, exception and network events directly. One browser serves the whole module.

Without Chromium the browser tests skip with the reason, except under CI (CI=true), where
.ci/run installs it and its absence is a failure.
"""

import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

import tinyinterp
from tinyinterp import attribution as A
from tinyinterp import checkpoint, patching, sae
from tinyinterp.tasks import get_task, label_tokens
from tinyinterp.views import (
    AttentionView,
    FeatureView,
    PatchingView,
    ReportView,
    TokenAttributionView,
    attention_view,
    feature_view,
)
from tinyinterp.views._chromium import Browser, find_chromium

MAX_BYTES = 2 * 1024 * 1024
# the reference model (README's quickstart and the induction job's shape), XLA attention
CFG = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64,
                                   n_ctx=64, attn_only=True, normalization_type="LN",
                                   attention_backend="xla", model_name="reference")
TASK = get_task("repeated_tokens", d_vocab=64, length=32, n_repeats=2)  # 64 tokens


@pytest.fixture(scope="module")
def model():
    return tinyinterp.HookedTransformer.from_config(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return TASK.sample(jax.random.key(0), 8)["tokens"]  # [8, 64]


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        reason = "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with Browser() as b:
        yield b


def show(browser, view, tmp_path, name):
    """Save the view, check its size, open it offline; a screenshot; the page."""
    path = view.save(tmp_path / f"{name}.html")
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{name}: {size} bytes"
    page = browser.page()
    page.open(path)
    assert page.eval("document.querySelector('.ti-view').getAttribute('data-ti-ready')") == "1"
    page.screenshot(tmp_path / f"{name}.png")
    return page


def assert_clean(page, path_name):
    assert page.console_errors() == []
    urls = page.requests()
    assert urls and urls[0].endswith(path_name)
    assert all(u.startswith("data:") for u in urls[1:]), urls


def tooltip(page) -> str:
    return page.eval("(function(){var t=document.querySelector('.ti-tip');"
                     "return t.style.display==='block'? t.textContent : null;})()")


def value_in(text: str, key: str) -> float:
    m = re.search(key + r": ([+-]?[0-9.eE+-]+)", text)
    assert m, (key, text)
    return float(m.group(1))


# ----------------------------------------------------------------------------- token labels
def test_task_token_labels():
    copy = get_task("copy", n_symbols=4, length=3)
    assert copy.token_labels == ("a", "b", "c", "d", "SEP")
    assert get_task("modular_addition", p=5).token_labels == ("0", "1", "2", "3", "4", "=")
    assert get_task("repeated_tokens", d_vocab=6, length=2, bos=True).token_labels[:2] == ("BOS", "1")
    assert get_task("repeated_tokens", d_vocab=12, length=4, min_length=2).token_labels[0] == "PAD"
    # 0 is also drawn as a content token: it keeps its digit
    assert get_task("repeated_tokens", d_vocab=6, length=2).token_labels[0] == "0"
    assert get_task("repeated_tokens", d_vocab=12, length=4, min_length=2, filler="mixed",
                    sampling="replacement").token_labels[0] == "0"
    batch = copy.sample(jax.random.key(0), 2)["tokens"]
    names = copy.label_tokens(batch)
    assert [len(r) for r in names] == [7, 7] and all(r[3] == "SEP" for r in names)
    assert names[0][:3] == [copy.token_labels[int(t)] for t in batch[0, :3]]
    with pytest.raises(ValueError, match="token id 5 has no label"):
        label_tokens(np.array([1, 5]), copy.token_labels)


# ----------------------------------------------------------------------------- attention
def test_attention_view(browser, model, tokens, tmp_path):
    view = attention_view(model, tokens, token_labels=TASK, layer=1, head=1)
    page = show(browser, view, tmp_path, "attention")
    assert_clean(page, "attention.html")
    n = tokens.shape[1]
    assert page.eval("document.querySelectorAll('.ti-cell').length") == n * n
    assert page.eval("document.querySelectorAll('button.ti-head').length") == 8
    assert page.eval("document.querySelectorAll('canvas.ti-thumb').length") == 8
    names = TASK.label_tokens(tokens)
    assert page.eval("[...document.querySelectorAll('.ti-klabel')].map(e=>e.textContent)") == names[0]
    assert page.eval("[...document.querySelectorAll('.ti-qlabel')].map(e=>e.textContent)") == names[0]
    _, cache = model.run_with_cache(tokens)
    # the head chosen by a click, then the weight under the mouse
    page.click('button.ti-head[data-layer="0"][data-head="2"]')
    assert "L0H2" in page.eval("document.querySelector('.ti-head-title').textContent")
    q, k = 40, 8
    page.hover(f'.ti-cell[data-q="{q}"][data-k="{k}"]')
    text = tooltip(page)
    want = float(cache["pattern", 0][0, 2, q, k])
    assert abs(value_in(text, "weight") - want) < 1e-4
    assert f'query: "{names[0][q]}" (pos {q})' in text and f'key: "{names[0][k]}" (pos {k})' in text
    # another example: labels and weights follow it
    page.eval("(function(){var s=document.querySelector('select.ti-example'); s.value='3';"
              "s.dispatchEvent(new Event('change'));})()")
    assert page.eval("[...document.querySelectorAll('.ti-klabel')].map(e=>e.textContent)") == names[3]
    page.hover(f'.ti-cell[data-q="{q}"][data-k="{k - 1}"]')
    page.hover(f'.ti-cell[data-q="{q}"][data-k="{k}"]')
    assert abs(value_in(tooltip(page), "weight") - float(cache["pattern", 0][3, 2, q, k])) < 1e-4
    # above the diagonal: masked (grey), not coloured as a weight
    assert page.eval("document.querySelector('.ti-cell[data-q=\"3\"][data-k=\"9\"]')"
                     ".style.background") == "rgb(243, 243, 243)"
    assert page.console_errors() == []


def test_attention_view_of_a_large_batch_stays_small(browser, model, tmp_path):
    """64 sequences of 64 tokens: the weights travel at 1/255, and the page stays under 2 MB."""
    toks = TASK.sample(jax.random.key(2), 64)["tokens"]
    page = show(browser, attention_view(model, toks), tmp_path, "attention64")
    assert_clean(page, "attention64.html")
    _, cache = model.run_with_cache(toks, names_filter=["blocks.1.attn.hook_pattern"])
    page.eval("(function(){var s=document.querySelector('select.ti-example'); s.value='63';"
              "s.dispatchEvent(new Event('change'));})()")
    page.click('button.ti-head[data-layer="1"][data-head="3"]')
    page.hover('.ti-cell[data-q="20"][data-k="2"]')
    assert abs(value_in(tooltip(page), "weight") - float(cache["pattern", 1][63, 3, 20, 2])) < 0.0025


def test_two_views_in_one_page(browser, tmp_path):
    """Jupyter's case: two fragments in one document work independently."""
    rng = np.random.default_rng(0)
    a = rng.random((1, 1, 2, 5, 5)).astype(np.float32)
    a = np.tril(a) / np.tril(a).sum(-1, keepdims=True)
    v1, v2 = AttentionView(a, labels=[list("abcde")]), AttentionView(a[:, :, :1, :4, :4])
    path = tmp_path / "two.html"
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    f"{v1._repr_html_()}{v2._repr_html_()}</body></html>")
    page = browser.page()
    page.open(path)
    assert_clean(page, "two.html")
    counts = page.eval("[...document.querySelectorAll('.ti-view')].map(v=>[v.querySelectorAll"
                       "('.ti-cell').length, v.querySelectorAll('button.ti-head').length])")
    assert counts == [[25, 2], [16, 1]]


def test_the_checks_catch_a_fetch_and_an_error(browser, tmp_path):
    """The harness itself: a page that asks the network for something, or logs an error, fails
    assert_clean (so a view that did either would fail its test)."""
    path = tmp_path / "bad.html"
    path.write_text("<!DOCTYPE html><html><body><img src='http://example.com/x.png'>"
                    "<script>console.error('boom')</script></body></html>")
    page = browser.page()
    page.open(path)
    assert any("boom" in e for e in page.console_errors())
    assert "http://example.com/x.png" in page.requests()
    with pytest.raises(AssertionError):
        assert_clean(page, "bad.html")


def test_attention_view_rejects_bad_input():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        AttentionView(np.full((1, 1, 1, 3, 3), 2.0))
    with pytest.raises(ValueError, match="must be \\[layer"):
        AttentionView(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="head=4 is out of range"):
        AttentionView(np.zeros((1, 1, 2, 3, 3)), head=4)


# ----------------------------------------------------------------------------- attributions
def test_token_attribution_view(browser, model, tokens, tmp_path):
    toks = tokens[:2]
    metric = A.logit_diff(correct=3, wrong=7)
    results = {"integrated gradients": A.integrated_gradients(model, toks, metric, steps=8),
               "saliency": A.saliency(model, toks, metric),
               "occlusion": A.occlusion(model, toks, metric)}
    view = TokenAttributionView(results, token_labels=TASK)
    page = show(browser, view, tmp_path, "attributions")
    assert_clean(page, "attributions.html")
    n = toks.shape[1]
    assert page.eval("document.querySelectorAll('tr.ti-row').length") == 3
    assert page.eval("document.querySelectorAll('td.ti-tok').length") == 3 * n
    assert page.eval("[...document.querySelectorAll('th.ti-method')].map(e=>e.firstChild"
                     ".textContent)") == list(results)
    names = TASK.label_tokens(toks)[0]
    assert page.eval("[...document.querySelectorAll('td.ti-tok[data-method=\"0\"]')]"
                     ".map(e=>e.textContent)") == names
    ig = np.asarray(results["integrated gradients"].per_position())[0]
    for p in (int(np.argmax(ig)), int(np.argmin(ig))):
        page.hover(f'td.ti-tok[data-method="0"][data-pos="{p}"]')
        text = tooltip(page)
        assert abs(value_in(text, "attribution") - ig[p]) < 1e-4 + 1e-4 * abs(ig[p])
        assert f'token: "{names[p]}" (pos {p})' in text
    # diverging and centred at 0: the largest attribution red, the most negative blue
    rgb = page.eval("[...document.querySelectorAll('td.ti-tok[data-method=\"0\"]')].map(e=>"
                    "e.style.background.match(/\\d+/g).map(Number))")
    top, bottom = rgb[int(np.argmax(ig))], rgb[int(np.argmin(ig))]
    assert top[0] > top[2] + 50 and bottom[2] > bottom[0] + 50
    occ = np.asarray(results["occlusion"].per_position())[1]
    page.eval("(function(){var s=document.querySelector('select.ti-example'); s.value='1';"
              "s.dispatchEvent(new Event('change'));})()")
    page.hover('td.ti-tok[data-method="2"][data-pos="5"]')
    assert abs(value_in(tooltip(page), "attribution") - occ[5]) < 1e-4 + 1e-4 * abs(occ[5])
    with pytest.raises(ValueError, match="same \\[batch, pos\\]"):
        TokenAttributionView({"a": np.zeros((1, 4)), "b": np.zeros((1, 5))})


# ----------------------------------------------------------------------------- patching
def test_patching_view(browser, model, tokens, tmp_path):
    clean = tokens[:2]
    corrupted = clean.at[:, 40].set((clean[:, 40] + 1) % 64)
    metric = A.logit_diff(correct=clean[:, -1], wrong=(clean[:, -1] + 1) % 64)
    _, clean_cache = model.run_with_cache(clean)
    act = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)  # [2, 64]
    approx = patching.attribution_patch(model, corrupted, clean_cache, metric, "resid_pre")
    heads = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    names = TASK.label_tokens(clean)[0]
    view = PatchingView({"activation patching": act, "attribution patching": approx,
                         "heads": heads}, token_labels=names)
    page = show(browser, view, tmp_path, "patching")
    assert_clean(page, "patching.html")
    n = clean.shape[1]
    per_panel = page.eval("[...document.querySelectorAll('.ti-panel')].map(p=>"
                          "p.querySelectorAll('.ti-pcell').length)")
    assert per_panel == [2 * n, 2 * n, 8 * n]  # layer x pos, layer x pos, layer.head x pos
    rows = page.eval("[...document.querySelectorAll('.ti-panel[data-panel=\"2\"] .ti-rlab')]"
                     ".map(e=>e.textContent)")
    assert rows == [f"L{layer}H{h}" for layer in range(2) for h in range(4)]
    page.hover('.ti-panel[data-panel="0"] .ti-pcell[data-row="1"][data-col="40"]')
    text = tooltip(page)
    assert abs(value_in(text, "patched metric") - act.values[1, 40]) < 1e-4 + 1e-4 * abs(act.values[1, 40])
    assert f"pos: 40 {names[40]}" in text
    page.hover('.ti-panel[data-panel="2"] .ti-pcell[data-row="6"][data-col="63"]')
    assert abs(value_in(tooltip(page), "patched metric") - heads.values[1, 63, 2]) < 1e-4 + 1e-4 * abs(
        heads.values[1, 63, 2])
    # normalized: activation patching carries its source run; attribution patching does not
    with pytest.raises(ValueError, match="normalized=True"):
        PatchingView([act, approx], normalized=True)
    norm = PatchingView(act)
    assert norm.normalized and np.allclose(norm.panels[0]["values"], act.normalized(), atol=1e-6)


# ----------------------------------------------------------------------------- SAE features
def test_feature_view(browser, model, tokens, tmp_path):
    cfg = sae.SAEConfig(d_in=64, d_sae=32)
    params = sae.init_params(cfg, jax.random.key(1))
    params = {**params, "b_enc": params["b_enc"] - 0.5}  # sparse: fires on some tokens only
    hook = "blocks.0.hook_resid_post"
    view = feature_view(model, params, tokens, hook, [3, 7], token_labels=TASK, n_examples=5,
                        context=None)
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = np.asarray(cache[hook]).reshape(-1, 64)
    acts = np.asarray(sae.encode(params, x)).reshape(8, 64, 32)
    page = show(browser, view, tmp_path, "features")
    assert_clean(page, "features.html")
    a3 = acts[..., 3]
    top = np.argsort(-a3.max(1), kind="stable")[:5]
    assert page.eval("[...document.querySelectorAll('.ti-example')].map(e=>+e.getAttribute("
                     "'data-example'))") == [int(r) for r in top if a3[r].max() > 0]
    assert page.eval("document.querySelectorAll('.ti-example .ti-ftok').length") == 64 * len(
        [r for r in top if a3[r].max() > 0])
    assert page.eval("document.querySelectorAll('.ti-ftok.ti-max').length") == len(
        [r for r in top if a3[r].max() > 0])
    page.hover('.ti-example:nth-of-type(1) .ti-ftok:nth-of-type(11)')  # position 9 of the top row
    text = tooltip(page)
    assert abs(value_in(text, "activation") - a3[top[0], 9]) < 1e-4
    bars = page.eval("document.querySelectorAll('rect.ti-bar').length")
    assert bars == 30
    n_active = int((a3 > 0).sum())
    assert f"fires on {n_active} of {a3.size} tokens" in page.eval(
        "document.querySelector('.ti-features').textContent")
    page.eval("(function(){var s=document.querySelector('select.ti-feature'); s.value='1';"
              "s.dispatchEvent(new Event('change'));})()")
    assert page.eval("document.querySelector('.ti-features h3').textContent") == "Feature 7"
    assert page.console_errors() == []
    with pytest.raises(ValueError, match="feature 40 is out of range"):
        FeatureView(acts, features=[40])


# ----------------------------------------------------------------------------- reports and CLI
def _run_dir(tmp_path):
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    run.mkdir()
    for name in ("loss", "scores"):
        fig = Figure(figsize=(3, 2))
        fig.add_subplot().plot([0, 1, 2], [2, 1, 3])
        fig.savefig(run / f"{name}.png")
    (run / "report.md").write_text(
        "# A run: report\n\nText with `code`, **bold** and <b>markup</b>.\n\n## Found\n\n"
        "- first\n- second\n\n| check | value |\n|---|---|\n| a | 1.0 |\n| b | 2.0 |\n\n"
        "![loss curve](loss.png)\n\n![scores](scores.png)\n\n![far](https://example.com/x.png)\n")
    return run


def test_report_view_and_cli(browser, model, tmp_path, capsys):
    from tinyinterp.cli import main

    run = _run_dir(tmp_path)
    assert main(["view", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run / "report.html")
    page = browser.page()
    page.open(out)
    assert_clean(page, "report.html")  # the figures are data: URIs, the remote one not loaded
    assert page.eval("[...document.querySelectorAll('.ti-report img')].map(i=>i.complete && "
                     "i.naturalWidth>0)") == [True, True]
    assert page.eval("document.querySelectorAll('.ti-report tbody tr').length") == 2
    assert page.eval("document.querySelector('.ti-report h1').textContent") == "A run: report"
    assert page.eval("document.querySelectorAll('.ti-report b').length") == 0  # escaped
    page.screenshot(tmp_path / "report.png")
    assert ReportView.from_dir(run).images == ["loss.png", "scores.png"]
    # a checkpoint: its attention on a batch, the path printed
    ckpt = checkpoint.save_model(model, tmp_path / "model")
    assert main(["view", str(ckpt), "--batch", "2", "--out", str(tmp_path / "att.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "att.html")
    page = browser.page()
    page.open(tmp_path / "att.html")
    assert_clean(page, "att.html")
    assert page.eval("document.querySelectorAll('button.ti-head').length") == 8
    assert page.eval("document.querySelectorAll('.ti-cell').length") == 64 * 64
    # a reproduction's run directory: --attention views its model/, written inside the run
    checkpoint.save_model(model, run / "model")
    assert main(["view", str(run), "--attention", "--batch", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "attention.html")
    assert main(["view", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ci_installs_chromium():
    """.ci/run installs Chromium where it is missing, and says so clearly where it cannot."""
    with open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")) as f:
        text = f.read()
    assert "apt-get install" in text and "chromium" in text
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = text[text.index("# Chromium:"):text.index("# end Chromium")]
    # where chromium is absent and apt-get is unavailable: a clear message and a failure
    env = {"PATH": "/nonexistent", "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run(["/bin/bash", "-c", "set -euo pipefail\n" + script], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Chromium" in r.stderr, (r.returncode, r.stderr)
