"""An attribution graph in the browser: nodes by layer (rows: token embeddings at the bottom, the
transcoder features and error nodes of each layer, the logits on top) and position (columns),
edges drawn with a width by |weight| (red: positive, blue: negative). Hovering a node shows its
activation, influence and, for a feature, its top-activating examples; clicking a node keeps only
its edges in view (click it again to see all).

``GraphView`` reads the frontend JSON of ``tinyinterp.graphs.graph_json`` (the schema of the
public attribution-graph frontend); ``graph_view`` builds it from a ``PruneResult``.
"""
# ruff: noqa: E501 - the JavaScript below keeps one statement per line

from __future__ import annotations

from typing import Any

import numpy as np

from tinyinterp.views._labels import vocabulary
from tinyinterp.views._page import View

__all__ = ["GraphView", "graph_view"]

_CSS = """
.ti-graph svg{border:1px solid #ddd;background:#fff}
.ti-graph .ti-node{cursor:pointer}
.ti-graph .ti-node:hover{stroke:#000;stroke-width:2}
.ti-graph .ti-node.ti-picked{stroke:#000;stroke-width:3}
.ti-graph .ti-edge{pointer-events:none}
.ti-graph .ti-edge.ti-dim{opacity:0.04}
"""

_SCRIPT = r"""
var tip=T.tooltip(root), NS="http://www.w3.org/2000/svg", N=data.nodes, E=data.links;
root.appendChild(T.el("h2","ti-title",data.title));
root.appendChild(T.el("p","ti-sub",data.subtitle));
function svg(tag,attrs,parent){var e=document.createElementNS(NS,tag); for(var k in attrs) e.setAttribute(k,attrs[k]); if(parent) parent.appendChild(e); return e;}
var nPos=data.prompt_tokens.length, nRows=data.n_rows, colW=Math.max(56,Math.min(110,1100/Math.max(1,nPos))), rowH=84, ml=70, mt=24, mb=40;
var W=ml+nPos*colW+20, H=mt+nRows*rowH+mb;
var s=svg("svg",{width:W,height:H,role:"img"},root);
var cells={}; N.forEach(function(n,i){var k=n.row+"_"+n.ctx_idx; (cells[k]=cells[k]||[]).push(i);});
var xy=N.map(function(){return null;});
Object.keys(cells).forEach(function(k){var ids=cells[k];
  ids.forEach(function(i,j){var n=N[i]; var x=ml+n.ctx_idx*colW+colW*(j+1)/(ids.length+1); var y=mt+(nRows-1-n.row)*rowH+rowH/2; xy[i]=[x,y];});});
for(var r=0;r<nRows;r++){var t=svg("text",{x:4,y:mt+(nRows-1-r)*rowH+rowH/2+4,"font-size":11,fill:"#444"},s); t.textContent=data.row_names[r];}
data.prompt_tokens.forEach(function(tok,p){var t=svg("text",{x:ml+p*colW+colW/2,y:H-12,"font-size":11,"text-anchor":"middle",fill:"#222"},s); t.textContent=tok;});
var wmax=0; E.forEach(function(e){wmax=Math.max(wmax,Math.abs(e.weight));});
var eg=svg("g",{},s), ng=svg("g",{},s);
var lines=E.map(function(e,k){var a=xy[e.s], b=xy[e.t];
  var l=svg("line",{x1:a[0],y1:a[1],x2:b[0],y2:b[1],stroke:e.weight>=0?"#b2182b":"#2166ac","stroke-width":(0.4+3.6*Math.abs(e.weight)/(wmax||1)).toFixed(2),"stroke-opacity":0.55,"class":"ti-edge"},eg);
  l.setAttribute("data-source",N[e.s].node_id); l.setAttribute("data-target",N[e.t].node_id); return l;});
var picked=-1;
function describe(i){var n=N[i]; var lines=[n.label];
  if(n.activation!==null&&n.activation!==undefined) lines.push("activation: "+T.fmt(n.activation,4));
  if(n.influence!==null&&n.influence!==undefined) lines.push("influence (cumulative): "+T.fmt(n.influence,3));
  if(n.token_prob) lines.push("probability: "+T.fmt(n.token_prob,3));
  var nin=0,nout=0; E.forEach(function(e){if(e.t===i) nin++; if(e.s===i) nout++;});
  lines.push("edges in: "+nin+", out: "+nout);
  var ex=data.examples[n.key];
  if(ex&&ex.length){lines.push("top-activating examples:");
    ex.forEach(function(x){var parts=x.labels.map(function(l,j){return j===x.argmax?"["+l+"]":l;}); lines.push("  "+parts.join(" ")+"  (max "+T.fmt(x.max,3)+")");});}
  return lines.join("\n");}
N.forEach(function(n,i){var a=xy[i], c, el;
  if(n.kind==="feature"){c="#d95f02"; el=svg("circle",{cx:a[0],cy:a[1],r:6,fill:c},ng);}
  else if(n.kind==="error"){c="#999999"; el=svg("rect",{x:a[0]-6,y:a[1]-6,width:12,height:12,fill:c},ng);}
  else if(n.kind==="embedding"){c="#1b9e77"; el=svg("rect",{x:a[0]-8,y:a[1]-5,width:16,height:10,rx:3,fill:c},ng);}
  else {c="#7570b3"; el=svg("rect",{x:a[0]-8,y:a[1]-5,width:16,height:10,rx:3,fill:c},ng);
    var t=svg("text",{x:a[0],y:a[1]-9,"font-size":10,"text-anchor":"middle",fill:"#333"},ng); t.textContent=n.short;}
  el.setAttribute("class","ti-node"); el.setAttribute("data-node",n.node_id);
  el.addEventListener("mouseenter",function(ev){tip.show(describe(i),ev);});
  el.addEventListener("mouseleave",function(){tip.hide();});
  el.addEventListener("click",function(){picked=(picked===i)?-1:i;
    ng.querySelectorAll(".ti-picked").forEach(function(x){x.classList.remove("ti-picked");});
    if(picked>=0) el.classList.add("ti-picked");
    E.forEach(function(e,k){lines[k].classList.toggle("ti-dim",picked>=0&&e.s!==picked&&e.t!==picked);});});});
var legend=T.el("p","ti-note","orange circle: feature; grey square: error node; green: token; purple: logit. Edge width ~ |weight| (max "+T.fmt(wmax,3)+"); red positive, blue negative. Click a node to keep its edges.");
root.appendChild(legend);
"""


