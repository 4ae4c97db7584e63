"""Render report sections to one self-contained HTML file and to Markdown.

The HTML has inline CSS and figures as base64 ``data:`` URIs: it opens offline, can be mailed
or attached to a paper review, and never fetches anything (no scripts, fonts or CDNs).
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class FigureRef:
    path: Path  # PNG inside the report directory
    caption: str = ""


@dataclass
class Para:
    text: str
    note: bool = False  # rendered muted (e.g. "no data" explanations)


Block = Union[Table, FigureRef, Para]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
p.note { color: #777; font-style: italic; }
nav ul { columns: 2; font-size: .9em; }
""".strip()


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def anchor(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def html_table(t: Table) -> str:
    cap = f"<caption>{esc(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(p)}</p>" for p in intro]
    parts.append("<nav><ul>" + "".join(f'<li><a href="#{anchor(s.title)}">{esc(s.title)}</a></li>'
                                       for s in sections) + "</ul></nav>")
    for s in sections:
        parts.append(f'<section id="{anchor(s.title)}"><h2>{esc(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(html_table(b))
            elif isinstance(b, FigureRef):
                parts.append(f'<figure><img src="{data_uri(b.path)}" alt="{esc(b.caption or b.path.name)}">'
                             f"<figcaption>{esc(b.caption)}</figcaption></figure>")
            else:
                parts.append(f'<p class="note">{esc(b.text)}</p>' if b.note else f"<p>{esc(b.text)}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def md_text(text: object) -> str:
    """Markdown renders inline HTML: escape it so names like ``<b>`` show literally."""
    return html.escape(str(text), quote=False)


def md_cell(text: object) -> str:
    return md_text(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    """Markdown twin of the HTML; figures are linked as PNG files next to report.md."""
    out = [f"# {md_text(title)}", ""] + [md_text(p) + "\n" for p in intro]
    for s in sections:
        out += [f"## {md_text(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                if b.caption:
                    out += [f"**{md_cell(b.caption)}**", ""]
                out += [markdown_table(b.header, b.rows), ""]
            elif isinstance(b, FigureRef):
                out += [f"![{md_cell(b.caption or b.path.name)}]({b.path.name})", ""]
            else:
                out += [f"> {md_text(b.text)}" if b.note else md_text(b.text), ""]
    return "\n".join(out).rstrip() + "\n"
