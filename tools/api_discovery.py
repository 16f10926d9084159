r"""Which parts of mnn the API reference documents, read with griffe (never by parsing Python by hand).

Every module of the package is documented, walked recursively (``mnn.layers.linear``,
``mnn.train.loop``, ...), except the private ones and :data:`EXCLUDED`; they are
ordered by :data:`READING_ORDER`, and a module it does not name yet (a new
``mnn.train.<task>``) follows the last module of its package. Each public class
and each public function gets a page of its own, named after it, or after
``module.name`` when two share a name (``models.mlp.MLP`` and ``models.gpt.MLP``;
a function whose name differs from another's only in case is qualified too, so the
files never clash on a case-insensitive disk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mnn"
# The modules in reading order (keys relative to the package). A package's own
# ``__init__`` comes first, with its overview; its modules follow.
READING_ORDER = [
    "module",
    "layers", "layers.linear", "layers.activation", "layers.gelu", "layers.prelu", "layers.softmax", "layers.dropout", "layers.matmul",
    "layers.embedding", "layers.normalization", "layers.attention",
    "layers.rnn", "layers.input_projection", "layers.elman", "layers.lstm", "layers.lstm_compiled", "layers.gru",
    "losses",
    "optim", "optim.optimizer", "optim.sgd", "optim.adam", "optim.schedules",
    "models", "models.mlp", "models.gpt",
    "parallel", "distributed", "gradcheck", "summary", "throughput",
    "exercises", "exercises.catalog", "exercises.skeleton", "exercises.check", "exercises.diagnosis",
    "io", "io.safetensors", "io.weights", "io.checkpoint", "io.interop",
    "data", "data.idx", "data.vision", "data.batches", "data.text", "data.download",
    "train", "train.loop", "train.classifier", "train.language_model", "train.reporting",
    "backend", "strict", "cuda_kernels", "precision", "errors",
]
# Not documented: the command line (its ``--help`` is its reference) and the
# optional compiled loops (each layer's page cites the equations they compute).
EXCLUDED = {"cli", "jit"}
# Module subclasses defined in these packages are layers, losses or models: their
# pages carry a gradient-check line (see tools/gradcheck_report.py).
GRADCHECKED_MODULES = {"layers", "losses", "models"}


def is_gradchecked(module: str) -> bool:
    """True for ``layers.linear``, ``losses``, ``models.gpt``, ...: a module in :data:`GRADCHECKED_MODULES`."""
    return module.split(".")[0] in GRADCHECKED_MODULES


@dataclass
class ObjectDoc:
    """One documented class or function."""
    name: str
    module: str             # "layers.linear", relative to the package
    obj: object             # the griffe Class or Function
    kind: str = "class"     # "class" or "function"
    bases: list[str] = field(default_factory=list)
    is_module_subclass: bool = False
    page: str = ""          # the file stem under docs/api

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}"


ClassDoc = ObjectDoc  # the name the tests and tools/gradcheck_report.py know


def load_package(root: Path = ROOT):
    logging.getLogger("griffe").setLevel(logging.ERROR)
    return griffe.load(PACKAGE, search_paths=[str(root)], docstring_parser="google",
                       resolve_aliases=False, allow_inspection=False)


def _order(key: str) -> tuple:
    if key in READING_ORDER:
        return (READING_ORDER.index(key), key)
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):  # after the last listed module of its package
        package = ".".join(parts[:end])
        listed = [i for i, name in enumerate(READING_ORDER) if name == package or name.startswith(package + ".")]
        if listed:
            return (max(listed) + 0.5, key)
    return (len(READING_ORDER), key)


def documented_modules(package) -> list[tuple[str, object]]:
    """``(key, griffe module)`` of every documented module, in reading order."""
    found = []

    def walk(module, prefix: str) -> None:
        for name, member in module.members.items():
            if member.is_alias or not member.is_module or name.startswith("_"):
                continue
            key = f"{prefix}{name}"
            if key.split(".")[0] in EXCLUDED:
                continue
            found.append((key, member))
            walk(member, key + ".")

    walk(package, "")
    return sorted(found, key=lambda item: _order(item[0]))


def _exports(module):
    exports = getattr(module, "exports", None)
    if exports is None:
        return None
    return {str(e) if not hasattr(e, "name") else e.name for e in exports}


def _public(module, name: str, member) -> bool:
    """Defined in ``module`` (not imported), and named in ``__all__`` or, without one, not ``_private``."""
    if member.is_alias:
        return False
    exports = _exports(module)
    return name in exports if exports is not None else not name.startswith("_")


def public_objects(package) -> list[ObjectDoc]:
    """Every public class and function of the documented modules, by module then source line."""
    found = []
    for module_key, module in documented_modules(package):
        for name, member in module.members.items():
            if member.is_alias or not (member.is_class or member.is_function) or not _public(module, name, member):
                continue
            if member.is_function:
                found.append(ObjectDoc(name, module_key, member, "function"))
                continue
            try:
                mro = [base.path for base in member.mro()]
            except Exception:  # an unresolvable base (third-party class)
                mro = []
            bases = [getattr(base, "canonical_path", None) or str(base) for base in member.bases]
            found.append(ObjectDoc(name, module_key, member, "class", bases, f"{PACKAGE}.module.Module" in mro))
    order = [key for key, _ in documented_modules(package)]
    found.sort(key=lambda d: (order.index(d.module), d.obj.lineno or 0))
    names, folded = [d.name for d in found], [d.name.lower() for d in found]
    for d in found:
        # A name shared qualifies every page of it; a name shared only up to case (the class
        # ``Log``, the function ``log``) qualifies the function's.
        shared = names.count(d.name) > 1 or (d.kind == "function" and folded.count(d.name.lower()) > 1)
        d.page = d.key if shared or d.name.lower() == "index" else d.name
    return found


def public_classes(package) -> list[ObjectDoc]:
    return [d for d in public_objects(package) if d.kind == "class"]


# --------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------
def _format_parameters(parameters, skip_self: bool) -> list[str]:
    parts, saw_keyword_only_marker = [], False
    params = list(parameters)
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    for index, p in enumerate(params):
        kind = p.kind.value if p.kind is not None else ""
        if kind == "keyword-only" and not saw_keyword_only_marker:
            parts.append("*")
            saw_keyword_only_marker = True
        if kind == "variadic positional":
            saw_keyword_only_marker = True
            text = f"*{p.name}"
        elif kind == "variadic keyword":
            text = f"**{p.name}"
        else:
            text = p.name
        if p.annotation is not None:
            text += f": {p.annotation}"
        if p.default is not None and kind not in ("variadic positional", "variadic keyword"):
            text += f" = {p.default}" if p.annotation is not None else f"={p.default}"
        parts.append(text)
        if kind == "positional-only" and (index + 1 == len(params) or params[index + 1].kind.value != "positional-only"):
            parts.append("/")
    return parts


def _signature(prefix: str, name: str, parameters: list[str], returns: str | None = None) -> str:
    one_line = f"{prefix}{name}({', '.join(parameters)})" + (f" -> {returns}" if returns else "")
    if len(one_line) <= 88:
        return one_line
    inner = "".join(f"    {p},\n" for p in parameters)
    return f"{prefix}{name}(\n{inner})" + (f" -> {returns}" if returns else "")


def class_signature(cls) -> str:
    init = cls.members.get("__init__")
    params = _format_parameters(init.parameters, skip_self=True) if init is not None and not init.is_alias else []
    return _signature("class ", cls.name, params)


def function_signature(function, method: bool) -> str:
    params = _format_parameters(function.parameters, skip_self=method)
    returns = str(function.returns) if function.returns is not None else None
    return _signature("def ", function.name, params, returns)
