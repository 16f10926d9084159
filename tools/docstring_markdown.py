r"""Docstring text -> GitHub Markdown: ``$$`` blocks become ``math`` fences, ``$...$`` becomes ``$`...`$``.

GitHub renders ```` ```math ```` fences and ``$`...`$`` reliably because
Markdown never touches their content (inside plain ``$$`` blocks it eats the
backslash of ``\\`` row breaks and of ``\{``). The formulas found are returned
too, so the tests can compile each one in KaTeX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Formula:
    tex: str
    display: bool


# Inline math: a `$` not escaped and not part of `$$`, content that neither
# starts nor ends with a space and does not cross a blank line.
INLINE_MATH = re.compile(
    r"(?<![\\$])\$(?!\$)(?=\S)((?:\\.|[^$\\\n]|\n(?![ \t]*\n))+?)(?<=\S)(?<!\\)\$(?!\$)"
)
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")
ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|mod|obj|exc|data):`~?([^`]+)`")


def _convert_inline(text: str, formulas: list[Formula], link) -> str:
    """Inline math -> ``$`tex`$``; Sphinx roles -> code (linked when a page exists); code spans untouched."""
    def role(match: re.Match) -> str:
        target = match.group(2)
        short = target.split(".")[-1] if "~" in match.group(0) else target
        return link(target, short)

    text = ROLE.sub(role, text)  # before code spans: a role's backticks are not one
    pieces, last = [], 0
    for match in CODE_SPAN.finditer(text):
        pieces.append(_convert_plain(text[last:match.start()], formulas, link))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_convert_plain(text[last:], formulas, link))
    return "".join(pieces)


def _convert_plain(text: str, formulas: list[Formula], link) -> str:
    def math(match: re.Match) -> str:
        tex = re.sub(r"\s*\n\s*", " ", match.group(1))
        formulas.append(Formula(tex, display=False))
        return f"$`{tex}`$"

    return INLINE_MATH.sub(math, text)


def _dedent(lines: list[str]) -> list[str]:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return [line[cut:].rstrip() for line in lines]


def convert(text: str, link=None) -> tuple[str, list[Formula]]:
    """Docstring text -> (GitHub Markdown, the formulas in it, in order).

    ``$$`` blocks (the delimiters on lines of their own, or ``$$ tex $$`` on one
    line) become ``math`` fences; RST ``::`` literal blocks become code fences;
    everything else goes through :func:`_convert_inline` paragraph by paragraph.
    """
    link = link or (lambda target, short: f"`{short}`")
    formulas: list[Formula] = []
    out: list[str] = []
    paragraph: list[str] = []
    lines = text.splitlines()

    def flush() -> None:
        if paragraph:
            out.append(_convert_inline("\n".join(paragraph), formulas, link))
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("$$"):
            flush()
            indent = line[: len(line) - len(line.lstrip())]
            if len(stripped) > 4 and stripped.endswith("$$"):  # $$ tex $$ on one line
                body = [stripped[2:-2].strip()]
                i += 1
            else:
                body, i = [stripped[2:]] if stripped[2:].strip() else [], i + 1
                while i < len(lines) and not lines[i].strip().endswith("$$"):
                    body.append(lines[i])
                    i += 1
                if i == len(lines):
                    raise ValueError("unclosed $$ block:\n" + "\n".join(body))
                tail = lines[i].strip()[:-2]
                if tail.strip():
                    body.append(tail)
                i += 1
            body = [b for b in _dedent(body)]
            while body and not body[0].strip():
                body.pop(0)
            while body and not body[-1].strip():
                body.pop()
            formulas.append(Formula("\n".join(body), display=True))
            out.append("\n".join([indent + "```math", *(indent + b if b else "" for b in body), indent + "```"]))
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            # An RST literal block: the indented lines after a blank line.
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            base = len(line) - len(line.lstrip())
            block = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
                block.append(lines[j])
                j += 1
            if block:
                paragraph.append(line.rstrip()[:-1] if not stripped == "::" else "")
                flush()
                while block and not block[-1].strip():
                    block.pop()
                out.append("\n".join(["```python", *_dedent(block), "```"]))
                i = j
                continue
        if not stripped:
            flush()
            out.append("")
        else:
            if LIST_ITEM.match(line) and paragraph and not LIST_ITEM.match(paragraph[0]):
                # A list right under a line of text: GitHub starts the list, Python-Markdown (the
                # site) would run it into the paragraph unless a blank line separates them.
                flush()
                out.append("")
            paragraph.append(line.rstrip())
        i += 1
    flush()
    markdown = "\n".join(out)
    markdown = re.sub(r"\n{3,}", "\n\n", markdown).strip("\n")
    return markdown, formulas




FENCE_LINE = re.compile(r"^\s*(`{3,}|~{3,})")


def unbalanced_backticks(markdown: str) -> list[str]:
    """The paragraphs of ``markdown`` (outside fenced blocks) with a backtick that opens no closed code span.

    Empty when every code span is closed: what a garbled page (```` ```{name`: ...`` ````) fails.
    """
    paragraphs, current, fence = [], [], None
    for line in markdown.split("\n"):
        match = FENCE_LINE.match(line)
        if fence is None and match:
            fence = match.group(1)
            paragraphs.append("\n".join(current))
            current = []
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        elif not line.strip():
            paragraphs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    paragraphs.append("\n".join(current))
    if fence is not None:
        paragraphs.append(f"an unclosed {fence} fence")
    return [p for p in paragraphs if p.startswith("an unclosed") or _unclosed_run(p)]


def _unclosed_run(paragraph: str) -> bool:
    """True when a run of backticks opens no code span: as in CommonMark, a run of n backticks
    is closed only by the next run of exactly n, and a run that nothing closes shows as itself."""
    runs = [(m.start(), len(m.group())) for m in re.finditer(r"`+", paragraph)]
    i = 0
    while i < len(runs):
        start, length = runs[i]
        if start > 0 and paragraph[start - 1] == "\\":  # an escaped backtick, outside any span
            i += 1
            continue
        closing = next((j for j in range(i + 1, len(runs)) if runs[j][1] == length), None)
        if closing is None:
            return True
        i = closing + 1
    return False
