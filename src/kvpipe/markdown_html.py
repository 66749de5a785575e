"""The Markdown the summaries are written in, rendered to a standalone HTML page for Snakemake's report.

Snakemake's HTML report shows images and HTML pages inline but offers Markdown only as a download,
so every ``summary.md`` / ``timing.md`` gets an ``.html`` twin that the report rules register
instead. The summaries use a small subset of Markdown, and this renders exactly that subset:

- ``#`` … ``######`` headings;
- pipe tables (a header row, a ``|---|`` separator row, body rows; ``\\|`` is a literal pipe in a cell,
  cells beyond the header's count are joined back into the last one, missing cells are left empty);
- ``-`` / ``*`` bullet lists and ``1.`` numbered lists (one line per item; a deeper indent nests);
- paragraphs (consecutive other lines), fenced code blocks (```````);
- inline: ``code spans`` and ``**bold**``. Single ``*`` and ``_`` stay literal: identifiers such as
  ``projected_k_own_v`` are common in the summaries and are never emphasis.

Everything else is escaped text. The output depends only on the input (no date, no version), so a
report rerun on the same tables writes the same bytes. Pure Python: no compute imports.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from kvpipe.io import atomic_path

STYLE = """body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;font-size:14px;line-height:1.45;
margin:1.2em;color:#1f2328;max-width:none}
h1{font-size:1.5em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.4em}
h3{font-size:1.1em}table{border-collapse:collapse;margin:.6em 0 1em;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
tr:nth-child(even) td{background:#fbfbfc}code{background:#eff1f3;padding:0 3px;border-radius:3px;font-size:90%}
pre{background:#f6f8fa;padding:8px;overflow:auto}"""

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_ITEM = re.compile(r"^(\s*)([-*]|\d+\.)\s+(.*)$")
_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*")


def inline(text: str) -> str:
    """Escaped text with code spans and bold rendered."""
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[pos:match.start()], quote=False))
        code, bold = match.groups()
        out.append(f"<code>{html.escape(code, quote=False)}</code>" if code is not None
                   else f"<strong>{inline(bold)}</strong>")
        pos = match.end()
    out.append(html.escape(text[pos:], quote=False))
    return "".join(out)


def split_row(line: str) -> list[str]:
    """The cells of a pipe-table row; ``\\|`` is a literal pipe, a code span may hold pipes."""
    cells, cell, in_code, i = [], [], False, 0
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line) and line[i + 1] == "|":
            cell.append("|")
            i += 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(cell).strip())
            cell = []
        else:
            cell.append(ch)
        i += 1
    cells.append("".join(cell).strip())
    return cells


def _table(rows: list[str]) -> list[str]:
    header = split_row(rows[0])
    width = len(header)

    def fit(cells: list[str]) -> list[str]:
        if len(cells) > width:   # unescaped pipes in the last cell's text
            cells = cells[: width - 1] + [" | ".join(cells[width - 1:])]
        return cells + [""] * (width - len(cells))

    out = ["<table>", "<thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in fit(split_row(row))) + "</tr>" for row in rows[2:]]
    return out + ["</tbody>", "</table>"]


def _list(items: list[tuple[int, str, str]]) -> list[str]:
    """Nested lists from (indent, marker, text) items."""
    out: list[str] = []
    stack: list[tuple[int, str]] = []   # (indent, tag) of the open lists
    for indent, marker, text in items:
        tag = "ol" if marker[0].isdigit() else "ul"
        while stack and (indent < stack[-1][0] or (indent == stack[-1][0] and tag != stack[-1][1])):
            out.append(f"</li></{stack.pop()[1]}>")   # a shallower item, or a list of the other kind
        if not stack or indent > stack[-1][0]:
            out.append(f"<{tag}><li>")
            stack.append((indent, tag))
        else:
            out.append("</li><li>")
        out.append(inline(text))
    while stack:
        out.append(f"</li></{stack.pop()[1]}>")
    return ["".join(out)]


def markdown_to_html(text: str) -> str:
    """The HTML body of a summary written in the subset of Markdown described above."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j]), quote=False) + "</code></pre>")
            i = j + 1
        elif match := _HEADING.match(line):
            level = len(match[1])
            out.append(f"<h{level}>{inline(match[2])}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out += _table(lines[i:j])
            i = j
        elif _ITEM.match(line):
            items = []
            while i < len(lines) and (match := _ITEM.match(lines[i])):
                items.append((len(match[1]), match[2], match[3]))
                i += 1
            out += _list(items)
        else:
            j = i + 1   # the first line is text whatever it starts with (e.g. a '|' line without a separator)
            while j < len(lines) and lines[j].strip() and not (_HEADING.match(lines[j]) or _ITEM.match(lines[j])
                                                                or lines[j].lstrip().startswith(("|", "```"))):
                j += 1
            out.append("<p>" + inline(" ".join(part.strip() for part in lines[i:j])) + "</p>")
            i = j
    return "\n".join(out) + "\n"


def page(text: str, title: str) -> str:
    """A standalone HTML page (inline style, no scripts) of a Markdown summary."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{markdown_to_html(text)}</body>\n</html>\n")


def write_page(markdown: Path, out: Path | None = None) -> Path:
    """Render a Markdown file to an HTML page beside it (same name, ``.html``), atomically; return its path."""
    markdown = Path(markdown)
    out = markdown.with_suffix(".html") if out is None else Path(out)
    text = markdown.read_text(encoding="utf-8")
    heading = next((m[2] for m in map(_HEADING.match, text.splitlines()) if m), markdown.stem)
    with atomic_path(out) as tmp:
        tmp.write_text(page(text, heading), encoding="utf-8")
    return out