class GraphView(View):
    """The graph of ``graph_json`` (a dict in the frontend's schema). ``examples``: the output of
    ``tinyinterp.graphs.feature_examples`` (top-activating examples shown when a feature is
    hovered); ``token_labels``: a name per token id (or a Task) for those examples."""

    kind = "graph"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, graph: dict, *, examples: dict | None = None, token_labels: Any = None,
                 title: str | None = None):
        for key in ("metadata", "nodes", "links"):
            if key not in graph:
                raise ValueError(f"a graph JSON needs {key!r} (see tinyinterp.graphs.graph_json); "
                                 f"got keys {sorted(graph)}")
        self.graph, self.examples = graph, examples or {}
        self.vocab = vocabulary(token_labels)
        self.title = title or f"Attribution graph: {graph['metadata'].get('prompt', '')}"

    def _title(self) -> str:
        return self.title

    def _data(self) -> dict:
        nodes = self.graph["nodes"]
        feat_layers = sorted({int(n["layer"]) for n in nodes
                              if n["feature_type"] not in ("embedding", "logit")})
        n_layers = max([int(n["layer"]) for n in nodes if n["feature_type"] == "logit"] or
                       [max(feat_layers, default=-1) + 2]) - 1
        kinds = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
                 "embedding": "embedding", "logit": "logit"}
        index = {n["node_id"]: i for i, n in enumerate(nodes)}
        out_nodes = []
        for n in nodes:
            kind = kinds.get(n["feature_type"], "feature")
            row = {"embedding": 0, "logit": n_layers + 1}.get(kind, None)
            if row is None:
                row = int(n["layer"]) + 1
            key = ""
            if kind == "feature":
                layer, f, _ = n["node_id"].split("_")
                key = f"{layer}_{f}"
                label = f"feature {f} of layer {layer} at pos {n['ctx_idx']}"
            elif kind == "error":
                label = f"error node of layer {n['layer']} at pos {n['ctx_idx']}"
            elif kind == "embedding":
                label = (f"token {self.graph['metadata']['prompt_tokens'][n['ctx_idx']]!r} at pos "
                         f"{n['ctx_idx']}")
            else:
                label = n.get("clerp") or f"logit {n['feature']}"
            short = self.vocab[n["feature"]] if kind == "logit" and self.vocab else (
                str(n["feature"]) if kind == "logit" else "")
            out_nodes.append({"node_id": n["node_id"], "kind": kind, "row": row,
                              "ctx_idx": int(n["ctx_idx"]), "label": label, "key": key,
                              "activation": n.get("activation"), "influence": n.get("influence"),
                              "token_prob": n.get("token_prob", 0.0), "short": short})
        links = []
        for link in self.graph["links"]:
            if link["source"] not in index or link["target"] not in index:
                raise ValueError(f"link {link} names a node that is not in the graph")
            links.append({"s": index[link["source"]], "t": index[link["target"]],
                          "weight": float(link["weight"])})
        examples = {}
        for key, exs in self.examples.items():
            examples[key] = [{"labels": [self.vocab[t] if self.vocab else str(t)
                                         for t in e["tokens"]],
                              "argmax": int(np.argmax(e["acts"])), "max": float(e["max"])}
                             for e in exs]
        row_names = ["tokens"] + [f"layer {i}" for i in range(n_layers)] + ["logits"]
        n_feat = sum(n["kind"] == "feature" for n in out_nodes)
        n_err = sum(n["kind"] == "error" for n in out_nodes)
        sub = (f"{len(out_nodes)} nodes ({n_feat} features, {n_err} error nodes), {len(links)} "
               f"edges, node threshold {self.graph['metadata'].get('node_threshold')}. Hover a "
               "node for its values and top examples.")
        return {"title": self.title, "subtitle": sub, "nodes": out_nodes, "links": links,
                "prompt_tokens": list(self.graph["metadata"]["prompt_tokens"]),
                "n_rows": n_layers + 2, "row_names": row_names, "examples": examples}


def graph_view(pruned, *, examples: dict | None = None, token_labels: Any = None,
               title: str | None = None, **json_kwargs) -> GraphView:
    """A ``GraphView`` of a ``tinyinterp.graphs.PruneResult`` (its ``graph_json``)."""
    from tinyinterp.graphs import graph_json

    vocab = vocabulary(token_labels)
    return GraphView(graph_json(pruned, token_labels=vocab, **json_kwargs), examples=examples,
                     token_labels=vocab, title=title)
