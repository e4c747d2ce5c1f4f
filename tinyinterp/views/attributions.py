"""Token attributions in the browser: one row per method, the tokens coloured by their
attribution (diverging, white at 0, red positive, blue negative), the value on hover.

Methods are aligned column by column (same position under the same token), so several methods
on one input compare side by side. Each row has its own symmetric scale (methods differ in units:
saliency is a norm, occlusion a metric difference), stated beside it; ``shared_scale=True`` puts
every row on one scale.
"""
# ruff: noqa: E501 - the JavaScript below keeps one statement per line


from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinyinterp.views._labels import position_labels
from tinyinterp.views._page import View, b64_f32

__all__ = ["TokenAttributionView", "per_position"]

_CSS = """
.ti-attributions table.ti-attr{border-collapse:separate;border-spacing:2px}
.ti-attributions td.ti-tok{padding:3px 4px;border-radius:3px;font-size:12px;text-align:center;
  white-space:nowrap;min-width:22px;cursor:default;border:1px solid #e4e4e4}
.ti-attributions td.ti-tok:hover{outline:2px solid #000}
.ti-attributions th.ti-method{text-align:right;padding-right:8px;font-weight:600;white-space:nowrap}
.ti-attributions th.ti-method .ti-note{display:block;font-weight:400}
.ti-attributions th.ti-pos{font-size:10px;color:#777;font-weight:400}
"""

_SCRIPT = r"""
var M=data.methods.length, B=data.n_batch, N=data.n_pos, V=T.f32(data.values);  // [method, batch, pos]
function val(m,b,p){return V[(m*B+b)*N+p];}
var st={b:data.example}; var tip=T.tooltip(root);
root.appendChild(T.el("h2","ti-title",data.title));
root.appendChild(T.el("p","ti-sub",M+(M===1?" method":" methods")+" on "+B+(B===1?" example":" examples")+
  " of "+N+" tokens. Colour: attribution per token, red positive, blue negative, white 0 ("+
  (data.shared?"one symmetric scale for every row":"each row on its own symmetric scale, shown beside it")+
  "). Hover a token for its value."));
if(data.note) root.appendChild(T.el("p","ti-sub",data.note));
var controls=T.el("div","ti-controls"); root.appendChild(controls);
if(B>1){ var lab=T.el("label","","example "); var sel=T.el("select","ti-example");
  for(var b=0;b<B;b++){var o=T.el("option","",String(b)); o.value=b; sel.appendChild(o);}
  sel.value=st.b; sel.onchange=function(){st.b=+sel.value; draw();}; lab.appendChild(sel); controls.appendChild(lab);}
var wrap=T.el("div"); wrap.style.overflowX="auto"; root.appendChild(wrap);
var table=T.el("table","ti-attr"); wrap.appendChild(table);
var head=T.el("tr"); head.appendChild(T.el("th","ti-pos","position"));
for(var p=0;p<N;p++) head.appendChild(T.el("th","ti-pos",String(p)));
table.appendChild(head);
var rows=[], scales=[];
for(var m=0;m<M;m++){ var tr=T.el("tr","ti-row"); var th=T.el("th","ti-method",data.methods[m]);
  var sc=T.el("span","ti-note"); th.appendChild(sc); scales.push(sc); tr.appendChild(th);
  var cells=[]; for(var p2=0;p2<N;p2++){ var td=T.el("td","ti-tok"); td.setAttribute("data-method",m);
    td.setAttribute("data-pos",p2); tr.appendChild(td); cells.push(td);} table.appendChild(tr); rows.push(cells);}
var cbar=T.el("div"); root.appendChild(cbar);
function scale(m,b){ var s=0, ms=data.shared? [...Array(M).keys()] : [m];
  ms.forEach(function(mm){ for(var p=0;p<N;p++){var v=Math.abs(val(mm,b,p)); if(isFinite(v)&&v>s) s=v;} }); return s>0?s:1; }
function draw(){ var b=st.b, lab=data.labels[b];
  for(var m=0;m<M;m++){ var s=scale(m,b), sum=0;
    for(var p=0;p<N;p++){ var v=val(m,b,p), td=rows[m][p], c=T.divergingRGB(isFinite(v)?v:0,s);
      td.textContent=lab[p]; td.style.background="rgb("+c[0]+","+c[1]+","+c[2]+")"; td.style.color=T.textColor(c);
      if(isFinite(v)) sum+=v; }
    scales[m].textContent="scale \u00b1"+T.fmt(s)+", sum "+T.signed(sum); }
  cbar.innerHTML=""; cbar.appendChild(T.colorbar("diverging",-1,1,"attribution / row scale")); }
table.addEventListener("mouseover",function(ev){ var td=ev.target; if(!td.classList||!td.classList.contains("ti-tok")) return;
  var m=+td.getAttribute("data-method"), p=+td.getAttribute("data-pos");
  tip.show(data.methods[m]+", example "+st.b+"\ntoken: "+JSON.stringify(data.labels[st.b][p])+" (pos "+p+")\n"+
    "attribution: "+T.signed(val(m,st.b,p),4), ev); });
table.addEventListener("mouseleave",function(){tip.hide();});
draw();
"""


