"""Attention patterns in the browser: every layer and head of a batch, token labels on both axes.

A row of thumbnails per layer (one per head, so stripes such as the induction head's show at a
glance) doubles as the head selector; the selected head is drawn large with the query tokens down
the side and the key tokens along the top; hovering a cell shows its query token, key token and
weight. Patterns travel as uint16 (error < 1e-5; uint8, error < 0.002, for batches too large for
that), only the lower triangle when causal.
"""
# ruff: noqa: E501 - the JavaScript below keeps one statement per line


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tinyinterp.views._labels import position_labels
from tinyinterp.views._page import View, b64_u8_unit, b64_u16_unit

# Patterns travel as uint16 while that keeps them under this many bytes, else as uint8 (a large
# batch), so a view stays well under 2 MB: 8 sequences of 64 tokens on 2 x 4 heads take 0.35 MB.
_U16_BUDGET = 1_200_000

__all__ = ["AttentionView", "attention_view"]

_CSS = """
.ti-attention .ti-heads{display:flex;flex-direction:column;gap:4px;margin:6px 0 10px 0}
.ti-attention .ti-layer-row{display:flex;gap:6px;align-items:center}
.ti-attention .ti-layer-name{width:54px;font-size:12px;color:#333}
.ti-attention button.ti-head{display:flex;flex-direction:column;align-items:center;padding:3px;
  border:2px solid #ddd;background:#fff;border-radius:4px;cursor:pointer;font-size:11px}
.ti-attention button.ti-head.ti-selected{border-color:#d6604d}
.ti-attention canvas.ti-thumb{width:64px;height:64px;image-rendering:pixelated;border:1px solid #eee}
.ti-attention .ti-plot{display:flex;align-items:flex-start;gap:4px}
.ti-attention .ti-ylabel{writing-mode:vertical-rl;transform:rotate(180deg);align-self:center}
.ti-attention .ti-pattern{display:grid;gap:0}
.ti-attention .ti-cell{width:100%;height:100%;outline-offset:-1px}
.ti-attention .ti-cell:hover{outline:1px solid #000}
.ti-attention .ti-klabel{writing-mode:vertical-rl;transform:rotate(180deg);font-size:10px;
  white-space:nowrap;text-align:left;overflow:hidden;padding-top:2px;line-height:1}
.ti-attention .ti-qlabel{font-size:10px;white-space:nowrap;text-align:right;padding-right:3px;
  overflow:hidden;line-height:1;display:flex;align-items:center;justify-content:flex-end}
.ti-attention .ti-hl{font-weight:700;color:#b2182b}
"""

