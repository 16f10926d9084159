"""The exercises: every reference solution passes, every skeleton is "not written yet", and each kind of mistake
is recognised on at least three layers (the wrong solutions are written here, by perturbing mnn's own backward).

The last test builds a wheel, installs it outside the repository, and runs ``start`` then ``check`` there.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mnn import backend
from mnn.cli import main
from mnn.exercises import check, hints, skeleton
from mnn.exercises._command import start
from mnn.exercises.catalog import EXERCISES, find

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["Linear", "ReLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "CrossEntropyLoss", "MSELoss",
            "MatrixProduct", "Embedding", "LayerNorm", "GELU", "MultiHeadAttention", "Conv2d", "MaxPool2d",
            "BatchNorm2d", "LSTM"]
NAMES = [e.name for e in EXERCISES]
# check() computes on the host itself (float64 finite differences); the strict device's test boundary
# (tests/conftest.py) would move the arrays of its mnn layers to the device under it.
pytestmark = pytest.mark.skipif(backend.device == "strict", reason="the exercises are checked on the host")


def test_list_shows_every_exercise_with_its_difficulty_and_chapter(capsys):
    assert main(["exercise", "list"]) == 0
    out = capsys.readouterr().out
    assert set(REQUIRED) <= set(NAMES) and len(NAMES) >= 17
    for e in EXERCISES:
        row = next(line for line in out.splitlines() if line.startswith(e.name + " "))
        assert e.chapter in row and ("easy" in row or "medium" in row or "hard" in row)


@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_passes_with_the_measured_errors(name, tmp_path):
    report = check(start(name, tmp_path, solution=True))
    text = report.text()
    assert report.passed, text
    assert "PASS" in text and re.search(r"finite differences \d\.\de-\d\d", text), text


@pytest.mark.parametrize("name", NAMES)
def test_skeleton_is_not_written_yet(name, tmp_path):
    path = start(name, tmp_path)
    report = check(path)
    assert report.not_written and not report.passed
    assert "not written yet" in report.text() and "NOT WRITTEN YET" in report.text()


@pytest.mark.parametrize("name", NAMES)
def test_skeleton_keeps_the_forward_and_leaves_the_derivation_to_the_hints(name):
    exercise = find(name)
    reference = exercise.reference()
    text = skeleton(exercise)
    tags = set(re.findall(r"\\tag\{(\d+)\}", reference.__doc__))
    kept = set(re.findall(r"\\tag\{(\d+)\}", text))
    given = set(re.findall(r"\\tag\{(\d+)\}", "\n".join(hints(exercise))))
    assert "1" in kept and given and kept | given == tags and not kept & given
    assert "from pathlib" not in text and str(ROOT) not in text  # no repository paths: it runs from a wheel
    if "forward" in vars(reference):  # the forward is mnn's own source, not a copy that could drift
        assert inspect.getsource(reference.forward) in text


def test_cli_start_check_and_hints(tmp_path, capsys):
    assert main(["exercise", "start", "Linear", str(tmp_path)]) == 0
    path = tmp_path / "linear.py"
    assert path.is_file()
    assert main(["exercise", "start", "Linear", str(tmp_path)]) == 2  # a student's file is never overwritten
    assert "exists already" in capsys.readouterr().err
    assert main(["exercise", "check", str(path), "--hint"]) == 1
    out = capsys.readouterr().out
    assert "not written yet" in out and "Hint 1 of 4" in out and "partial derivatives" in out
    assert main(["exercise", "check", str(path), "--hint", "3"]) == 1
    assert "Hint 3 of 4" in capsys.readouterr().out
    assert main(["exercise", "start", "NoSuchLayer"]) == 2
    assert "no exercise called" in capsys.readouterr().err


# --------------------------------------------------------------------------
# wrong solutions: mnn's backward, perturbed the way students get it wrong
# --------------------------------------------------------------------------
def wrong(tmp_path: Path, name: str, body: str, method: str = "backward") -> str:
    """A file whose class is mnn's ``name`` with ``method`` replaced by ``body``; returns check's report text."""
    path = tmp_path / f"{name.lower()}_wrong.py"
    path.write_text(f"# mnn exercise: {name}\nimport numpy\nfrom mnn.exercises.catalog import find\n\n\n"
                    f"class {name}(find({name!r}).reference()):\n    def {method}(self, *args):\n"
                    + textwrap.indent(textwrap.dedent(body).strip(), " " * 8) + "\n")
    report = check(path)
    assert not report.passed, report.text()
    return report.text()


PARAMETER_CHANGE = """
before = {{k: g.copy() for k, g in self.grads.items()}}
result = super().backward(*args)
for k, g in self.grads.items():
    {change}
