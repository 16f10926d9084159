r"""The documentation: every formula compiles, every page renders, the reference is current.

* KaTeX (node, ``throwOnError``) compiles every formula of every public
  docstring, one test per page, naming each failing formula;
* the MkDocs site builds with ``--strict``, loads in headless Chromium, and on
  every page MathJax renders as many formulas as arithmatex marked, with no
  ``merror``, no red unknown macro and no raw ``$`` left in the text;
* the committed ``docs/api`` (and the other generated pages) equal a fresh
  generation; ``docs/gradcheck.json`` is re-measured, every error <= 1e-7;
* a screenshot of the MatrixProduct page (its matrices) is taken;
* the site browses from disk: every internal link of the built HTML reaches a
  file (never a folder), and Chromium follows links from ``file://.../index.html``;
* every generated page closes its code spans, and its "defined at" links name
  a line of a file that exists.

Needs ``npm ci`` (KaTeX, MathJax) and Debian's ``chromium``: ``make test``
installs both.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import api_docs  # noqa: E402
import build_docs  # noqa: E402
import gradcheck_report  # noqa: E402
import render_check  # noqa: E402

FILES, FORMULAS = api_docs.generate(ROOT)
OBJECTS = api_docs.public_objects(api_docs.load_package(ROOT))
CLASSES = [d for d in OBJECTS if d.kind == "class"]
NODE_MODULES = ROOT / "node_modules"


def _site_pages() -> list[str]:
    """Path of every page the site should have: each Markdown file of docs/, as ``.html`` (no folder URLs)."""
    return [path.relative_to(ROOT / "docs").with_suffix(".html").as_posix()
            for path in sorted((ROOT / "docs").rglob("*.md"))]


PAGES = _site_pages()


def _need_node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "katex").is_dir():
        pytest.fail("node and node_modules/katex are needed: run `npm ci` (make test does)")
    return node


def _katex(formulas: list[dict]) -> list[dict]:
    run = subprocess.run([_need_node(), str(ROOT / "tools" / "check_math.mjs")], input=json.dumps(formulas),
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# --------------------------------------------------------------------------
# (a) every formula compiles in KaTeX
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def katex_failures() -> dict[str, list[dict]]:
    formulas = [{"id": [page, i], "tex": f.tex, "display": f.display}
                for page, found in FORMULAS.items() for i, f in enumerate(found)]
    failures: dict[str, list[dict]] = {}
    for failure in _katex(formulas):
        failures.setdefault(failure["id"][0], []).append(failure)
    return failures


@pytest.mark.parametrize("page", sorted(FORMULAS))
def test_docstring_formulas_compile_in_katex(page, katex_failures):
    failures = katex_failures.get(page, [])
    assert not failures, f"{len(failures)} formula(s) of {page} fail in KaTeX:\n" + "\n".join(
        f"  {f['error']}\n    formula: {f['tex']!r}" for f in failures)


def test_katex_check_rejects_broken_formulas():
    failures = _katex([
        {"id": "ok", "tex": r"\frac{\partial L}{\partial x} = W^\top g \tag{2}", "display": True},
        {"id": "unclosed", "tex": r"\frac{a}{", "display": False},
        {"id": "unknown", "tex": r"\foo x", "display": False},
        {"id": "inline tag", "tex": r"x \tag{1}", "display": False},
    ])
    assert sorted(f["id"] for f in failures) == ["inline tag", "unclosed", "unknown"]


def test_every_public_class_has_a_page_and_formulas_are_found():
    assert {f"api/{c.page}.md" for c in OBJECTS} <= set(FILES)
    linear = [c for c in CLASSES if c.key == "layers.linear.Linear"]
    assert linear and len(FORMULAS[linear[0].page]) > 10  # the exemplar's math is all picked up


# --------------------------------------------------------------------------
# the Markdown conversion itself
# --------------------------------------------------------------------------
def test_convert_math_for_github():
    text = "\n".join([
        r"Affine $y = x W^\top$ and ``$not math$`` and a price \$5.",
        r"A wrapped $a +",
        r"b$ formula.",
        "",
        "    $$",
        r"    \begin{pmatrix} a \\ b \end{pmatrix} \tag{1}",
        "    $$",
        "",
        r"$$ z = 1 $$",
    ])
    markdown, formulas = api_docs.convert(text)
    assert r"$`y = x W^\top`$" in markdown
    assert "``$not math$``" in markdown and r"\$5" in markdown
    assert "$`a + b`$" in markdown
    assert "    ```math\n    \\begin{pmatrix} a \\\\ b \\end{pmatrix} \\tag{1}\n    ```" in markdown
    assert "```math\nz = 1\n```" in markdown
    assert [(f.tex, f.display) for f in formulas] == [
        (r"y = x W^\top", False), ("a + b", False),
        (r"\begin{pmatrix} a \\ b \end{pmatrix} \tag{1}", True), ("z = 1", True)]


def test_convert_separates_a_list_from_the_line_above():
    """GitHub starts a list right under a line of text; Python-Markdown (the site) needs a blank line."""
    markdown, _ = api_docs.convert("The checks:\n* one $x$\n* two\n\n- alone")
    assert markdown == "The checks:\n\n* one $`x`$\n* two\n\n- alone"


def test_convert_refuses_an_unclosed_display_block():
    with pytest.raises(ValueError, match="unclosed"):
        api_docs.convert("$$\nx = 1\n")


def test_measurement_pages_show_only_measured_numbers(tmp_path):
    import table_pages

    absent = table_pages.table_page("Benchmarks", "Intro.", tmp_path / "benchmarks.json", "the runs write it.")
    assert "No measurements yet" in absent and "|" not in absent
    (tmp_path / "benchmarks.json").write_text(json.dumps({
        "date": "2026-01-01", "machine": {"threads": 2},
        "cases": {"mlp": {"ms": {"mnn": 3.25, "torch": 2.5}}, "gpt": {"ms": {"mnn": 30.0, "torch": 20.0}}}}))
    page = table_pages.table_page("Benchmarks", "Intro.", tmp_path / "benchmarks.json", "")
    assert "| name | ms.mnn | ms.torch |" in page and "| mlp | 3.25 | 2.5 |" in page
    assert "- Machine: threads 2" in page


# --------------------------------------------------------------------------
# (c) the committed generated pages are current, and generation is deterministic
# --------------------------------------------------------------------------
def test_generated_docs_are_up_to_date():
    stale = api_docs.stale_files(ROOT)
    assert not stale, ("generated docs are out of date: run `make docs` and commit docs/: "
                       + ", ".join(f"docs/{p}" for p in stale))


def test_generation_is_deterministic():
    again, _ = api_docs.generate(ROOT)
    assert again == FILES


# --------------------------------------------------------------------------
# verified derivations: docs/gradcheck.json is re-measured
# --------------------------------------------------------------------------
def test_gradcheck_report_is_current_and_within_tolerance():
    measured = gradcheck_report.measure()
    assert measured, "no gradient-check case could run"
    too_large = {name: entry["errors"] for name, entry in measured.items()
                 if entry["max_rel_error"] > gradcheck_report.TOLERANCE}
    assert not too_large, f"gradient checks above {gradcheck_report.TOLERANCE:g}: {too_large}"
    committed = json.loads((ROOT / "docs" / "gradcheck.json").read_text())["classes"]
    assert sorted(committed) == sorted(measured), (
        "docs/gradcheck.json lists other classes than are measured now: run `make docs`")
    assert all(entry["max_rel_error"] <= gradcheck_report.TOLERANCE for entry in committed.values())


def test_every_layer_and_loss_has_a_gradcheck_case():
    missing = [c.key for c in CLASSES
               if c.is_module_subclass and api_docs.is_gradchecked(c.module)
               and c.key not in gradcheck_report.CASES]
    assert not missing, f"add a case to tools/gradcheck_report.py for: {', '.join(missing)}"


# --------------------------------------------------------------------------
# (b) the HTML site renders every formula in Chromium
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    if not (NODE_MODULES / "mathjax").is_dir():
        pytest.fail("node_modules/mathjax is missing: run `npm ci` (make test does)")
    directory = tmp_path_factory.mktemp("site")
    try:
        build_docs.build(directory)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"mkdocs build --strict failed:\n{error.stdout}\n{error.stderr}")
    return directory


@pytest.fixture(scope="session")
def browser():
    if render_check.find_chromium() is None:
        pytest.fail("chromium is needed for the rendering tests: apt-get install chromium (make test does as root)")
    with render_check.Browser() as instance:
        yield instance


@pytest.fixture(scope="session")
def base_url(site):
    with render_check.serve(site) as url:
        yield url


@pytest.fixture(scope="session")
def rendered(site, base_url, browser) -> dict[str, dict]:
    return {page: browser.check_page(base_url + page) for page in render_check.site_pages(site)}


def test_site_has_every_page(site):
    assert sorted(render_check.site_pages(site)) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_every_formula(page, rendered):
    result = rendered[page]
    assert not render_check.problems(result), f"/{page}:\n" + "\n".join(render_check.problems(result))
    if page.startswith("api/") and page != "api/index.html":
        source = FORMULAS.get(page[len("api/"):-len(".html")], [])
        assert result["formulas"] == len(source), "the site shows another number of formulas than the docstrings hold"


def test_site_references_nothing_outside(site):
    """No page or stylesheet names a CDN or a web font (what pages actually request is checked above)."""
    offending = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".css"):
            continue
        text = path.read_text(errors="replace")
        for marker in ('src="http', "src='http", "url(http", "url('http", 'url("http', "fonts.googleapis",
                       "fonts.gstatic", "cdn.jsdelivr", "unpkg.com", "cdnjs"):
            if marker in text:
                offending.append(f"{path.relative_to(site)}: {marker}")
        for tag in re.findall(r"<link[^>]+>", text):
            if "stylesheet" in tag and 'href="http' in tag:
                offending.append(f"{path.relative_to(site)}: {tag}")
    assert not offending, "external resources:\n" + "\n".join(offending)


def test_render_check_catches_broken_math(tmp_path, browser):
    """The browser check can fail: unknown macro, TeX error, text-mode backslash, raw dollar, untypeset formula."""
    (tmp_path / "tex-svg.js").write_bytes((NODE_MODULES / "mathjax" / "es5" / "tex-svg.js").read_bytes())
    config = (ROOT / "docs" / "javascripts" / "mathjax-config.js").read_text()
    (tmp_path / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<script>{config}</script><script src="tex-svg.js"></script></head><body>
<p>fine <span class="arithmatex">\\(x^2\\)</span></p>
<p>unknown <span class="arithmatex">\\(\\foo x\\)</span></p>
<p>error <span class="arithmatex">\\(x^2^3\\)</span></p>
<p>text mode <span class="arithmatex">\\(\\texttt{{c\\_attn}}\\)</span> and <span class="arithmatex">\\(\\mathtt{{c\\_attn}}\\)</span></p>
<p>unbalanced <span class="arithmatex">\\(x^{{2\\)</span></p>
<p>raw dollars $y = 1$ left in text</p>
</body></html>""")
    with render_check.serve(tmp_path) as url:
        result = browser.check_page(url)
    issues = "\n".join(render_check.problems(result))
    assert result["formulas"] == 6 and result["containers"] == 5, result
    assert "6 formulas but 5 rendered" in issues
    assert r"literal backslash (a macro left uninterpreted, e.g. in \text): \texttt{c\_attn}" in issues
    assert r"\mathtt" not in issues
    assert r"red (unknown macro): \foo x" in issues
    assert "merror" in issues and "x^2^3" in issues
    assert r"\(x^{2\)" in issues
    assert "$y = 1$" in issues