_SCRIPT = r"""
var L=data.n_layers, H=data.n_heads, B=data.n_batch, N=data.n_pos;
var P=data.bits===16? T.u16(data.pattern) : T.u8(data.pattern), per=data.tri? N*(N+1)/2 : N*N, DARK=[8,48,107];
function w(b,l,h,q,k){ if(data.tri && k>q) return 0;
  return P[((b*L+l)*H+h)*per + (data.tri? q*(q+1)/2+k : q*N+k)]; }
var st={b:data.example, l:data.layer, h:data.head};
var tip=T.tooltip(root);
root.appendChild(T.el("h2","ti-title",data.title));
root.appendChild(T.el("p","ti-sub",L+" layers x "+H+" heads, "+B+(B===1?" example":" examples")+
  " of "+N+" tokens. Click a head to enlarge it; hover a cell for its weight. Rows: query "+
  "(attending) token, columns: key (attended-to) token; each row sums to 1."+
  (data.bits===16? "" : " Weights stored to 1/255 (a large batch), so within 0.002.")));
var controls=T.el("div","ti-controls"); root.appendChild(controls);
if(B>1){ var lab=T.el("label","","example "); var sel=T.el("select","ti-example");
  for(var b=0;b<B;b++){var o=T.el("option","",String(b)); o.value=b; sel.appendChild(o);}
  sel.value=st.b; sel.onchange=function(){st.b=+sel.value; drawThumbs(); drawMain();};
  lab.appendChild(sel); controls.appendChild(lab); }
var heads=T.el("div","ti-heads"); root.appendChild(heads);
var thumbs=[], buttons=[];
for(var l=0;l<L;l++){ var row=T.el("div","ti-layer-row"); row.appendChild(T.el("span","ti-layer-name","layer "+l));
  for(var h=0;h<H;h++){ var btn=T.el("button","ti-head"); btn.type="button";
    btn.setAttribute("data-layer",l); btn.setAttribute("data-head",h); btn.title="layer "+l+", head "+h;
    var c=T.el("canvas","ti-thumb"); c.width=N; c.height=N; btn.appendChild(c);
    btn.appendChild(T.el("span","","L"+l+"H"+h));
    btn.onclick=(function(l,h){return function(){st.l=l; st.h=h; drawMain();};})(l,h);
    row.appendChild(btn); thumbs.push(c); buttons.push(btn); }
  heads.appendChild(row); }
function drawThumbs(){ for(var l=0;l<L;l++) for(var h=0;h<H;h++){ var c=thumbs[l*H+h], g=c.getContext("2d"), img=g.createImageData(N,N);
  for(var q=0;q<N;q++) for(var k=0;k<N;k++){ var col=T.seqRGB(w(st.b,l,h,q,k),DARK), i=4*(q*N+k);
    img.data[i]=col[0]; img.data[i+1]=col[1]; img.data[i+2]=col[2]; img.data[i+3]=255; }
  g.putImageData(img,0,0); } }
var mainTitle=T.el("h3","ti-head-title"); mainTitle.style.margin="6px 0"; root.appendChild(mainTitle);
root.appendChild(T.el("div","ti-axis","key token (attended to) \u2192"));
var plot=T.el("div","ti-plot"); root.appendChild(plot);
plot.appendChild(T.el("div","ti-axis ti-ylabel","query token (attending) \u2192"));
var grid=T.el("div","ti-pattern"); plot.appendChild(grid);
var cs=Math.max(6,Math.min(16,Math.floor(640/N)));
grid.style.gridTemplateColumns="auto repeat("+N+","+cs+"px)";
grid.style.gridTemplateRows="auto repeat("+N+","+cs+"px)";
grid.appendChild(T.el("div","ti-corner"));
var klabels=[], qlabels=[], cells=[];
for(var k=0;k<N;k++){ var e=T.el("div","ti-klabel"); grid.appendChild(e); klabels.push(e); }
for(var q=0;q<N;q++){ var e2=T.el("div","ti-qlabel"); e2.style.height=cs+"px"; grid.appendChild(e2); qlabels.push(e2);
  for(var k2=0;k2<N;k2++){ var cell=T.el("div","ti-cell"); cell.setAttribute("data-q",q); cell.setAttribute("data-k",k2);
    grid.appendChild(cell); cells.push(cell); } }
var fs=Math.max(7,Math.min(11,cs-1));
klabels.concat(qlabels).forEach(function(e){e.style.fontSize=fs+"px";});
root.appendChild(T.colorbar("sequential",0,1,"attention weight",DARK));
var hl=[];
function clearHl(){ hl.forEach(function(e){e.classList.remove("ti-hl");}); hl=[]; }
grid.addEventListener("mouseover",function(ev){ var c=ev.target; if(!c.classList||!c.classList.contains("ti-cell")) return;
  var q=+c.getAttribute("data-q"), k=+c.getAttribute("data-k"), lab=data.labels[st.b];
  clearHl(); qlabels[q].classList.add("ti-hl"); klabels[k].classList.add("ti-hl"); hl=[qlabels[q],klabels[k]];
  tip.show("L"+st.l+"H"+st.h+", example "+st.b+"\nquery: "+JSON.stringify(lab[q])+" (pos "+q+")\n"+
    "key: "+JSON.stringify(lab[k])+" (pos "+k+")\nweight: "+w(st.b,st.l,st.h,q,k).toFixed(data.bits===16?4:3), ev); });
grid.addEventListener("mousemove",function(ev){ if(ev.target.classList&&ev.target.classList.contains("ti-cell")&&tip.el.style.display==="block"){
  var x=ev.clientX+14,y=ev.clientY+14; tip.el.style.left=x+"px"; tip.el.style.top=y+"px";} });
grid.addEventListener("mouseleave",function(){ tip.hide(); clearHl(); });
function drawMain(){ var lab=data.labels[st.b];
  mainTitle.textContent="Layer "+st.l+", head "+st.h+" (L"+st.l+"H"+st.h+"), example "+st.b;
  buttons.forEach(function(b,i){ b.classList.toggle("ti-selected", i===st.l*H+st.h); });
  for(var i=0;i<N;i++){ klabels[i].textContent=lab[i]; klabels[i].title="pos "+i+": "+lab[i];
    qlabels[i].textContent=lab[i]; qlabels[i].title="pos "+i+": "+lab[i]; }
  for(var q=0;q<N;q++) for(var k=0;k<N;k++){ cells[q*N+k].style.background=
    (data.tri&&k>q)? "#f3f3f3" : T.seq(w(st.b,st.l,st.h,q,k),DARK); } }
drawThumbs(); drawMain();
"""


