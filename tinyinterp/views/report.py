"""A reproduction's report as one HTML page: report.md rendered, its figures inlined as data URIs.

The reproductions (``tinyinterp reproduce ...``) write report.md with PNG figures beside it. This
renders the Markdown those reports use (headings, paragraphs, lists, tables, code, emphasis,
links, images) with a small converter written here, and inlines every local image, so the page
is one file that opens anywhere with no network. Remote images are never fetched: they become
links.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
import re
import warnings
from pathlib import Path

from tinyinterp.views._page import View

__all__ = ["ReportView", "markdown_to_html"]

_CSS = """
.ti-report{max-width:1000px;margin:0 auto}
.ti-report h1{font-size:22px;border-bottom:1px solid #ddd;padding-bottom:4px}
.ti-report h2{font-size:18px;margin-top:22px}.ti-report h3{font-size:15px}
.ti-report img{max-width:100%;height:auto;border:1px solid #eee;display:block;margin:6px 0}
.ti-report code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:12px}
.ti-report pre{background:#f6f6f6;padding:8px;overflow-x:auto}
.ti-report pre code{background:none;padding:0}
.ti-report table{border-collapse:collapse;margin:8px 0;font-size:12px}
.ti-report th,.ti-report td{border:1px solid #ccc;padding:3px 7px;text-align:left}
.ti-report th{background:#f4f4f4}
.ti-report .ti-missing{color:#b2182b;border:1px dashed #b2182b;padding:6px}
.ti-report nav.ti-toc{font-size:12px;background:#fafafa;border:1px solid #eee;padding:6px 10px}
"""

# the page needs no script of its own beyond marking itself ready (so tests can wait on it)
_SCRIPT = "var n=root.querySelectorAll('img').length; root.setAttribute('data-ti-images', n);"

_INLINE_CODE = re.compile(r"`([^`]+)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)(?:\s+\"([^\"]*)\")?\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")


def _inline(text: str, image) -> str:
    """Inline Markdown -> HTML: code spans first (their content is literal), then images, links,
    bold and italics on the escaped text."""
    parts = _INLINE_CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        out.append(f"<code>{html.escape(part)}</code>" if i % 2 else _inline_text(part, image))
    return "".join(out)


def _inline_text(part: str, image) -> str:
    stash: list[str] = []  # rendered images and links, kept out of the escaping

    def keep(s: str) -> str:
        stash.append(s)
        return f"\x00{len(stash) - 1}\x00"

    part = _IMAGE.sub(lambda m: keep(image(m.group(1), m.group(2))), part)
    part = _LINK.sub(lambda m: keep(_link(m.group(1), m.group(2))), part)
    part = html.escape(part)
    part = _BOLD.sub(r"<strong>\1</strong>", part)
    part = _ITALIC.sub(r"<em>\1</em>", part)
    return re.sub("\x00(\\d+)\x00", lambda m: stash[int(m.group(1))], part)


def _link(text: str, href: str) -> str:
    safe = href if re.match(r"^(https?:|#|[\w./-]+$)", href) else "#"
    return f'<a href="{html.escape(safe)}">{html.escape(text)}</a>'


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def markdown_to_html(text: str, image=None) -> str:
    """The Markdown of the reports as HTML. ``image(alt, src) -> html`` renders an image (default:
    a plain ``<img>``)."""
    image = image or (lambda alt, src: f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">')
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    slugs: dict[str, int] = {}

    def slug(t: str) -> str:
        s = re.sub(r"[^\w]+", "-", t.lower()).strip("-") or "section"
        slugs[s] = slugs.get(s, 0) + 1
        return s if slugs[s] == 1 else f"{s}-{slugs[s]}"

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.startswith("```"):
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            i += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(body))}</code></pre>")
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            n = len(m.group(1))
            title = m.group(2).strip()
            out.append(f'<h{n} id="{slug(title)}">{_inline(title, image)}</h{n}>')
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(
                r"^\s*\|?\s*:?-{2,}", lines[i + 1]):
            header = _cells(line)
            i += 2
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            th = "".join(f"<th>{_inline(c, image)}</th>" for c in header)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(c, image)}</td>" for c in r) + "</tr>"
                          for r in rows)
            out.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
            continue
        m = re.match(r"^(\s*)([-*+]|\d+\.)\s+(.*)$", line)
        if m:
            ordered = m.group(2)[0].isdigit()
            items = []
            while i < len(lines):
                m = re.match(r"^(\s*)([-*+]|\d+\.)\s+(.*)$", lines[i])
                if m:
                    items.append(m.group(3))
                elif lines[i].startswith("  ") and lines[i].strip() and items:
                    items[-1] += " " + lines[i].strip()  # a continued item
                else:
                    break
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(t, image)}</li>" for t in items)
                       + f"</{tag}>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(
                r"^(#{1,6}\s|```|\s*\|)", lines[i]) and not re.match(r"^\s*([-*+]|\d+\.)\s+",
                                                                       lines[i]):
            para.append(lines[i].strip())
            i += 1
        if not para:  # a line no rule took (e.g. a lone "|"): keep it as text
            para, i = [line.strip()], i + 1
        text = " ".join(para)
        body = _inline(text, image)
        out.append(body if _IMAGE.fullmatch(text) else f"<p>{body}</p>")
    return "\n".join(out)


class ReportView(View):
    """A reproduction's ``report.md`` as one self-contained page with its figures inlined.

    ``ReportView.from_dir(run_dir)`` reads ``run_dir/report.md``; ``ReportView(markdown,
    base_dir)`` renders any Markdown, resolving relative image paths against ``base_dir``. An
    image that is missing is shown as a marked gap (and a warning); ``missing`` lists them."""

    kind = "report"
    SCRIPT = _SCRIPT
    EXTRA_CSS = _CSS

    def __init__(self, markdown: str, base_dir: str | os.PathLike = ".", *,
                 title: str | None = None):
        self.markdown = markdown
        self.base_dir = Path(base_dir)
        m = re.search(r"^#\s+(.+)$", markdown, flags=re.M)
        self.title = title or (m.group(1).strip() if m else "Report")
        self.missing: list[str] = []
        self.images: list[str] = []
        self.body = markdown_to_html(markdown, self._image)
        if self.missing:
            warnings.warn(f"report figures not found in {self.base_dir}: {self.missing}",
                          stacklevel=2)

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike, *, title: str | None = None) -> ReportView:
        run_dir = Path(run_dir)
        md = run_dir / "report.md"
        if not md.is_file():
            raise FileNotFoundError(f"{run_dir} has no report.md (a run directory of `tinyinterp "
                                    "reproduce ...` has one)")
        return cls(md.read_text(encoding="utf-8"), run_dir, title=title)

    def _image(self, alt: str, src: str) -> str:
        if re.match(r"^[a-z]+:", src, flags=re.I) and not src.startswith("data:"):
            return f'<a href="{html.escape(src)}">{html.escape(alt or src)} (remote image, not loaded)</a>'
        if src.startswith("data:"):
            self.images.append(src[:30])
            return f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">'
        path = self.base_dir / src
        try:
            data = path.read_bytes()
        except OSError:
            self.missing.append(src)
            return f'<div class="ti-missing">missing figure: {html.escape(src)}</div>'
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.images.append(src)
        uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure style="margin:8px 0"><img alt="{html.escape(alt)}" src="{uri}">'
                f'<figcaption class="ti-note">{html.escape(alt)} ({html.escape(src)})</figcaption>'
                "</figure>")

    def _title(self) -> str:
        return self.title

    def _data(self) -> dict:
        return {"title": self.title}

    def fragment(self) -> str:
        # the rendered Markdown is static HTML; the base page adds the scoped CSS and script
        base = super().fragment()
        head, sep, tail = base.partition("<script type=\"application/json\"")
        return f"{head}<article>{self.body}</article>{sep}{tail}"
