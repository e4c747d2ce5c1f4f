"""Patching results in the browser: layer x position and layer x head grids, hover for values.

Takes ``tinyinterp.patching.PatchResult``s (activation, attribution, path patching, ablations).
A result becomes one or more heatmap panels by its axes: (layer, pos) and (layer, head) are one
grid each; (layer, pos, head) puts every head of every layer on a row ("L1H2") against position;
a leading axis such as ``patch_type`` (``get_act_patch_block_every``) gives one panel per entry;
a "batch" axis (``reduce=None``) is averaged. Several results share one symmetric colour scale,
so activation patching and its attribution-patching estimate compare cell for cell.
"""
# ruff: noqa: E501 - the JavaScript below keeps one statement per line


from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinyinterp.views._page import View, b64_f32

__all__ = ["PatchingView", "patch_panels"]

_CSS = """
.ti-patching .ti-panels{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.ti-patching .ti-panel h3{font-size:13px;margin:4px 0}
.ti-patching .ti-hm{display:grid;gap:1px;background:#fff}
.ti-patching .ti-pcell{min-width:8px;min-height:14px}
.ti-patching .ti-pcell:hover{outline:2px solid #000;outline-offset:-1px}
.ti-patching .ti-rlab{font-size:11px;text-align:right;padding-right:4px;white-space:nowrap;
  display:flex;align-items:center;justify-content:flex-end}
.ti-patching .ti-clab{font-size:10px;writing-mode:vertical-rl;transform:rotate(180deg);
  white-space:nowrap;text-align:left;padding-top:2px}
.ti-patching .ti-xaxis{font-size:11px;color:#444;text-align:center;margin-top:2px}
.ti-patching .ti-yaxis{font-size:11px;color:#444;writing-mode:vertical-rl;transform:rotate(180deg);
  align-self:center}
"""

_SCRIPT = r"""
var tip=T.tooltip(root), S=data.scale;
root.appendChild(T.el("h2","ti-title",data.title));
root.appendChild(T.el("p","ti-sub",data.subtitle));
var panels=T.el("div","ti-panels"); root.appendChild(panels);
data.panels.forEach(function(p,pi){
  var V=T.f32(p.values), R=p.rows.length, C=p.cols.length;
  var box=T.el("div","ti-panel"); box.setAttribute("data-panel",pi); panels.appendChild(box);
  box.appendChild(T.el("h3","",p.title));
  var flex=T.el("div"); flex.style.display="flex"; flex.style.gap="2px"; box.appendChild(flex);
  flex.appendChild(T.el("div","ti-yaxis",p.row_axis));
  var col=T.el("div"); flex.appendChild(col);
  var g=T.el("div","ti-hm"); col.appendChild(g);
  var cw=Math.max(8,Math.min(40,Math.floor(560/C)));
  g.style.gridTemplateColumns="auto repeat("+C+","+cw+"px)";
  for(var r=0;r<R;r++){ g.appendChild(T.el("div","ti-rlab",p.rows[r]));
    for(var c=0;c<C;c++){ var v=V[r*C+c], cell=T.el("div","ti-pcell");
      cell.setAttribute("data-row",r); cell.setAttribute("data-col",c); cell.style.height=Math.max(14,Math.min(28,cw))+"px";
      cell.style.background=T.diverging(v,S);
      (function(r,c,v){cell.addEventListener("mouseenter",function(ev){
        var t=p.title+"\n"+p.row_axis+": "+p.rows[r]+"\n"+p.col_axis+": "+p.col_hover[c]+"\n"+data.value_name+": "+T.signed(v,4);
        if(p.raw) t+="\nmetric: "+T.fmt(T.f32(p.raw)[r*C+c],4);
        tip.show(t,ev);});
       cell.addEventListener("mouseleave",function(){tip.hide();});})(r,c,v);
      g.appendChild(cell);} }
  g.appendChild(T.el("div"));
  for(var c2=0;c2<C;c2++) g.appendChild(T.el("div","ti-clab",p.cols[c2]));
  col.appendChild(T.el("div","ti-xaxis",p.col_axis));
});
root.appendChild(T.colorbar("diverging",-S,S,data.value_name));
"""

_POS = ("pos", "query_pos", "dest_pos", "key_pos", "src_pos")
_NAMES = {"head_index": "head", "dest_pos": "query_pos", "src_pos": "key_pos"}


def _axis(name: str) -> str:
    return _NAMES.get(name, name)


def _pos_labels(labels: Sequence[str], token_labels: Sequence[str] | None, with_tokens: bool
                ) -> list[str]:
    if token_labels is None or len(token_labels) != len(labels):
        return [str(x) for x in labels]
    if with_tokens:
        return [f"{x} {t}" for x, t in zip(labels, token_labels, strict=True)]
    return [str(t) for t in token_labels]


