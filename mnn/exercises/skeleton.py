r"""Cut an exercise from mnn's own source: the layer with its backward removed, and the derivation as hints.

The class is read with :mod:`inspect` and :mod:`ast` from the installed
package (a wheel holds the same ``.py`` files), so an exercise never drifts
from the layer it is cut from. What the student gets:

* the class, with its forward and every other method as in mnn, and the
  methods to write (``backward``) reduced to their signature, a comment on
  the contract, and ``raise NotImplementedError("not written yet: ...")``;
* the class docstring up to its ``Backward`` paragraph (the forward
  equations, numbered) and from its ``Cache`` paragraph on (what forward
  keeps, the arguments); the derivation between them is what the student
  writes, and :func:`hints` hands it out one step at a time;
* the imports the class needs, copied from its module's own import lines,
  or, for what the module defines itself (constants, compiled kernels),
  imported from that module: the file runs wherever mnn is installed.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import sys
import textwrap

from mnn.exercises.catalog import Exercise

NOT_WRITTEN = "not written yet"
# A paragraph starting with one of these ends the derivation the skeleton leaves out.
_KEPT_AFTER_BACKWARD = ("Cache", "Args:", "Arguments:", "Returns:", "Raises:", "Shapes:")


# --------------------------------------------------------------------------
# The docstring: forward kept, backward derivation out, in steps
# --------------------------------------------------------------------------
def _blocks(text: str) -> list[str]:
    """Paragraphs separated by blank lines; a ``$$`` display block stays whole (and stands alone)."""
    blocks, current, in_math = [], [], False
    for line in text.split("\n"):
        if line.strip() == "$$":
            if not in_math and current:
                blocks.append("\n".join(current))
                current = []
            in_math = not in_math
            current.append(line)
            if not in_math:
                blocks.append("\n".join(current))
                current = []
            continue
        if not line.strip() and not in_math:
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def split_docstring(doc: str) -> tuple[list[str], list[str], list[str]]:
    """``(before, derivation, after)`` paragraphs of a layer's docstring.

    The derivation starts at the paragraph that begins with "Backward" and
    ends before the first that begins with "Cache", "Args:" (and the like);
    a paragraph of the derivation that says "Cache:" halfway gives the rest
    of itself to ``after``.
    """
    blocks = _blocks(inspect.cleandoc(doc or ""))
    start = next((i for i, b in enumerate(blocks) if b.lstrip().startswith("Backward")), None)
    if start is None:
        return blocks, [], []
    end = next((i for i in range(start + 1, len(blocks)) if blocks[i].lstrip().startswith(_KEPT_AFTER_BACKWARD)),
               len(blocks))
    derivation, after = blocks[start:end], blocks[end:]
    for i, block in enumerate(derivation):
        found = re.search(r"\bCache[:( ]", block)
        if found and i > 0:
            derivation, after = derivation[:i] + [block[:found.start()].rstrip()], [block[found.start():]] + after
            break
    return blocks[:start], [b for b in derivation if b.strip()], after


def hints(exercise: Exercise) -> list[str]:
    """The derivation of the backward from mnn's docstring, in steps: each ends with a display equation."""
    _, derivation, _ = split_docstring(exercise.reference().__doc__)
    steps, current = [], []
    for block in derivation:
        current.append(block)
        if block.strip().startswith("$$"):
            steps.append("\n\n".join(current))
            current = []
    if current:
        if steps:
            steps[-1] += "\n\n" + "\n\n".join(current)
        else:
            steps.append("\n\n".join(current))
    return steps


_BACKWARD_NOTE = ("Backward: yours to derive and write. The element partials of the forward above, the Jacobian\n"
                  "they form, then the vector-Jacobian product ``backward`` computes, numbered after the\n"
                  "forward's equations, each code line citing its ``# Eq. (n)``. ``mnn exercise check FILE --hint``\n"
                  "gives mnn's derivation one step at a time.")


def _student_docstring(doc: str) -> str:
    before, _, after = split_docstring(doc)
    return "\n\n".join([*before, _BACKWARD_NOTE, *after])


# --------------------------------------------------------------------------
# The class source
# --------------------------------------------------------------------------
def _defining_classes(cls, methods) -> list:
    """``cls`` and the parents down to the one that defines every method to write (BatchNorm2d's _BatchNorm)."""
    chain = []
    for klass in cls.__mro__:
        chain.append(klass)
        if all(any(m in vars(k) for k in chain) for m in methods):
            return chain
    raise ValueError(f"{cls.__name__} does not define {methods}")


