"""`tinyinterp evaluate-methods` writes its table, figure and report, and its table shows the
broken methods caught (a reduced run: one drawn model of each kind, two correct methods)."""

import json

from tinyinterp import attribution as A
from tinyinterp import evaluate
from tinyinterp.cli import main


def test_evaluate_methods_catches_the_broken_methods(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "METHODS", {"gradient_x_input": A.gradient_x_input,
                                              "occlusion": evaluate._occlusion})
    out = tmp_path / "ev"
    assert main(["evaluate-methods", "--out", str(out), "--n-models", "1", "--no-tracr"]) == 0
    res = json.loads((out / "results.json").read_text())
    props = res["properties"]
    good = props["gradient_x_input"]
    assert all(good[p] == 1.0 for p in evaluate.PROPERTIES if p != "input_invariance")
    for broken in evaluate.BROKEN:
        caught = [p for p, v in props[broken].items() if v is not None and v < 1.0]
        assert len(caught) >= 3, (broken, props[broken])
    assert res["recovery"]["zero_ablation"] == 1.0 and res["recovery"]["random (broken)"] < 0.9
    assert res["aopc"]["occlusion"] > res["aopc"]["random (broken)"]
    report = (out / "report.md").read_text()
    assert "random (broken)** is caught by: completeness" in report
    assert (out / "properties.png").stat().st_size > 1000 and (out / "table.md").exists()
    assert main(["evaluate-methods", "--out", str(out), "--n-models", "0"]) == 2