return result
"""

MISTAKES = {
    "sign": [
        ("ReLU", "return -super().backward(*args)"),
        ("Tanh", "return -super().backward(*args)"),
        ("LayerNorm", "return -super().backward(*args)"),
        ("MSELoss", "return -super().backward(*args)"),
        ("Linear", PARAMETER_CHANGE.format(change="g[...] = 2 * before[k] - g  # minus this step's gradient")),
        ("PReLU", "x = self.cache\nreturn numpy.where(x <= 0, -1, 1) * super().backward(*args)  # one case wrong"),
    ],
    "transposed": [
        ("Linear", "return numpy.swapaxes(super().backward(*args), -1, -2)"),
        ("MatrixProduct", "dq, dp = super().backward(*args)\nreturn numpy.swapaxes(dq, -1, -2), dp"),
        ("Softmax", "return numpy.swapaxes(super().backward(*args), -1, -2)"),
        ("Conv2d", "return numpy.swapaxes(super().backward(*args), -1, -2)"),
        ("Linear", """
            dy, = args
            x = self.pop_cache()
            self.grads["weight"] += x.reshape(-1, self.in_features).T @ dy.reshape(-1, self.out_features)
            return dy @ self.params["weight"]
        """),
    ],
    "factor": [
        ("MSELoss", "result = super().backward(*args)\nreturn result / result.size  # the mean taken twice"),
        ("CrossEntropyLoss", "result = super().backward(*args)\nreturn result * (result.size // result.shape[-1])"),
        ("Linear", PARAMETER_CHANGE.format(change="g[...] = before[k] + (g - before[k]) / (args[0].size // "
                                                  "args[0].shape[-1])  # averaged over the batch")),
        ("Sigmoid", "return 2 * super().backward(*args)"),
        ("NLLLoss", "return super().backward(1.0)  # dloss ignored"),
    ],
    "overwritten": [
        ("Linear", PARAMETER_CHANGE.format(change="g[...] = g - before[k]  # assigned, not added")),
        ("LayerNorm", PARAMETER_CHANGE.format(change="g[...] = g - before[k]")),
        ("Conv2d", PARAMETER_CHANGE.format(change="g[...] = g - before[k]")),
        ("Embedding", PARAMETER_CHANGE.format(change="g[...] = g - before[k]")),
        ("PReLU", PARAMETER_CHANGE.format(change="g[...] = g - before[k]")),
        ("BatchNorm2d", PARAMETER_CHANGE.format(change="self.grads[k] = g.copy()  # a new array")),
    ],
    "shape": [
        ("Linear", "dx = super().backward(*args)\nreturn dx.reshape(-1, dx.shape[-1])"),
        ("MatrixProduct", "dq, dp = super().backward(*args)\nreturn dq, dp.sum(axis=0)"),
        ("GELU", "return super().backward(*args)[None]"),
        ("BatchNorm2d", "return super().backward(*args).mean(axis=0)"),
    ],
    "cache": [
        ("Linear", "cache = self.cache\nresult = super().backward(*args)\nself.cache = cache\nreturn result"),
        ("ReLU", "cache = self.cache\nresult = super().backward(*args)\nself.cache = cache\nreturn result"),
        ("Softmax", "cache = self.cache\nresult = super().backward(*args)\nself.cache = cache\nreturn result"),
        ("MultiHeadAttention", "cache = self.cache\nresult = super().backward(*args)\nself.cache = cache\n"
                               "return result"),
    ],
    "in place": [
        ("Sigmoid", "y = self.cache\nresult = super().backward(*args)\ny *= 1 - y  # y is the output\nreturn result"),
        ("Tanh", "y = self.cache\nresult = super().backward(*args)\ny *= y\nreturn result"),
        ("Linear", "x = self.cache\nresult = super().backward(*args)\nx += 1  # x is the caller's input\n"
                   "return result"),
        ("MatrixProduct", "q, p = self.cache\nresult = super().backward(*args)\nq[...] = 0\nreturn result"),
        ("ReLU", "result = super().backward(*args)\nargs[0][...] = 0  # the upstream gradient\nreturn result"),
    ],
}
DIAGNOSES = {
    "sign": "a sign error",
    "transposed": "transposed",
    "factor": "times the right one",
    "overwritten": "grads['",
    "shape": "wrong shape",
    "cache": "cache not released",
    "in place": "in place",
}
CASES = [(kind, name, body) for kind, rows in MISTAKES.items() for name, body in rows]


@pytest.mark.parametrize("kind", MISTAKES)
def test_each_mistake_is_planted_in_at_least_three_layers(kind):
    assert len({name for name, _ in MISTAKES[kind]}) >= 3


@pytest.mark.parametrize("kind, name, body", CASES, ids=[f"{k}-{n}-{i}" for i, (k, n, _) in enumerate(CASES)])
def test_mistake_is_diagnosed(kind, name, body, tmp_path):
    text = wrong(tmp_path, name, body)
    assert DIAGNOSES[kind] in text, text
    if kind == "overwritten":
        assert "accumulated" in text or "new array" in text, text


def test_factor_diagnoses_say_which_mistake(tmp_path):
    mse = wrong(tmp_path, "MSELoss", MISTAKES["factor"][0][1])
    assert "an average taken twice" in mse and "elements of prediction" in mse, mse
    cross = wrong(tmp_path, "CrossEntropyLoss", MISTAKES["factor"][1][1])
    assert "the 1/N of the mean is missing" in cross and "rows of scores" in cross, cross
    nll = wrong(tmp_path, "NLLLoss", MISTAKES["factor"][4][1])
    assert "does not carry the upstream gradient" in nll, nll


def test_a_sign_wrong_in_one_case_is_told_apart(tmp_path):
    text = wrong(tmp_path, "PReLU", MISTAKES["sign"][5][1])
    assert "the sizes are right but the sign is wrong in" in text, text


def test_a_wrong_gate_is_located_in_one_step_and_a_wrong_carry_in_time(tmp_path):
    gate = wrong(tmp_path, "LSTM", """
        result = super()._backward_direction(*args)
        H = self.hidden_size
        for grad in args[4]:
            grad[H:2 * H] *= 2  # the forget gate's rows
        return result
    """, method="_backward_direction")
    assert "one step (the cell alone)" in gate and "right in the rows of gates i, g, o; wrong in those of f" in gate
    carry = wrong(tmp_path, "LSTM", """
        doutput, dstateT, cache, weights, grads = args
        T = doutput.shape[0]
        dx, dstate0 = super()._backward_direction(doutput, dstateT, cache, weights, grads)
        if T > 1:  # what reaches step T-2 from step T-1 is lost: only the last step's input gradient is right
            dx[:-1] = super()._backward_direction(doutput[:-1], dstateT, tuple(a[:-1] for a in cache),
                                                  weights, [numpy.zeros_like(g) for g in grads])[0]
        return dx, dstate0
    """, method="_backward_direction")
    assert "only the last step is right" in carry, carry


def test_a_file_that_does_not_run_or_holds_no_exercise_is_refused(tmp_path, capsys):
    broken = tmp_path / "linear.py"
    broken.write_text("# mnn exercise: Linear\ndef backward(self, dy:\n")
    assert main(["exercise", "check", str(broken)]) == 2
    assert "does not run: line 2: SyntaxError" in capsys.readouterr().err
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    assert main(["exercise", "check", str(other)]) == 2
    assert "no exercise class in it" in capsys.readouterr().err
    assert main(["exercise", "check", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_backward_that_raises_is_shown_with_its_line(tmp_path):
    text = wrong(tmp_path, "Linear", MISTAKES["transposed"][4][1])
    assert re.search(r"line \d+ \(self\.grads\[\"weight\"\] \+= ", text), text


# --------------------------------------------------------------------------
# from an installed wheel, outside the repository
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_start_and_check_from_an_installed_wheel(tmp_path):
    source = tmp_path / "source"  # a copy: building in the repository would write build/ into it
    shutil.copytree(ROOT / "mnn", source / "mnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    wheel = next(tmp_path.glob("manual_nn-*.whl"))
    site = tmp_path / "site"
    subprocess.run(pip + ["install", str(wheel), "--no-deps", "-q", "--target", str(site)], check=True,
                   capture_output=True, timeout=120)
    work = tmp_path / "student"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def mnn(*args):
        return subprocess.run([sys.executable, "-m", "mnn.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import mnn; print(mnn.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the wheel's mnn, not the repository's
    assert mnn("exercise", "start", "Linear").returncode == 0
    skeleton_run = mnn("exercise", "check", "linear.py")
    assert skeleton_run.returncode == 1 and "not written yet" in skeleton_run.stdout, skeleton_run.stdout
    solved = (work / "linear.py").read_text().replace(
        'raise NotImplementedError("not written yet: Linear.backward")',
        'x = self.pop_cache()\n'
        '        check_output_grad(self, dy, x.shape[:-1] + (self.out_features,))\n'
        '        self.grads["weight"] += dy.reshape(-1, self.out_features).T @ x.reshape(-1, self.in_features)\n'
        '        self.grads["bias"] += dy.reshape(-1, self.out_features).sum(axis=0)\n'
        '        return dy @ self.params["weight"]')
    (work / "linear.py").write_text(solved)
    passed = mnn("exercise", "check", "linear.py")
    assert passed.returncode == 0 and "PASS" in passed.stdout, passed.stdout + passed.stderr