def patch_panels(values: np.ndarray, axes: Sequence[str], labels: Sequence[Sequence[str]],
                 title: str) -> list[dict]:
    """Split an n-d array of patch values into 2-d panels: [{title, row_axis, col_axis, rows,
    cols, values [rows, cols]}]. See the module docstring for the rules."""
    axes = [_axis(a) for a in axes]
    labels = [list(map(str, lab)) for lab in labels]
    v = np.asarray(values, np.float32)
    if v.ndim == 0:
        return [dict(title=title, row_axis="", col_axis="", rows=[""], cols=[""], values=v.reshape(1, 1))]
    if v.ndim == 1:
        return [dict(title=title, row_axis="", col_axis=axes[0], rows=[""], cols=labels[0],
                     values=v[None])]
    if v.ndim == 3 and "layer" in axes and "head" in axes:
        li, hi = axes.index("layer"), axes.index("head")
        (oi,) = [i for i in range(3) if i not in (li, hi)]
        w = np.transpose(v, (li, hi, oi)).reshape(-1, v.shape[oi])  # [layer * head, other]
        rows = [f"L{lab_l}H{lab_h}" for lab_l in labels[li] for lab_h in labels[hi]]
        return [dict(title=title, row_axis="layer.head", col_axis=axes[oi], rows=rows,
                     cols=labels[oi], values=w)]
    if v.ndim == 2:
        if axes[0] in _POS and axes[1] not in _POS:  # positions along the x axis
            v, axes, labels = v.T, axes[::-1], labels[::-1]
        return [dict(title=title, row_axis=axes[0], col_axis=axes[1], rows=labels[0],
                     cols=labels[1], values=v)]
    if v.ndim == 4 and axes[0] == "layer" and axes[1] == "head":  # [layer, head, q, k]
        out = []
        for i, lab_l in enumerate(labels[0]):
            for j, lab_h in enumerate(labels[1]):
                out += patch_panels(v[i, j], axes[2:], labels[2:], f"{title} L{lab_l}H{lab_h}")
        return out
    out = []  # a leading axis of its own (patch_type, ...): one panel per entry
    for i, lab in enumerate(labels[0]):
        out += patch_panels(v[i], axes[1:], labels[1:], f"{title}: {lab}".lstrip(": "))
    return out


def _name(result: Any, i: int) -> str:
    s = dict(getattr(result, "settings", {}) or {})
    what = s.get("family") or s.get("hook") or ""
    return f"{result.method} patching {what}".strip() if hasattr(result, "method") else f"result {i}"


class PatchingView(View):
    """One or more ``PatchResult``s as heatmaps with hover (see the module docstring).

    ``normalized``: show (patched - target) / (source - target) (None: where every result has
    its source run's metric; attribution patching has none, so mixing it with activation
    patching shows the raw metric unless you pass True and it is available). ``token_labels``:
    names for the positions (one sequence of [pos] strings, e.g. one example's tokens), shown on
    the position axis and in the hover text."""

    kind = "patching"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, results: Any, *, normalized: bool | None = None,
                 token_labels: Sequence[str] | None = None, title: str | None = None):
        if isinstance(results, Mapping):
            items = list(results.items())
        elif isinstance(results, (list, tuple)):
            items = [(_name(r, i), r) for i, r in enumerate(results)]
        else:
            items = [(_name(results, 0), results)]
        if not items:
            raise ValueError("PatchingView needs at least one PatchResult")
        for name, r in items:
            if not all(hasattr(r, a) for a in ("values", "axes", "labels", "baseline")):
                raise TypeError(f"{name}: expected a tinyinterp.patching.PatchResult, got "
                                f"{type(r).__name__}")
        has_source = all(getattr(r, "source", None) is not None for _, r in items)
        if normalized is None:
            normalized = has_source
        if normalized and not has_source:
            missing = [n for n, r in items if getattr(r, "source", None) is None]
            raise ValueError(f"normalized=True needs every result's source metric; {missing} have "
                             "none (attribution patching records none): pass normalized=False")
        self.normalized = bool(normalized)
        self.token_labels = None if token_labels is None else [str(t) for t in token_labels]
        self.title = title or ("Patching: " + ", ".join(n for n, _ in items))
        self.panels = []
        for name, r in items:
            shown = np.asarray(r.normalized() if self.normalized else r.values, np.float32)
            raw = np.asarray(r.values, np.float32)
            axes, labels = list(r.axes), [list(x) for x in r.labels]
            if axes and axes[-1] == "batch":  # reduce=None: the batch mean
                shown, raw, axes, labels = shown.mean(-1), raw.mean(-1), axes[:-1], labels[:-1]
            for i, a in enumerate(axes):
                if _axis(a) in _POS:
                    labels[i] = _pos_labels(labels[i], self.token_labels, with_tokens=True)
            panels = patch_panels(shown, axes, labels, name)
            raws = patch_panels(raw, axes, labels, name)
            for p, q in zip(panels, raws, strict=True):
                p["raw"] = q["values"] if self.normalized else None
                self.panels.append(p)
        self.baselines = {n: np.asarray(r.baseline).mean().item() for n, r in items}

    def _title(self) -> str:
        return self.title

    def _data(self) -> dict:
        finite = [np.abs(p["values"][np.isfinite(p["values"])]) for p in self.panels]
        scale = max((float(f.max()) for f in finite if f.size), default=1.0) or 1.0
        value_name = "normalized effect" if self.normalized else "patched metric"
        base = "; ".join(f"{n}: {b:.4g}" for n, b in self.baselines.items())
        sub = (("Colour: (patched - target) / (source - target); 0 = no effect, 1 = the whole "
                "source run's effect. ") if self.normalized else
               "Colour: the metric of the patched run. ") + \
            f"White = 0, one symmetric scale for every panel (\u00b1{scale:.4g}). " + \
            f"Unpatched target metric {base}. Hover a cell for its value."
        panels = []
        for p in self.panels:
            cols = list(p["cols"])
            panels.append({"title": p["title"], "row_axis": p["row_axis"],
                           "col_axis": p["col_axis"], "rows": list(p["rows"]), "cols": cols,
                           "col_hover": cols, "values": b64_f32(p["values"]),
                           "raw": None if p["raw"] is None else b64_f32(p["raw"])})
        return {"title": self.title, "subtitle": sub, "scale": scale, "value_name": value_name,
                "panels": panels}
