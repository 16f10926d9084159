r"""MkDocs hooks: let the site read the same Markdown that GitHub renders, and browse from disk.

* Inline math is written ``$`tex`$`` (GitHub's form, safe from Markdown
  escapes); arithmatex reads ``$tex$``, so the backticks are dropped here.
  (Display math needs nothing: ``math`` fences are a superfences custom fence.)
* Links out of ``docs/`` to the repository's files (``../../mnn/layers/linear.py#L13``,
  which GitHub follows) point, in the site, at a highlighted copy of that file
  that the site carries (``source/mnn/layers/linear.py.html#L13``, one anchor per
  line), so a "defined at" link works offline too.
* A page's title is its first ``# heading`` (the generated pages open with
  HTML comments, after which MkDocs would fall back to the file name).
* The nav entry ``api/index.md`` grows into the whole API reference, one
  section per module (``layers.linear``, ``io.weights``, ...) in the order of
  the index, read from the ``<!-- module: ... -->`` mark of each page.
"""

from __future__ import annotations

import html
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_for_filename
from pygments.util import ClassNotFound

INLINE_GITHUB_MATH = re.compile(r"\$`([^`]+)`\$")
OUTSIDE_LINK = re.compile(r"\[([^\]]+)\]\((?:\.\./)+((?:mnn|tools|tests)/[^)#\s]*)(#L\d+)?\)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
MODULE_MARK = re.compile(r"<!-- module: ([\w.]+) -->")
H1 = re.compile(r"^# (.+)$", re.M)
SOURCE_DIR = "source"  # the site's copies of the repository files the pages link to
PACKAGE_PREFIX = "mnn."


def _repository(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _outside_markdown(markdown: str, convert) -> str:
    """Apply ``convert`` to the text outside fenced code blocks."""
    out, chunk, fence = [], [], None
    for line in markdown.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            out.append(convert("\n".join(chunk)))
            chunk, fence = [], match.group(2)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if line.strip().startswith(fence[0] * len(fence)) and line.strip().strip(fence[0]) == "":
                fence = None
        else:
            chunk.append(line)
    out.append(convert("\n".join(chunk)))
    return "\n".join(part for part in out)


def source_page(path: str, text: str) -> str:
    """A standalone HTML page of one repository file, line ``n`` at ``#Ln``."""
    try:
        lexer = get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = None
    body = highlight(text, lexer, HtmlFormatter(nowrap=True)) if lexer else html.escape(text)
    lines = body.rstrip("\n").split("\n")
    width = len(str(len(lines)))
    rows = "\n".join(f'<span class="line" id="L{n}"><a class="lineno" href="#L{n}">{n:>{width}}</a>  {line}</span>'
                     for n, line in enumerate(lines, start=1))
    home = "../" * path.count("/") + "../index.html"
    styles = HtmlFormatter().get_style_defs(".highlight")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(path)}</title>
<style>
body {{ margin: 1em 2em; font-family: sans-serif; }}
pre {{ line-height: 1.35; font-size: 13px; }}
.line {{ display: block; }}
.line:target {{ background: #fff3b0; }}
.lineno {{ color: #999; text-decoration: none; user-select: none; }}
{styles}
</style></head>
<body><p><a href="{home}">mnn documentation</a> / <code>{html.escape(path)}</code></p>
<pre class="highlight">{rows}</pre>
</body></html>
"""


def _linked_files(docs: Path) -> set[str]:
    linked = set()
    for path in docs.rglob("*.md"):
        linked.update(match.group(2) for match in OUTSIDE_LINK.finditer(path.read_text()))
    return linked


def on_files(files, config):
    """Add a highlighted copy of every repository file a page links to, under ``source/``."""
    repository = _repository(config)
    for relative in sorted(_linked_files(Path(config["docs_dir"]))):
        path = repository / relative
        if path.is_file():
            content = source_page(relative, path.read_text())
            files.append(File.generated(config, f"{SOURCE_DIR}/{relative}.html", content=content))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    repository = _repository(config)
    here = posixpath.dirname(page.file.src_uri)

    def link(match: re.Match) -> str:
        text, path, anchor = match.group(1), match.group(2), match.group(3) or ""
        if not (repository / path).is_file():
            return text
        return f"[{text}]({posixpath.relpath(f'{SOURCE_DIR}/{path}.html', here or '.')}{anchor})"

    def convert(text: str) -> str:
        text = INLINE_GITHUB_MATH.sub(lambda m: f"${m.group(1)}$", text)
        return OUTSIDE_LINK.sub(link, text)

    heading = H1.search(markdown)
    if heading and "title" not in page.meta:  # MkDocs reads a title only from a first line "# ...": ours follow marks
        page.meta["title"] = heading.group(1).strip()
    return _outside_markdown(markdown, convert)


def on_config(config):
    docs = Path(config["docs_dir"])
    groups: dict[str, list[str]] = {}
    for path in sorted((docs / "api").glob("*.md")):
        if path.name == "index.md":
            continue
        mark = MODULE_MARK.search(path.read_text())
        groups.setdefault(mark.group(1) if mark else "other", []).append(f"api/{path.name}")
    index_page = docs / "api" / "index.md"
    index = index_page.read_text() if index_page.exists() else ""
    order = re.findall(r"^## `([\w.]+)`", index, re.M)
    linked = re.findall(r"\]\(([^)#]+\.md)\)", index)  # the pages in the order the index lists them
    nav = config["nav"] or []
    for position, entry in enumerate(nav):
        if isinstance(entry, dict) and list(entry.values()) == ["api/index.md"]:
            title = list(entry)[0]
            sections = [{"Overview": "api/index.md"}]
            modules = sorted(groups, key=lambda m: (order.index(m) if m in order else len(order), m))
            for module in modules:
                pages = sorted(groups[module], key=lambda p: (linked.index(p[4:]) if p[4:] in linked else len(linked), p))
                name = module.removeprefix(PACKAGE_PREFIX)
                sections.append({name: pages})
            nav[position] = {title: sections}
    config["nav"] = nav
    return config
