"""SAE features in the browser: each feature's top-activating examples with every token shaded by
the feature's activation on it, and the histogram of its activations.

``FeatureView`` takes activations you already have ([batch, pos] per feature); ``feature_view``
runs a model and a sparse autoencoder (``tinyinterp.sae``) on tokens first. Only what is shown
travels in the page (the top examples' tokens and activations, and the histogram's counts).
"""
# ruff: noqa: E501 - the JavaScript below keeps one statement per line


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tinyinterp.views._labels import position_labels
from tinyinterp.views._page import View, b64_f32

__all__ = ["FeatureView", "feature_view"]

_CSS = """
.ti-features .ti-examples{display:flex;flex-direction:column;gap:3px;margin:6px 0}
.ti-features .ti-example{display:flex;flex-wrap:wrap;align-items:center;gap:1px;font-size:12px}
.ti-features .ti-example .ti-rank{width:150px;color:#555;font-size:11px;white-space:nowrap}
.ti-features .ti-ftok{padding:1px 3px;border-radius:2px;border:1px solid transparent;cursor:default;
  white-space:pre}
.ti-features .ti-ftok.ti-max{border-color:#b2182b}
.ti-features .ti-ftok:hover{outline:2px solid #000}
.ti-features svg .ti-bar:hover{fill:#b2182b}
"""

_SCRIPT = r"""
var tip=T.tooltip(root), DARK=[217,95,2], F=data.features;
root.appendChild(T.el("h2","ti-title",data.title));
root.appendChild(T.el("p","ti-sub",data.subtitle));
var controls=T.el("div","ti-controls"); root.appendChild(controls);
var st={f:0};
if(F.length>1){ var lab=T.el("label","","feature "); var sel=T.el("select","ti-feature");
  F.forEach(function(f,i){var o=T.el("option","",String(f.index)); o.value=i; sel.appendChild(o);});
  sel.onchange=function(){st.f=+sel.value; draw();}; lab.appendChild(sel); controls.appendChild(lab);}
var head=T.el("h3"); head.style.margin="6px 0"; root.appendChild(head);
var stats=T.el("p","ti-sub"); root.appendChild(stats);
root.appendChild(T.el("div","ti-axis","Top-activating examples (shade: activation / the feature's maximum; red box: the maximum token)"));
var ex=T.el("div","ti-examples"); root.appendChild(ex);
var cbar=T.el("div"); root.appendChild(cbar);
root.appendChild(T.el("div","ti-axis","Activation histogram (tokens where the feature fires)"));
var hist=T.el("div","ti-hist"); root.appendChild(hist);
var NS="http://www.w3.org/2000/svg";
function svg(tag,attrs,parent){var e=document.createElementNS(NS,tag); for(var k in attrs) e.setAttribute(k,attrs[k]); if(parent) parent.appendChild(e); return e;}
function draw(){ var f=F[st.f], A=T.f32(f.acts), mx=f.max>0?f.max:1;
  head.textContent="Feature "+f.index;
  stats.textContent="fires on "+f.n_active+" of "+f.n_tokens+" tokens ("+(100*f.n_active/Math.max(1,f.n_tokens)).toFixed(2)+"%), max activation "+T.fmt(f.max,4)+", mean when firing "+T.fmt(f.mean_active,4);
  ex.innerHTML="";
  f.examples.forEach(function(e,i){ var row=T.el("div","ti-example"); row.setAttribute("data-example",e.row);
    row.appendChild(T.el("span","ti-rank","#"+(i+1)+" seq "+e.row+" (max "+T.fmt(e.max,3)+")"));
    for(var j=0;j<e.labels.length;j++){ var a=A[e.offset+j], c=T.seqRGB(a/mx,DARK), s=T.el("span","ti-ftok",e.labels[j]);
      s.style.background="rgb("+c[0]+","+c[1]+","+c[2]+")"; s.style.color=T.textColor(c);
      if(e.start+j===e.argmax) s.classList.add("ti-max");
      (function(j,a){s.addEventListener("mouseenter",function(ev){tip.show("feature "+f.index+", seq "+e.row+"\ntoken: "+JSON.stringify(e.labels[j])+" (pos "+(e.start+j)+")\nactivation: "+T.fmt(a,4),ev);});
       s.addEventListener("mouseleave",function(){tip.hide();});})(j,a);
      row.appendChild(s);} ex.appendChild(row); });
  if(!f.examples.length) ex.appendChild(T.el("div","ti-note","this feature never fires on these tokens"));
  cbar.innerHTML=""; cbar.appendChild(T.colorbar("sequential",0,mx,"activation",DARK));
  hist.innerHTML=""; var W=520,H=180,ml=48,mb=34,mt=8,mr=10, n=f.hist.counts.length;
  var s=svg("svg",{width:W,height:H,role:"img"},hist), cmax=Math.max(1,Math.max.apply(null,f.hist.counts));
  var bw=(W-ml-mr)/Math.max(1,n);
  f.hist.counts.forEach(function(cnt,i){ var h=(H-mb-mt)*cnt/cmax;
    var r=svg("rect",{x:ml+i*bw,y:H-mb-h,width:Math.max(1,bw-1),height:Math.max(cnt>0?1:0,h),fill:"#d95f02","class":"ti-bar"},s);
    r.setAttribute("data-bin",i);
    r.addEventListener("mouseenter",function(ev){tip.show("activation "+T.fmt(f.hist.edges[i],3)+" to "+T.fmt(f.hist.edges[i+1],3)+"\ntokens: "+cnt,ev);});
    r.addEventListener("mouseleave",function(){tip.hide();}); });
  svg("line",{x1:ml,y1:H-mb,x2:W-mr,y2:H-mb,stroke:"#333"},s); svg("line",{x1:ml,y1:mt,x2:ml,y2:H-mb,stroke:"#333"},s);
  function txt(x,y,t,anchor,extra){var e=svg("text",Object.assign({x:x,y:y,"font-size":10,"text-anchor":anchor||"middle",fill:"#333"},extra||{}),s); e.textContent=t; return e;}
  if(n){ txt(ml,H-mb+12,T.fmt(f.hist.edges[0],2)); txt(W-mr,H-mb+12,T.fmt(f.hist.edges[n],2),"end"); }
  txt(ml-4,H-mb,"0","end"); txt(ml-4,mt+8,String(cmax),"end");
  txt((ml+W-mr)/2,H-6,"activation");
  txt(12,(H-mb)/2,"tokens",undefined,{transform:"rotate(-90 12 "+((H-mb)/2)+")"}); }
draw();
"""