# --------------------------------------------------------------------------
# (d) a screenshot of the MatrixProduct page
# --------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_matrix_product_page_screenshot(site, base_url, browser, tmp_path):
    page = next((c.page for c in CLASSES if c.key == "layers.matmul.MatrixProduct"), None)
    if page is None:
        pytest.skip("mnn.layers.MatrixProduct does not exist yet")
    png = browser.screenshot(f"{base_url}api/{page}.html", tmp_path / "MatrixProduct.png")
    width, height = _png_size(png)
    assert width > 600 and height > 800, (width, height)
    result = browser.check_page(f"{base_url}api/{page}.html")
    matrices = browser.evaluate(
        "Array.from(MathJax.startup.document.math).filter(m => m.math.includes('pmatrix')).length")
    assert matrices >= 1 and not render_check.problems(result)


# --------------------------------------------------------------------------
# (e) the reference covers the whole package, and its pages are well formed
# --------------------------------------------------------------------------
def test_io_data_and_training_modules_have_pages():
    pages = {d.key: d.page for d in OBJECTS}
    for key in ("io.weights.save_model", "io.weights.load_model", "io.interop.export_gpt", "io.interop.import_gpt",
                "io.checkpoint.save_checkpoint", "io.safetensors.read_tensors", "data.text.CharTokenizer",
                "data.vision.load_vision_dataset", "models.mlp.MLP", "models.gpt.MLP", "models.gpt.Block"):
        assert f"api/{pages[key]}.md" in FILES, key
    assert pages["models.mlp.MLP"] != pages["models.gpt.MLP"]
    modules = {key for key, _ in api_docs.documented_modules(api_docs.load_package(ROOT))}
    train = {p.stem for p in (ROOT / "mnn" / "train").glob("*.py") if not p.stem.startswith("_")}
    assert {f"train.{name}" for name in train} <= modules, "every module of mnn/train/ is documented"