def _method_body(name: str, qualified: str, kind: str) -> list[str]:
    if name == "_backward_direction":
        contract = ["# One direction of one layer, backwards through time: add the weights' gradients into",
                    "# grads (a list in the order of weights, each += in place), return (dx, [dh0, dc0]).",
                    "# The cache is the one your forward returned for this direction."]
    else:
        returns = "the prediction's gradient" if kind == "loss" else "the input's gradient (a tuple for several)"
        contract = ["# Read the cache with self.pop_cache() (which releases it), check dy's shape,",
                    "# add each parameter's gradient into self.grads[name] in place (+=, never =),",
                    f"# and return {returns}. Cite each equation: # Eq. (n)."]
    return [*contract, f'raise NotImplementedError("{NOT_WRITTEN}: {qualified}")']


def _member_name(statement) -> str:
    """A method's name, or the name an assignment in the class body binds (``GATES = 4``, ``_ndims: tuple``)."""
    if hasattr(statement, "name"):
        return statement.name
    target = statement.targets[0] if isinstance(statement, ast.Assign) else getattr(statement, "target", None)
    return ast.unparse(target) if target is not None else ast.unparse(statement)


def _class_source(exercise: Exercise, solution: bool) -> tuple[str, set, list]:
    """The merged class as source text, the names it uses, and the modules its pieces come from."""
    cls = exercise.reference()
    chain = _defining_classes(cls, exercise.write)
    members, order = {}, []
    for klass in reversed(chain):  # the parent's members first; a subclass's override them in place
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        node = tree.body[0]
        lines = textwrap.dedent(inspect.getsource(klass)).split("\n")
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        for statement in body:
            name = _member_name(statement)
            if name in exercise.drop and not solution:
                continue
            start = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
            text = lines[start - 1:statement.end_lineno]
            if name in exercise.write and not solution:
                keep = statement.body[1:] if ast.get_docstring(statement) is not None else statement.body
                head = lines[start - 1:keep[0].lineno - 1]
                indent = " " * (statement.col_offset + 4)
                text = head + [indent + line for line in _method_body(name, f"{cls.__name__}.{name}",
                                                                       exercise.kind)]
            if name not in members:
                order.append(name)
            members[name] = "\n".join(text)
    base = chain[-1].__bases__[0]
    doc = _student_docstring(cls.__doc__) if not solution else inspect.cleandoc(cls.__doc__)
    header = f"class {cls.__name__}({base.__name__}):\n" + textwrap.indent(f'r"""{doc}\n"""', "    ")
    source = header + "\n\n" + "\n\n".join(members[name] for name in order) + "\n"
    # check_output_grad too, where the module has it: the contract asks the student to check dy's shape
    used = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)} | {base.__name__, "check_output_grad"}
    return source, used, [sys.modules[k.__module__] for k in chain]


def _imports(used: set, modules: list) -> list[str]:
    """Import lines for every module-level name the class uses, as its modules import them."""
    wanted = {name for name in used if not hasattr(builtins, name)}
    lines, found = [], set()
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                names = [a for a in node.names if (a.asname or a.name.split(".")[0]) in wanted - found]
                if names:
                    node.names = names
                    lines.append(ast.unparse(node))
                    found |= {a.asname or a.name.split(".")[0] for a in names}
        local = sorted(n for n in wanted - found if n in vars(module))
        if local:
            lines.append(f"from {module.__name__} import {', '.join(local)}")
            found |= set(local)
    return sorted(set(lines), key=lambda line: (not line.startswith("import"), line))


def skeleton(exercise: Exercise, solution: bool = False) -> str:
    """The text of the exercise file: a header saying how to check it, the imports, the class.

    Args:
        exercise: from :data:`mnn.exercises.catalog.EXERCISES`.
        solution: keep mnn's own backward and docstring (the reference solution, for teachers and tests).
    """
    source, used, modules = _class_source(exercise, solution)
    name, stem = exercise.name, exercise.file_name
    methods = " and ".join(f"``{m}``" for m in exercise.write)
    header = (f'r"""Exercise {name}: write {methods} of mnn\'s {name} ({exercise.module}).\n\n'
              f"The forward is mnn's own; the backward is yours. When it is written, check it against\n"
              f"finite differences (float64) and mnn's own {name}, on random shapes:\n\n"
              f"    mnn exercise check {stem}\n"
              f"    mnn exercise check {stem} --hint      # the first step of the derivation (--hint 2: the next)\n"
              '"""\n')
    marker = f"# mnn exercise: {name}{' (solution)' if solution else ''}\n"
    return header + marker + "from __future__ import annotations\n\n" + "\n".join(_imports(used, modules)) + \
        "\n\n\n" + source
