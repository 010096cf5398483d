"""The report as data (sections of paragraphs, tables and figures) and its two renderings, Markdown and
HTML: the same content, the HTML needing nothing but the image files beside it. In the HTML a collapsed
section (with its subsections) is a closed ``<details>`` element the reader opens; Markdown shows all."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """An image file, ``path`` relative to the run directory."""

    path: str
    caption: str


Block = str | Table | Figure
"""A paragraph (str), a table or a figure."""


@dataclass
class Section:
    """A heading (``level`` 2 or 3) and its blocks.

    ``collapsed``: in HTML, closed by default, with the subsections (higher level) that follow it;
    ``anchor``: the HTML ``id`` of the section, for links and for checking where it lies on the page.
    """

    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
    collapsed: bool = False
    anchor: str | None = None


def _md_row(cells: Sequence[str]) -> str:
    # A pipe inside a cell (|ΔV|) would split it: escaped as GitHub-flavoured Markdown expects.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append(_md_row(block.header))
                lines.append("|" + "---|" * len(block.header))
                lines += [_md_row(row) for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.path})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;color:#222}h1{margin:0 0 0.4em}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
    "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:90%;color:#555}"
    "#summary p{margin:0.4em 0}#summary h2{margin:0.3em 0}"
    "details{margin:0.3em 0}summary{cursor:pointer}summary h2,summary h3{display:inline}"
)


def _html_blocks(blocks: Sequence[Block]) -> list[str]:
    esc = html.escape
    parts = []
    for block in blocks:
        if isinstance(block, Table):
            parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header))
            parts.append("</tr></thead><tbody>")
            for row in block.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</tbody></table>")
        elif isinstance(block, Figure):
            parts.append(
                f'<figure><img src="{esc(block.path)}" alt="{esc(block.caption)}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
        else:
            parts.append(f"<p>{esc(block)}</p>")
    return parts


def render_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    open_details: list[int] = []  # the levels of the collapsed sections still open
    for section in sections:
        while open_details and section.level <= open_details[-1]:
            parts.append("</details>")
            open_details.pop()
        heading = f"<h{section.level}>{esc(section.title)}</h{section.level}>"
        anchor = f' id="{esc(section.anchor)}"' if section.anchor else ""
        if section.collapsed:
            parts.append(f"<details{anchor}><summary>{heading}</summary>")
            open_details.append(section.level)
            parts += _html_blocks(section.blocks)
        else:
            parts.append(f"<section{anchor}>{heading}")
            parts += _html_blocks(section.blocks)
            parts.append("</section>")
    parts += ["</details>"] * len(open_details)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
