r"""MkDocs hooks: let the site read the same Markdown that GitHub renders.

* Inline math is written ``$`tex`$`` (GitHub's form, safe from Markdown
  escapes); arithmatex reads ``$tex$``, so the backticks are dropped here.
  (Display math needs nothing: ``math`` fences are a superfences custom fence.)
* Links out of ``docs/`` to the source (``../../mnn/layers.py#L20``) point to
  ``repo_url`` when mkdocs.yml sets one, else become plain text.
* The nav entry ``api/index.md`` grows into the whole API reference, one
  section per module, read from the ``<!-- module: ... -->`` mark of each page.
"""

from __future__ import annotations

import re
from pathlib import Path

INLINE_GITHUB_MATH = re.compile(r"\$`([^`]+)`\$")
OUTSIDE_LINK = re.compile(r"\[([^\]]+)\]\((?:\.\./)+((?:mnn|tools|tests)/[^)#\s]*)(#L\d+)?\)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
MODULE_MARK = re.compile(r"<!-- module: ([\w.]+) -->")


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


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = (config.get("repo_url") or "").rstrip("/")

    def link(match: re.Match) -> str:
        text, path, anchor = match.group(1), match.group(2), match.group(3) or ""
        return f"[{text}]({repo}/blob/main/{path}{anchor})" if repo else text

    def convert(text: str) -> str:
        text = INLINE_GITHUB_MATH.sub(lambda m: f"${m.group(1)}$", text)
        return OUTSIDE_LINK.sub(link, text)

    return _outside_markdown(markdown, convert)


def on_config(config):
    docs = Path(config["docs_dir"])
    groups: dict[str, list[str]] = {}
    for path in sorted((docs / "api").glob("*.md")):
        if path.name == "index.md":
            continue
        mark = MODULE_MARK.search(path.read_text())
        groups.setdefault(mark.group(1) if mark else "other", []).append(f"api/{path.name}")
    nav = config["nav"] or []
    for index, entry in enumerate(nav):
        if isinstance(entry, dict) and list(entry.values()) == ["api/index.md"]:
            title = list(entry)[0]
            sections = [{"Overview": "api/index.md"}]
            index_page = docs / "api" / "index.md"
            order = re.findall(r"^## `([\w.]+)`", index_page.read_text(), re.M) if index_page.exists() else []
            modules = sorted(groups, key=lambda m: (order.index(m) if m in order else len(order), m))
            sections += [{module: groups[module]} for module in modules]
            nav[index] = {title: sections}
    config["nav"] = nav
    return config