def per_position(result: Any) -> np.ndarray:
    """One number per token, [batch, pos]: an Attribution's or Occlusion's ``per_position()``
    (saliency's L2 norm, the others' sums over d_model), or an array [pos] / [batch, pos]."""
    if hasattr(result, "per_position"):
        result = result.per_position()
    v = np.asarray(result, np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2:
        raise ValueError("token attributions must be [pos] or [batch, pos], or a result with "
                         f"per_position() (Attribution, Occlusion); got shape {v.shape}")
    return v


def _method_name(result: Any, i: int) -> str:
    method = getattr(result, "method", None)
    if method is None and hasattr(result, "window_deltas"):
        method = "occlusion"
    return str(method or f"method {i}")


class TokenAttributionView(View):
    """Several attribution methods on the same tokens, side by side.

    ``attributions``: {name: result} or a sequence of results (named by their ``method``); a
    result is an ``Attribution`` or ``Occlusion`` from ``tinyinterp.attribution`` (its
    ``per_position()``), or an array [batch, pos] / [pos]. ``tokens`` [batch, pos] default to the
    first result's own; names come from ``token_labels`` (a name per id, or a Task) or ``labels``.
    """

    kind = "attributions"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, attributions: Mapping[str, Any] | Sequence[Any] | Any, tokens: Any = None,
                 *, token_labels: Any = None, labels: Sequence[Sequence[str]] | None = None,
                 title: str | None = None, example: int = 0, shared_scale: bool = False,
                 note: str | None = None):
        if isinstance(attributions, Mapping):
            items = list(attributions.items())
        elif isinstance(attributions, (list, tuple)):
            items = [(_method_name(r, i), r) for i, r in enumerate(attributions)]
        else:
            items = [(_method_name(attributions, 0), attributions)]
        if not items:
            raise ValueError("TokenAttributionView needs at least one attribution")
        names = [str(n) for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must differ, got {names}; pass a dict to name them")
        values = [per_position(r) for _, r in items]
        shape = values[0].shape
        for n, v in zip(names, values, strict=True):
            if v.shape != shape:
                raise ValueError(f"every method must attribute the same [batch, pos]: {names[0]} "
                                 f"has {shape}, {n} has {v.shape}")
        if tokens is None:
            tokens = next((r.tokens for _, r in items if getattr(r, "tokens", None) is not None),
                          None)
        n_batch, n_pos = shape
        if not 0 <= example < n_batch:
            raise ValueError(f"example={example} is out of range: there are {n_batch}")
        self.methods = names
        self.values = np.stack(values)  # [method, batch, pos]
        self.labels = position_labels(tokens, n_batch, n_pos, token_labels, labels)
        self.title = title or "Token attributions"
        self.example = int(example)
        self.shared_scale = bool(shared_scale)
        self.note = note

    def _title(self) -> str:
        return self.title

    def _data(self) -> dict:
        return {"title": self.title, "methods": self.methods, "n_batch": self.values.shape[1],
                "n_pos": self.values.shape[2], "values": b64_f32(self.values),
                "labels": self.labels, "example": self.example, "shared": self.shared_scale,
                "note": self.note}