def test_unbalanced_backticks_are_caught():
    from docstring_markdown import unbalanced_backticks

    garbled = '- ```{name`: relative error}`` for each floating input (``"input0"``, ...)'
    assert unbalanced_backticks(garbled) and unbalanced_backticks('- ``[{"params"`: decayed')
    assert not unbalanced_backticks('- ``{name: error}`` for $`x`$, ```` ```math ```` fences\n\n```python\nx = "`"\n```')


@pytest.mark.parametrize("path", sorted(FILES))
def test_generated_page_closes_every_code_span(path):
    from docstring_markdown import unbalanced_backticks

    bad = unbalanced_backticks(FILES[path])
    assert not bad, f"docs/{path}: a backtick run that nothing closes in:\n" + "\n---\n".join(bad)


def test_defined_at_links_name_a_line_of_an_existing_file():
    links = [(path, target, int(line)) for path, text in FILES.items()
             for target, line in re.findall(r"\]\(((?:\.\./)+[\w./]+\.py)#L(\d+)\)", text)]
    assert len(links) > 100
    for path, target, line in links:
        file = (ROOT / "docs" / path).parent / target
        assert file.resolve().is_file(), f"docs/{path} links {target}, which does not exist"
        assert line <= len(file.read_text().splitlines()), f"docs/{path}: {target} has no line {line}"


