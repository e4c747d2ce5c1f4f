"""The page every view shares: a scoped fragment (CSS, data, script) for Jupyter and a whole
document for ``save``; nothing is fetched when it is shown.

A view is one ``<div class="ti-view">`` with a unique id. Its data travels as JSON in a
``<script type="application/json">`` inside it, its script finds its own root by that id, and
every CSS rule is scoped under ``.ti-view``: several views can sit in one notebook (or one page)
without touching each other. Arrays of many numbers travel base64-encoded (float32, or uint16 for
values in [0, 1]) rather than as JSON text, which keeps a 64-token attention view small.
"""

from __future__ import annotations

import base64
import html
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# Red for positive, blue for negative, white at 0: matplotlib's RdBu_r, as in tinyinterp.plotting.
DIVERGING_STOPS = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
                   "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"]

CSS = """
.ti-view{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;
  background:#fff;padding:10px 12px;box-sizing:border-box;max-width:100%;overflow-x:auto}
.ti-view *{box-sizing:border-box}
.ti-view h2.ti-title{font-size:16px;margin:0 0 4px 0}
.ti-view .ti-sub{color:#555;margin:0 0 8px 0;font-size:12px}
.ti-view .ti-controls{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin:6px 0}
.ti-view select,.ti-view button{font:inherit}
.ti-view .ti-tip{position:fixed;pointer-events:none;background:rgba(20,20,20,.92);color:#fff;
  padding:4px 7px;border-radius:4px;font-size:12px;white-space:pre;z-index:10000;display:none}
.ti-view .ti-cbar{display:flex;align-items:center;gap:6px;font-size:11px;color:#333;margin:8px 0}
.ti-view .ti-cbar .ti-ramp{width:180px;height:10px;border:1px solid #aaa}
.ti-view .ti-axis{font-size:11px;color:#444}
.ti-view table.ti-table{border-collapse:collapse;margin:6px 0}
.ti-view table.ti-table th,.ti-view table.ti-table td{border:1px solid #ccc;padding:3px 6px;text-align:left}
.ti-view .ti-note{color:#666;font-size:11px}
"""

# Shared helpers, defined once per page (the first view on a page defines window.tinyinterpViews).
JS_LIB = """
window.tinyinterpViews = window.tinyinterpViews || (function(){
  var STOPS = __STOPS__;
  function hex(c){return [parseInt(c.slice(1,3),16),parseInt(c.slice(3,5),16),parseInt(c.slice(5,7),16)];}
  var RGB = STOPS.map(hex);
  function mix(a,b,t){return [0,1,2].map(function(i){return Math.round(a[i]+(b[i]-a[i])*t);});}
  function rgb(c){return "rgb("+c[0]+","+c[1]+","+c[2]+")";}
  var T = {};
  T.b64 = function(s){var bin=atob(s), out=new Uint8Array(bin.length);
    for(var i=0;i<bin.length;i++) out[i]=bin.charCodeAt(i); return out.buffer;};
  T.f32 = function(s){return new Float32Array(T.b64(s));};
  T.u8 = function(s){var u=new Uint8Array(T.b64(s)), f=new Float32Array(u.length);
    for(var i=0;i<u.length;i++) f[i]=u[i]/255; return f;};
  T.u16 = function(s){var u=new Uint16Array(T.b64(s)), f=new Float32Array(u.length);
    for(var i=0;i<u.length;i++) f[i]=u[i]/65535; return f;};
  // diverging colour centred at 0: v in [-m, m]
  T.diverging = function(v,m){ if(!isFinite(v)) return "#dddddd";
    var t=m>0?Math.max(-1,Math.min(1,v/m)):0; var x=(t+1)/2*(RGB.length-1);
    var i=Math.min(Math.floor(x),RGB.length-2); return rgb(mix(RGB[i],RGB[i+1],x-i));};
  T.divergingRGB = function(v,m){var t=m>0?Math.max(-1,Math.min(1,v/m)):0; var x=(t+1)/2*(RGB.length-1);
    var i=Math.min(Math.floor(x),RGB.length-2); return mix(RGB[i],RGB[i+1],x-i);};
  // sequential colour for t in [0, 1]: white -> the given dark colour
  T.seqRGB = function(t,dark){t=Math.max(0,Math.min(1,t));return mix([255,255,255],dark,t);};
  T.seq = function(t,dark){return rgb(T.seqRGB(t,dark));};
  T.textColor = function(c){return (0.299*c[0]+0.587*c[1]+0.114*c[2])<140?"#fff":"#111";};
  T.fmt = function(v,d){ if(v===null||!isFinite(v)) return "n/a"; d=d===undefined?3:d;
    var a=Math.abs(v); if(a!==0&&(a<Math.pow(10,-d)||a>=1e5)) return v.toExponential(2);
    return v.toFixed(d);};
  T.signed = function(v,d){var s=T.fmt(v,d); return (v>0?"+":"")+s;};
  T.el = function(tag,cls,text){var e=document.createElement(tag); if(cls) e.className=cls;
    if(text!==undefined) e.textContent=text; return e;};
  T.tooltip = function(root){var tip=T.el("div","ti-tip"); root.appendChild(tip);
    return {show:function(text,ev){tip.textContent=text; tip.style.display="block";
        var x=ev.clientX+14, y=ev.clientY+14, w=tip.offsetWidth, h=tip.offsetHeight;
        if(x+w>window.innerWidth-4) x=Math.max(4,ev.clientX-w-10);
        if(y+h>window.innerHeight-4) y=Math.max(4,ev.clientY-h-10);
        tip.style.left=x+"px"; tip.style.top=y+"px";},
      hide:function(){tip.style.display="none";}, el:tip};};
  // a colour bar: kind "diverging" (from -m to m, 0 in the middle) or "sequential" (lo..hi)
  T.colorbar = function(kind,lo,hi,label,dark){var bar=T.el("div","ti-cbar");
    var ramp=T.el("canvas","ti-ramp"); ramp.width=180; ramp.height=1; var g=ramp.getContext("2d");
    var img=g.createImageData(180,1);
    for(var i=0;i<180;i++){var t=i/179; var c= kind==="diverging"?T.divergingRGB(2*t-1,1):T.seqRGB(t,dark);
      img.data[4*i]=c[0];img.data[4*i+1]=c[1];img.data[4*i+2]=c[2];img.data[4*i+3]=255;}
    g.putImageData(img,0,0);
    bar.appendChild(T.el("span","ti-cbar-lo",T.fmt(lo)));
    bar.appendChild(ramp);
    bar.appendChild(T.el("span","ti-cbar-hi",T.fmt(hi)));
    if(kind==="diverging") bar.appendChild(T.el("span","ti-note","(white = 0)"));
    if(label) bar.appendChild(T.el("span","ti-axis",label));
    return bar;};
  T.views = {};
  return T;
})();
""".replace("__STOPS__", json.dumps(DIVERGING_STOPS))