class FeatureView(View):
    """Top-activating examples and the activation histogram of one or more features.

    ``activations``: [batch, pos] for one feature, or [batch, pos, feature] with ``features``
    naming which feature indices to show (default: all of the last axis, at most 32); ``tokens``
    [batch, pos] with ``token_labels`` (a name per id, or a Task) or ``labels`` [batch][pos] name
    the tokens. ``n_examples`` sequences are shown per feature (those with the largest maximum),
    each as a window of ``context`` tokens either side of its maximum (None: the whole sequence).
    The histogram counts the tokens where the feature is above 0, in ``bins`` bins."""

    kind = "features"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, activations: Any, tokens: Any = None, *, features: Sequence[int] | None = None,
                 token_labels: Any = None, labels: Sequence[Sequence[str]] | None = None,
                 n_examples: int = 10, context: int | None = 12, bins: int = 30,
                 title: str | None = None, feature_names: Sequence[int] | None = None):
        a = np.asarray(activations, np.float32)
        if a.ndim == 2:
            a = a[..., None]
            features = [0]
            names = list(feature_names) if feature_names is not None else [0]
        elif a.ndim == 3:
            if features is None:
                if a.shape[-1] > 32:
                    raise ValueError(f"{a.shape[-1]} features: pick at most 32 with features=[...]")
                features = list(range(a.shape[-1]))
            names = list(feature_names) if feature_names is not None else list(features)
            if len(names) != len(features):
                raise ValueError(f"{len(feature_names)} feature_names for {len(features)} features")
        else:
            raise ValueError("activations must be [batch, pos] (one feature) or [batch, pos, "
                             f"feature], got shape {a.shape}")
        n_batch, n_pos = a.shape[:2]
        for f in features:
            if not 0 <= int(f) < a.shape[-1]:
                raise ValueError(f"feature {f} is out of range: there are {a.shape[-1]}")
        if n_examples < 1 or bins < 1:
            raise ValueError(f"n_examples and bins must be >= 1, got {n_examples}, {bins}")
        self.labels = position_labels(tokens, n_batch, n_pos, token_labels, labels)
        self.acts = a[..., [int(f) for f in features]]  # [batch, pos, shown]
        self.names = [int(n) for n in names]
        self.n_examples, self.context, self.bins = int(n_examples), context, int(bins)
        self.title = title or "SAE features"

    def _title(self) -> str:
        return self.title

    def _feature(self, i: int) -> dict:
        a = self.acts[..., i]  # [batch, pos]
        n_batch, n_pos = a.shape
        finite = np.where(np.isfinite(a), a, 0.0)
        row_max = finite.max(axis=1)  # [batch]
        order = [int(r) for r in np.argsort(-row_max, kind="stable") if row_max[r] > 0]
        order = order[: self.n_examples]
        examples, chunks, offset = [], [], 0
        for r in order:
            arg = int(np.argmax(finite[r]))
            lo, hi = (0, n_pos) if self.context is None else (
                max(0, arg - self.context), min(n_pos, arg + self.context + 1))
            examples.append({"row": r, "start": lo, "argmax": arg, "max": float(row_max[r]),
                             "labels": self.labels[r][lo:hi], "offset": offset})
            chunks.append(finite[r, lo:hi])
            offset += hi - lo
        active = finite[finite > 0]
        if active.size:
            counts, edges = np.histogram(active, bins=self.bins,
                                         range=(0.0, float(active.max())))
        else:
            counts, edges = np.zeros(0, int), np.zeros(1)
        return {"index": self.names[i], "examples": examples,
                "acts": b64_f32(np.concatenate(chunks) if chunks else np.zeros(0)),
                "max": float(finite.max()) if finite.size else 0.0,
                "mean_active": float(active.mean()) if active.size else 0.0,
                "n_active": int(active.size), "n_tokens": int(a.size),
                "hist": {"counts": counts.astype(int).tolist(),
                         "edges": [float(e) for e in edges]}}

    def _data(self) -> dict:
        n_batch, n_pos = self.acts.shape[:2]
        sub = (f"{len(self.names)} feature{'s' if len(self.names) != 1 else ''} on {n_batch} "
               f"sequences of {n_pos} tokens. Hover a token or a bar for its value.")
        return {"title": self.title, "subtitle": sub,
                "features": [self._feature(i) for i in range(len(self.names))]}


def feature_view(model, sae_params, tokens: Any, hook_name: str, features: Sequence[int], *,
                 sae_cfg=None, token_labels: Any = None, title: str | None = None,
                 **kwargs) -> FeatureView:
    """Run ``model`` on ``tokens`` [batch, pos], encode ``hook_name``'s activations with the SAE
    (``tinyinterp.sae.encode``; pass ``sae_cfg`` for TopK/JumpReLU) and view ``features``."""
    import jax.numpy as jnp

    from tinyinterp import sae

    tokens = jnp.asarray(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
    x = jnp.asarray(cache[hook_name], jnp.float32)  # [batch, pos, d_in]
    b, p = x.shape[:2]
    f = sae.encode(sae_params, x.reshape(b * p, -1), cfg=sae_cfg)  # [batch * pos, feature]
    acts = np.asarray(f).reshape(b, p, -1)[..., list(features)]  # [batch, pos, shown]
    return FeatureView(acts, np.asarray(tokens), token_labels=token_labels,
                       title=title or f"SAE features at {hook_name}",
                       features=list(range(len(features))), feature_names=list(features),
                       **kwargs)