def test_import_mnn_gives_its_subpackages():
    code = "import mnn; print(mnn.io.save_model.__module__, mnn.data.CharTokenizer.__name__, mnn.layers.Linear.__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["mnn.io.weights", "CharTokenizer", "Linear"]


# --------------------------------------------------------------------------
# (f) the built site browses from disk
# --------------------------------------------------------------------------
def test_every_internal_link_reaches_a_file(site):
    """Every href/src of the built HTML names a file of the site (a folder would list its files from file://)."""
    broken, checked = [], 0
    for page in sorted(site.rglob("*.html")):
        for url in re.findall(r'\b(?:href|src)="([^"]*)"', page.read_text()):
            parts = urlsplit(html.unescape(url))
            if parts.scheme or parts.netloc or not parts.path:
                continue  # outside (checked by test_site_references_nothing_outside) or an anchor on this page
            # Root-relative links appear only in 404.html, which a server shows at any depth.
            target = (site / parts.path.lstrip("/")) if parts.path.startswith("/") else page.parent / parts.path
            target = Path(unquote(str(target)))
            checked += 1
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {url}")
            elif parts.fragment.startswith("L") and target.suffix == ".html" and \
                    f'id="{parts.fragment}"' not in target.read_text():
                broken.append(f"{page.relative_to(site)}: {url} (no such line)")
    assert checked > 1000
    assert not broken, f"{len(broken)} links reach no file:\n" + "\n".join(broken[:30])


def test_site_follows_links_from_disk(site, browser):
    """From file://.../index.html, Chromium reaches the API pages and a source line, never a folder listing."""
    def follow(selector: str) -> str:
        url = browser.evaluate(f"document.querySelector({json.dumps(selector)}).href")
        browser.open(url)
        return url

    browser.open((site / "index.html").as_uri())
    follow('a[href$="api/index.html"]')
    assert "API reference" in browser.evaluate("document.querySelector('article').textContent")
    follow('article a[href$="Linear.html"]')
    assert browser.evaluate("document.querySelector('h1').textContent").startswith("Linear")
    url = follow('article a[href*="source/mnn/layers/linear.py.html#L"]')
    line = urlsplit(url).fragment
    assert browser.evaluate(f"document.getElementById({json.dumps(line)}).textContent").strip()
    assert "Index of" not in browser.evaluate("document.title")