def b64_f32(x: Any) -> str:
    """float32 little-endian bytes of ``x`` (flattened, C order), base64."""
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def b64_u16_unit(x: Any) -> str:
    """Values in [0, 1] quantised to uint16 (error <= 7.7e-6), base64: half of float32's size."""
    q = np.rint(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 65535.0).astype("<u2")
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


def b64_u8_unit(x: Any) -> str:
    """Values in [0, 1] quantised to uint8 (error <= 0.002), base64: a quarter of float32's."""
    q = np.rint(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


def json_for_script(data: Any) -> str:
    """JSON safe inside a <script> element (no "</script>", no "<!--")."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def finite_or_none(x: Any) -> Any:
    """Nested lists of floats with NaN/inf as None (JSON has no NaN)."""
    arr = np.asarray(x, np.float64)
    out = np.where(np.isfinite(arr), arr, np.nan).tolist()

    def fix(v):
        if isinstance(v, list):
            return [fix(u) for u in v]
        return None if v != v else v

    return fix(out)


class View:
    """Base of every view: ``html()`` (a whole document), ``_repr_html_()`` (a fragment for
    Jupyter), ``save(path)``. Subclasses set ``kind`` and ``SCRIPT`` (a JS function body run as
    ``function(root, data, T)``) and implement ``_data()`` and ``_title()``."""

    kind = "view"
    SCRIPT = ""
    EXTRA_CSS = ""

    def _data(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _title(self) -> str:
        return "tinyinterp view"

    def fragment(self) -> str:
        """The view as one self-contained ``<div>`` (CSS, data and script inside it)."""
        uid = "ti-" + uuid.uuid4().hex[:12]
        data = json_for_script(self._data())
        script = (JS_LIB + "\n(function(){var root=document.getElementById(" + json.dumps(uid)
                  + ");if(!root||root.getAttribute('data-ti-ready'))return;"
                  "var data=JSON.parse(root.querySelector('script.ti-data').textContent);"
                  "(function(root,data,T){\n" + self.SCRIPT + "\n})(root,data,window.tinyinterpViews);"
                  "root.setAttribute('data-ti-ready','1');})();")
        return (f'<div class="ti-view ti-{self.kind}" id="{uid}">'
                f"<style>{CSS}{self.EXTRA_CSS}</style>"
                f'<script type="application/json" class="ti-data">{data}</script>'
                f"<script>{script}</script></div>")

    def html(self) -> str:
        """A whole HTML document holding the view; opens from disk with no network."""
        title = html.escape(self._title())
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{title}</title><style>body{{margin:0;background:#fff}}</style></head>"
                f"<body>{self.fragment()}</body></html>\n")

    def _repr_html_(self) -> str:
        return self.fragment()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole document to ``path`` atomically (a temp file renamed into place, never
        half-written) and return the path. The folder must exist."""
        from tinyinterp.reproduce._io import write_atomic

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name such as "
                                    f"{path / (self.kind + '.html')}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the view to {path}: the folder {path.parent} "
                                    "does not exist")
        write_atomic(path, self.html())
        return path

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self._title()}>"