class AttentionView(View):
    """Attention patterns of every layer and head on a batch.

    ``patterns``: [layer, batch, head_index, query_pos, key_pos], or a sequence of per-layer
    [batch, head_index, query_pos, key_pos] arrays (``cache["pattern", l]``). Token labels: from
    ``tokens`` [batch, pos] and ``token_labels`` (a name per id, or a Task), or ``labels``
    [batch][pos]; without either, the ids. ``layer``/``head``/``example`` pick what is shown
    first."""

    kind = "attention"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, patterns: Any, tokens: Any = None, *, token_labels: Any = None,
                 labels: Sequence[Sequence[str]] | None = None, title: str | None = None,
                 layer: int = 0, head: int = 0, example: int = 0):
        if not isinstance(patterns, np.ndarray) and isinstance(patterns, (list, tuple)):
            patterns = np.stack([np.asarray(p, np.float32) for p in patterns])
        p = np.asarray(patterns, np.float32)
        if p.ndim == 4:  # one layer
            p = p[None]
        if p.ndim != 5 or p.shape[-1] != p.shape[-2]:
            raise ValueError("patterns must be [layer, batch, head_index, query_pos, key_pos] "
                             f"(or per-layer [batch, head_index, query_pos, key_pos]), got {p.shape}")
        if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1 + 1e-6:
            raise ValueError("attention patterns must be finite weights in [0, 1] (the softmax, "
                             "hook_pattern), not scores")
        n_layers, n_batch, n_heads, n_pos, _ = p.shape
        for name, v, n in (("layer", layer, n_layers), ("head", head, n_heads),
                           ("example", example, n_batch)):
            if not 0 <= int(v) < n:
                raise ValueError(f"{name}={v} is out of range: there are {n}")
        self.patterns = p
        self.labels = position_labels(tokens, n_batch, n_pos, token_labels, labels)
        self.title = title or "Attention patterns"
        self.initial = (int(layer), int(head), int(example))

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[2]

    def _title(self) -> str:
        return self.title

    def _data(self) -> dict:
        p = np.transpose(self.patterns, (1, 0, 2, 3, 4))  # [batch, layer, head, q, k]
        n = p.shape[-1]
        tri = bool(np.all(p[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] <= 1e-7))
        flat = p[..., np.tril_indices(n)[0], np.tril_indices(n)[1]] if tri else p
        layer, head, example = self.initial
        bits = 16 if 2 * flat.size * 4 / 3 <= _U16_BUDGET else 8
        return {"title": self.title, "n_layers": p.shape[1], "n_heads": p.shape[2],
                "n_batch": p.shape[0], "n_pos": n, "tri": tri, "bits": bits,
                "pattern": b64_u16_unit(flat) if bits == 16 else b64_u8_unit(flat),
                "labels": self.labels, "layer": layer, "head": head, "example": example}


def attention_view(model, tokens: Any, *, token_labels: Any = None,
                   labels: Sequence[Sequence[str]] | None = None, title: str | None = None,
                   layer: int = 0, head: int = 0, example: int = 0) -> AttentionView:
    """Run ``model`` on ``tokens`` [batch, pos] (caching only ``hook_pattern``) and view every
    layer's and head's attention. ``token_labels``: a name per token id (``task.token_labels``)
    or the Task."""
    import jax.numpy as jnp

    tokens = jnp.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    pats = [np.asarray(cache["pattern", layer_]) for layer_ in range(model.cfg.n_layers)]
    if title is None:
        title = f"Attention patterns: {getattr(model.cfg, 'model_name', None) or 'model'}"
    return AttentionView(pats, np.asarray(tokens), token_labels=token_labels, labels=labels,
                         title=title, layer=layer, head=head, example=example)
