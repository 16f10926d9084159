r"""Write mnn's API reference as Markdown that renders both on GitHub and in the MkDocs site.

One page per public class and per public function of every documented module
(``docs/api/<name>.md``, see ``tools/api_discovery.py`` for which and in what
order), an index (``docs/api/index.md``, one section per module), the learning
path, and the benchmark page, all generated from the docstrings (read by
griffe) and from ``docs/gradcheck.json`` / ``benchmarks/results.json``.

Math: docstrings write ``$...$`` inline and ``$$`` display blocks on lines of
their own. Display blocks become ```` ```math ```` fences (GitHub renders them
reliably, backslashes untouched); inline math becomes ``$`...`$``, GitHub's
form that keeps Markdown from touching the TeX. The site reads the same files:
``tools/mkdocs_hooks.py`` turns ``$`...`$`` into arithmatex's ``$...$`` and a
superfences custom fence turns ``math`` fences into arithmatex display blocks.

"Defined at" lines link to the source file and line relative to the page
(``../../mnn/layers/linear.py#L13``), which GitHub follows; the site links the
same line of a highlighted copy of the file (``tools/mkdocs_hooks.py``).

The output is deterministic: regenerating gives identical bytes, and
``tests/test_docs.py`` checks the committed files are up to date.

Usage::

    python tools/api_docs.py            # write into docs/
    python tools/api_docs.py --check    # exit 1 and list stale files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when run as a script
from api_discovery import (  # noqa: E402, F401 (the names the tests and tools use through this module)
    GRADCHECKED_MODULES,
    PACKAGE,
    ROOT,
    ClassDoc,
    ObjectDoc,
    class_signature,
    documented_modules,
    function_signature,
    is_gradchecked,
    load_package,
    public_classes,
    public_objects,
)
from docstring_markdown import Formula, convert, unbalanced_backticks  # noqa: E402
sys.path.insert(0, str(ROOT))  # this checkout's mnn, for its exercises (the pages are read by griffe, not imported)
from mnn.exercises.catalog import DIFFICULTIES, EXERCISES  # noqa: E402 (the exercises of each chapter and page)
from table_pages import GENERATED_MARK, table_page  # noqa: E402

# The learning path: (title, candidate names, why read it). A candidate is a
# class or function name, or ``module.Name`` where the short name is shared.
# The candidates that exist are linked; a step with none says "not written yet".
LEARNING_PATH = [
    ("The training loop", ["Module", "Sequential"],
     "the contract every layer keeps: `forward` caches, `backward` accumulates, `zero_grad` once per step."),
    ("Linear", ["Linear"], "the exemplar: element partials, the Jacobian, then three matrix products."),
    ("ReLU", ["ReLU"], "a diagonal Jacobian, so the vector-Jacobian product is an element-wise mask."),
    ("Mean squared error", ["MSELoss"], "the loss owns the batch mean; its gradient starts the backward pass."),
    ("Negative log-likelihood", ["NLLLoss"], "integer labels, a scatter instead of a one-hot product."),
    ("Cross-entropy", ["CrossEntropyLoss"], "log-softmax and NLL fused: $`(y - \\operatorname{onehot}(t))/N`$."),
    ("Softmax and LogSoftmax", ["Softmax", "LogSoftmax"],
     "the first full (non-diagonal) Jacobian, and how to apply it without building it."),
    ("MatrixProduct", ["MatrixProduct"], "a layer with two inputs: both gradients from one upstream gradient."),
    ("Convolution", ["Conv2d"], "im2col makes it one matrix product; the input gradient is a correlation with the "
     "flipped kernel, scattered back by col2im."),
    ("Pooling", ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten"],
     "the gradient goes to the maximum (why finite differences need inputs without ties), or is shared out evenly."),
    ("Batch normalisation", ["BatchNorm2d", "BatchNorm1d"],
     "statistics of the batch in training, running ones in evaluation; the term through the mean that vanishes."),
    ("The CNN", ["models.cnn.CNN"], "conv, BatchNorm, ReLU and pooling blocks, trained by the classifier loop."),
    ("Recurrence", ["RNN", "LSTM", "GRU"], "one step's gate partials, then backpropagation through time: the "
     "gradient carried back through $`h`$ (and $`c`$), the input projections as one product outside the loop."),
    ("The char-rnn", ["CharRNN"], "embedding, recurrent stack, head; sampling carries the state one character at a "
     "time."),
    ("Attention", ["CausalSelfAttention", "SelfAttention", "MultiHeadAttention", "Attention"],
     "scores, the causal mask, softmax over keys, and the backward through all of it."),
    ("LayerNorm", ["LayerNorm"], "normalisation whose Jacobian couples every feature of a row."),
    ("GELU", ["GELU"], "the tanh approximation and its derivative."),
    ("The GPT", ["GPT", "GPTConfig", "models.gpt.Block", "models.gpt.MLP"],
     "the whole model: embeddings, blocks, tied head, one backward."),
]


PARSE_OPTIONS = dict(returns_multiple_items=False, returns_named_value=False,
                     warn_unknown_params=False, warnings=False)


def _parse(docstring) -> list:
    if docstring is None:
        return []
    try:
        return docstring.parse("google", **PARSE_OPTIONS)
    except TypeError:  # an older griffe without some option
        return docstring.parse("google")


# --------------------------------------------------------------------------
# Rendering pages
# --------------------------------------------------------------------------
class Renderer:
    def __init__(self, root: Path, objects: list[ObjectDoc], gradchecks: dict):
        self.root = root
        self.objects = objects
        self.classes = [d for d in objects if d.kind == "class"]
        self.qualified = {f"{PACKAGE}.{d.key}": d.page for d in objects}
        self.short: dict[str, str] = {}
        for d in objects:  # a short name shared by two objects links to the first documented
            self.short.setdefault(d.name, d.page)
        self.gradchecks = gradchecks
        self.formulas: dict[str, list[Formula]] = {}

    # links ---------------------------------------------------------------
    def link_from_api(self, target: str, short: str) -> str:
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            page = self.qualified.get(".".join(parts[:end]))
            if page:
                return f"[`{short}`]({page}.md)"
        for part in parts:  # a re-exported path (mnn.layers.Linear) or a bare name
            if part in self.short:
                return f"[`{short}`]({self.short[part]}.md)"
        return f"`{short}`"

    def source_link(self, obj, from_dir: str = "api") -> str:
        path = obj.relative_package_filepath if hasattr(obj, "relative_package_filepath") else None
        relative = Path(PACKAGE) / Path(str(path)).relative_to(PACKAGE) if path else obj.relative_filepath
        relative = Path(str(relative)).as_posix()
        up = "../" * (len(Path(from_dir).parts) + 1)
        return f"[`{relative}#L{obj.lineno}`]({up}{relative}#L{obj.lineno})"

    def resolve(self, name: str) -> str | None:
        """The page of ``Name`` or ``module.Name``, or None."""
        return self.qualified.get(f"{PACKAGE}.{name}") if "." in name else self.short.get(name)

    # docstrings ------------------------------------------------------------
    def docstring(self, obj, owner: str, level: int) -> str:
        """Render a griffe docstring; collect its formulas under ``owner``."""
        collected = self.formulas.setdefault(owner, [])
        blocks = []
        heading = "#" * level
        for section in _parse(obj.docstring):
            kind = section.kind.value
            if kind == "text":
                md, found = convert(section.value, self.link_from_api)
                collected.extend(found)
                blocks.append(md)
            elif kind in ("parameters", "other parameters", "attributes", "receives"):
                title = {"parameters": "Arguments", "other parameters": "Other arguments",
                         "attributes": "Attributes", "receives": "Receives"}[kind]
                blocks.append(f"{heading} {title}\n\n" + self._items(section.value, collected, named=True))
            elif kind in ("returns", "yields", "raises", "warns"):
                title = kind.capitalize()
                blocks.append(f"{heading} {title}\n\n" + self._items(section.value, collected, named=kind not in ("returns", "yields")))
            elif kind == "examples":
                parts = []
                for sub_kind, value in section.value:
                    if getattr(sub_kind, "value", sub_kind) == "examples":
                        parts.append("```pycon\n" + value.rstrip() + "\n```")
                    else:
                        md, found = convert(value, self.link_from_api)
                        collected.extend(found)
                        parts.append(md)
                blocks.append(f"{heading} Examples\n\n" + "\n\n".join(parts))
            elif kind == "admonition":
                md, found = convert(section.value.contents, self.link_from_api)
                collected.extend(found)
                title = section.title or section.value.annotation or "Note"
                blocks.append(f"**{title}.** " + md)
            else:  # deprecated, functions, classes, modules: keep their text
                value = getattr(section.value, "description", None) or str(section.value)
                md, found = convert(value, self.link_from_api)
                collected.extend(found)
                blocks.append(md)
        return "\n\n".join(b for b in blocks if b.strip())

    def _items(self, items, collected: list[Formula], named: bool) -> str:
        lines = []
        for item in items:
            annotation, description = item.annotation, item.description or ""
            if isinstance(annotation, str) and unbalanced_backticks(annotation):
                # griffe split "``{name: error}`` for each ..." at the colon inside the code span: no type there.
                annotation, description = None, f"{annotation}: {description}"
            md, found = convert(description, self.link_from_api)
            collected.extend(found)
            head = []
            if named and getattr(item, "name", None):
                head.append(f"**`{item.name}`**")
            if annotation is not None:
                head.append(f"(`{annotation}`)" if head else f"`{annotation}`")
            prefix = " ".join(head)
            first, *rest = md.split("\n") if md else [""]
            text = f"- {prefix}: {first}" if prefix and first else f"- {prefix or first}"
            lines.append(text)
            lines.extend(("  " + r) if r.strip() else "" for r in rest)
        return "\n".join(lines)

    # pages ---------------------------------------------------------------
    def gradcheck_line(self, doc: ObjectDoc) -> str | None:
        entry = self.gradchecks.get(doc.key)
        if entry is not None:
            tensors = sorted(entry["errors"])
            names = (", ".join(f"`{k}`" for k in tensors) if len(tensors) <= 4
                     else f"{len(tensors)} tensors (every floating input and parameter)")
            return (f"> **Gradient check:** max relative error {entry['max_rel_error']:.1e} "
                    f"(float64, central differences) over {names}; case `{entry['case']}`, "
                    f"measured by [`tools/gradcheck_report.py`](../../tools/gradcheck_report.py).")
        if doc.is_module_subclass and is_gradchecked(doc.module):
            return ("> **Gradient check:** not measured yet: add a case to "
                    "[`tools/gradcheck_report.py`](../../tools/gradcheck_report.py).")
        return None

    def exercise_line(self, doc: ObjectDoc) -> str | None:
        """The page's exercise, for a class that is one: how to start it and check it."""
        for e in EXERCISES:
            if e.name == doc.name and e.module == f"{PACKAGE}.{doc.module}":
                return (f"> **Exercise** ({DIFFICULTIES[e.difficulty]}): write this backward yourself: "
                        f"`mnn exercise start {e.name}`, then `mnn exercise check {e.file_name}` "
                        "(see [Writing a layer](../writing-a-layer.md#exercises)).")
        return None

    def _head(self, doc: ObjectDoc, signature: str) -> list[str]:
        title = doc.name if doc.page == doc.name else doc.key
        out = [GENERATED_MARK, f"<!-- module: {PACKAGE}.{doc.module} -->", "", f"# {title}", ""]
        out += ["```python", signature, "```", ""]
        meta = f"`{PACKAGE}.{doc.module}.{doc.name}`, defined at {self.source_link(doc.obj)}"
        base_links = ", ".join(self.link_from_api(b, b.split(".")[-1]) for b in doc.bases)
        if base_links:
            meta += f"; subclass of {base_links}"
        return out + [meta + ".", ""]

    def function_page(self, doc: ObjectDoc) -> str:
        self.formulas[doc.page] = []
        out = self._head(doc, function_signature(doc.obj, method=False))
        body = self.docstring(doc.obj, doc.page, level=2)
        if body:
            out += [body, ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def class_page(self, doc: ObjectDoc) -> str:
        cls = doc.obj
        self.formulas[doc.page] = []
        out = self._head(doc, class_signature(cls))
        line = self.gradcheck_line(doc)
        if line:
            out += [line, ""]
        line = self.exercise_line(doc)
        if line:
            out += [line, ""]
        body = self.docstring(cls, doc.page, level=2)
        if body:
            out += [body, ""]
        # forward/backward always (their derivation is the class docstring); any
        # other public method when it has a docstring of its own.
        methods = [m for name, m in cls.members.items()
                   if not m.is_alias and m.is_function and (not name.startswith("_") or name == "__call__")
                   and (name in ("forward", "backward") or m.docstring is not None)]
        methods.sort(key=lambda m: m.lineno or 0)
        if methods:
            out += ["## Methods", ""]
            for method in methods:
                out += [f"### `{method.name}`", "", "```python", function_signature(method, method=True), "```", ""]
                out += [f"Defined at {self.source_link(method)}.", ""]
                text = self.docstring(method, doc.page, level=4)
                if text:
                    out += [text, ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def page(self, doc: ObjectDoc) -> str:
        return self.class_page(doc) if doc.kind == "class" else self.function_page(doc)

    def _summary(self, doc: ObjectDoc) -> str:
        summary = doc.obj.docstring.value.split("\n\n")[0] if doc.obj.docstring else ""
        md, found = convert(summary.replace("\n", " "), self.link_from_api)
        self.formulas["index"].extend(found)
        label = doc.name if doc.kind == "class" else f"{doc.name}()"
        return f"- [`{label}`]({doc.page}.md): {md}" if md else f"- [`{label}`]({doc.page}.md)"

    def index_page(self, package) -> str:
        out = [GENERATED_MARK, "", "# API reference", "",
               "Every public class and function of mnn, one page each, generated from its docstring, "
               "module by module in reading order. "
               "Each layer and loss states its forward pass, the element-wise partial derivatives, "
               "the Jacobian, and the vector-Jacobian product its `backward` computes; "
               "the gradient-check line on its page is measured, not claimed.", ""]
        self.formulas["index"] = []
        for module_key, module in documented_modules(package):
            mine = [d for d in self.objects if d.module == module_key]
            if module.docstring is None and not mine:
                continue
            out += [f"## `{PACKAGE}.{module_key}`", ""]
            if module.docstring is not None:
                md, found = convert(module.docstring.value, self.link_from_api)
                self.formulas["index"].extend(found)
                out += [md, ""]
            for kind, title in (("class", "Classes"), ("function", "Functions")):
                listed = [self._summary(d) for d in mine if d.kind == kind]
                if listed:
                    out += [f"{title}:", "", *listed, ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def learning_path(self) -> str:
        out = [GENERATED_MARK, "", "# Learning path", "",
               "Read mnn in this order. Each step is one page of the API reference: the forward pass, "
               "the partial derivatives, the Jacobian, and the product `backward` computes, with the "
               "code line that implements each numbered equation cited as `# Eq. (n)`.", "",
               "Before the first step, run the loop itself: `make run` trains the MLP on Fashion-MNIST. "
               "One training step is, in every model of mnn (see `mnn/train/classifier.py`; "
               "`mnn/train/loop.py` runs the steps):", "",
               "```python",
               "optimizer.zero_grad()                # gradients accumulate, so clear them once per step",
               "loss = loss_fn.forward(model.forward(x), y)",
               "model.backward(loss_fn.backward())   # each layer: read its cache, add to its grads, return dx",
               "optimizer.step()                     # update every parameter from its gradient",
               "```", "",
               "A chapter ends with its exercise: the layer with its backward removed (`mnn exercise start NAME`), "
               "for you to derive and write, and a check that says what is wrong (`mnn exercise check FILE`); "
               "[Writing a layer](writing-a-layer.md) shows the way, on a new layer.", ""]
        self.formulas["learning-path"] = []
        for number, (title, candidates, why) in enumerate(LEARNING_PATH, start=1):
            present = [(c.split(".")[-1], self.resolve(c)) for c in candidates if self.resolve(c)]
            md, found = convert(why)
            self.formulas["learning-path"].extend(found)
            exercises = [e for e in EXERCISES if e.chapter == title]
            if exercises:
                md += " *Exercise{}:* {}.".format("s" if len(exercises) > 1 else "", ", ".join(
                    f"`mnn exercise start {e.name}` ({DIFFICULTIES[e.difficulty]})" for e in exercises))
            if present:
                links = ", ".join(f"[`{name}`](api/{page}.md)" for name, page in present)
                out.append(f"{number}. **{title}**: {links}. {md[0].upper() + md[1:]}")
            else:
                out.append(f"{number}. **{title}** (not written yet: {', '.join(f'`{c}`' for c in candidates[:1])}). "
                           f"{md[0].upper() + md[1:]}")
        out += ["", "Every derivation is checked twice: a float64 finite-difference gradient check "
                "(its measured error is on each page) and a comparison with PyTorch in `tests/`.", ""]
        return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------
# The whole reference
# --------------------------------------------------------------------------
def load_gradchecks(docs: Path) -> dict:
    path = docs / "gradcheck.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())["classes"]


def generate(root: Path = ROOT) -> tuple[dict[str, str], dict[str, list[Formula]]]:
    """Every generated file (path relative to ``docs/`` -> text) and the formulas of each page."""
    docs = root / "docs"
    package = load_package(root)
    objects = public_objects(package)
    renderer = Renderer(root, objects, load_gradchecks(docs))
    files = {f"api/{d.page}.md": renderer.page(d) for d in objects}
    files["api/index.md"] = renderer.index_page(package)
    files["learning-path.md"] = renderer.learning_path()
    files["benchmarks.md"] = table_page(
        "Benchmarks", "mnn against the same models in PyTorch, with the same thread count, in one run of "
        "`make bench` (`python -m benchmarks.compare`): each side in a worker process of its own, the sides taking "
        "turns block by block (A B B A) after a warm-up, medians of the timed steps (at least 3 s of each side, so "
        "a 1 ms step is timed in several blocks). The ratios are the figures "
        "(the machine is shared and noisy); the machine is named below, with each side's BLAS: on an Intel CPU "
        "with the `mkl` extra installed mnn's replicas multiply with MKL (`--mnn-blas auto`; `--mnn-blas numpy` "
        "keeps numpy's OpenBLAS), elsewhere with numpy's OpenBLAS on its own kernel. `mnn_jit` says whether mnn ran its "
        "compiled loops (numba, `mnn.jit`); `MNN_JIT=0 make bench` measures the pure-numpy path. The whole "
        "2000-iteration recipe, evaluation included, is compared by `python -m benchmarks.recipe` "
        "(`benchmarks/recipe.json`).",
        root / "benchmarks" / "results.json", "`make bench` writes it.")
    return files, renderer.formulas


def stale_files(root: Path = ROOT) -> list[str]:
    """Generated files that differ from what is on disk, or that should no longer exist."""
    files, _ = generate(root)
    docs = root / "docs"
    stale = [p for p, text in sorted(files.items()) if not (docs / p).exists() or (docs / p).read_text() != text]
    for path in sorted((docs / "api").glob("*.md")):
        if f"api/{path.name}" not in files:
            stale.append(f"api/{path.name}")
    return stale


def write(root: Path = ROOT) -> list[str]:
    files, _ = generate(root)
    docs = root / "docs"
    (docs / "api").mkdir(parents=True, exist_ok=True)
    for path in sorted((docs / "api").glob("*.md")):
        if f"api/{path.name}" not in files:
            path.unlink()
    changed = []
    for relative, text in sorted(files.items()):
        path = docs / relative
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(relative)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="list stale generated files and exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: docs/{path}")
        return 1 if stale else 0
    changed = write()
    print(f"api_docs: {len(changed)} file(s) updated" + (": " + ", ".join(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
