r"""Measure every layer's and loss's gradient check, for the "Gradient check" line of its docs page.

Each case below builds one class with small float64 inputs and runs
:func:`mnn.gradcheck` (central differences, $\epsilon = 10^{-6}$). The
largest relative error over the inputs and parameters is written to
``docs/gradcheck.json``; ``tools/api_docs.py`` puts it on the class's page and
``tests/test_docs.py`` re-measures it (every error must be at most 1e-7).

A new layer or loss needs a case here: the test lists the Module subclasses of
the documented modules that have none. Cases whose class does not exist (yet)
are skipped, so this file may run ahead of the library.

Usage::

    python tools/gradcheck_report.py            # write docs/gradcheck.json
    python tools/gradcheck_report.py --print    # print, write nothing
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUTPUT = ROOT / "docs" / "gradcheck.json"
EPS = 1e-6
TOLERANCE = 1e-7


def normal(rng, *shape):
    return rng.standard_normal(shape)


def away_from_zero(rng, *shape, margin: float = 0.1):
    """Normal values pushed at least ``margin`` from 0 (a kink must not lie within eps of an input)."""
    x = rng.standard_normal(shape)
    return numpy.sign(x) * (margin + numpy.abs(x))


def positive(rng, *shape):
    return rng.uniform(0.5, 2.0, shape)


def labels(rng, classes, *shape):
    return rng.integers(0, classes, shape)


@dataclass
class Case:
    """``build(module, rng)`` -> layer; ``inputs(rng)`` -> tuple of numpy arrays; ``text`` describes it."""
    text: str
    build: Callable
    inputs: Callable
    reseed: bool = False  # reset ``layer.rng`` before every forward (Dropout's mask)


# "module.Class", the module being the one that defines it ("layers.linear.Linear"), -> the case.
# Shapes are small so every case runs in well under a second.
CASES: dict[str, Case] = {
    "layers.linear.Linear": Case("Linear(4, 3), x (2, 3, 4)",
                          lambda m, rng: m.Linear(4, 3, rng=rng), lambda rng: (normal(rng, 2, 3, 4),)),
    "layers.activation.ReLU": Case("ReLU(), x (3, 5), |x| >= 0.1", lambda m, rng: m.ReLU(), lambda rng: (away_from_zero(rng, 3, 5),)),
    "layers.activation.Sigmoid": Case("Sigmoid(), x (3, 5)", lambda m, rng: m.Sigmoid(), lambda rng: (normal(rng, 3, 5),)),
    "layers.activation.Tanh": Case("Tanh(), x (3, 5)", lambda m, rng: m.Tanh(), lambda rng: (normal(rng, 3, 5),)),
    "layers.activation.Log": Case("Log(), x (3, 5) in [0.5, 2]", lambda m, rng: m.Log(), lambda rng: (positive(rng, 3, 5),)),
    "layers.softmax.Softmax": Case("Softmax(), x (2, 3, 5)", lambda m, rng: m.Softmax(), lambda rng: (normal(rng, 2, 3, 5),)),
    "layers.softmax.LogSoftmax": Case("LogSoftmax(), x (2, 3, 5)", lambda m, rng: m.LogSoftmax(),
                              lambda rng: (normal(rng, 2, 3, 5),)),
    "layers.dropout.Dropout": Case("Dropout(0.3), x (4, 5), fixed mask", lambda m, rng: m.Dropout(0.3, rng=rng),
                           lambda rng: (normal(rng, 4, 5),), reseed=True),
    "layers.matmul.MatrixProduct": Case("MatrixProduct(), Q (2, 3, 4), P (2, 4, 5)", lambda m, rng: m.MatrixProduct(),
                                 lambda rng: (normal(rng, 2, 3, 4), normal(rng, 2, 4, 5))),
    "losses.MSELoss": Case("MSELoss(), prediction and target (4, 3)", lambda m, rng: m.MSELoss(),
                           lambda rng: (normal(rng, 4, 3), normal(rng, 4, 3))),
    "losses.NLLLoss": Case("NLLLoss(), log-probabilities (2, 3, 5), labels (2, 3)", lambda m, rng: m.NLLLoss(),
                           lambda rng: (normal(rng, 2, 3, 5), labels(rng, 5, 2, 3))),
    "losses.CrossEntropyLoss": Case("CrossEntropyLoss(), logits (2, 3, 5), labels (2, 3)",
                                    lambda m, rng: m.CrossEntropyLoss(),
                                    lambda rng: (normal(rng, 2, 3, 5), labels(rng, 5, 2, 3))),
    "models.mlp.MLP": Case("MLP(4, hidden=(5,), num_classes=3), x (3, 4)",
                       lambda m, rng: m.MLP(4, hidden=(5,), num_classes=3, seed=0),
                       lambda rng: (away_from_zero(rng, 3, 4),)),
    "layers.embedding.Embedding": Case("Embedding(7, 4), ids (2, 3)", lambda m, rng: m.Embedding(7, 4, rng=rng),
                                  lambda rng: (labels(rng, 7, 2, 3),)),
    "layers.normalization.LayerNorm": Case("LayerNorm(4), x (2, 3, 4)", lambda m, rng: m.LayerNorm(4),
                                  lambda rng: (normal(rng, 2, 3, 4),)),
    "layers.gelu.GELU": Case("GELU(), x (3, 5)", lambda m, rng: m.GELU(), lambda rng: (normal(rng, 3, 5),)),
    "layers.attention.MultiHeadAttention": Case("MultiHeadAttention(4, 2), causal, x (2, 3, 4)",
                                           lambda m, rng: m.MultiHeadAttention(4, 2, rng=rng),
                                           lambda rng: (normal(rng, 2, 3, 4),)),
    "models.gpt.MLP": Case("MLP(4), x (2, 3, 4)", lambda m, rng: m.MLP(4, rng=rng), lambda rng: (normal(rng, 2, 3, 4),)),
    "models.gpt.Block": Case("Block(4, 2), causal, x (2, 3, 4)", lambda m, rng: m.Block(4, 2, rng=rng),
                              lambda rng: (normal(rng, 2, 3, 4),)),
}


def _with_random_affine(layer, rng):
    """BatchNorm with random gamma and beta: at gamma = 1, beta = 0 a sum of its output is identically zero."""
    layer.params["weight"][...] = rng.uniform(0.5, 1.5, layer.params["weight"].shape)
    layer.params["bias"][...] = rng.standard_normal(layer.params["bias"].shape)
    return layer


def _folded(model):
    """A CharRNN that folds its embedding into layer 0 whether or not the compiled kernels run."""
    model.fold_embedding = True
    return model


def _recurrent_case(class_name: str, text: str) -> Case:
    """``(x, h0[, c0]) -> concat(output, h_n[, c_n])`` as one array: the gradient enters through both."""
    from mnn.backend import xp
    from mnn.module import Module

    class Sequence(Module):
        def __init__(self, rnn) -> None:
            super().__init__()
            self.rnn = rnn

        def forward(self, x, *state):
            output, final = self.rnn.forward(x, state if len(state) > 1 else state[0])
            finals = list(final) if isinstance(final, tuple) else [final]
            self.cache = [a.shape for a in (output, *finals)]
            return xp.concatenate([a.ravel() for a in (output, *finals)])

        def backward(self, dy):
            parts, start = [], 0
            for shape in self.pop_cache():
                size = int(numpy.prod(shape))
                parts.append(dy[start:start + size].reshape(shape))
                start += size
            dx, dstate0 = self.rnn.backward(parts[0], tuple(parts[1:]) if len(parts) > 2 else parts[1])
            return (dx, *(dstate0 if isinstance(dstate0, tuple) else (dstate0,)))

    states = 2 if class_name == "LSTM" else 1
    layers = importlib.import_module("mnn.layers")  # RecurrentBase's case runs through RNN, from another module
    return Case(text, lambda m, rng: Sequence(getattr(layers, class_name)(3, 4, num_layers=2, rng=rng)),
                lambda rng: (normal(rng, 5, 2, 3), *(normal(rng, 2, 2, 4) for _ in range(states))))


CASES.update({
    "layers.activation.LeakyReLU": Case("LeakyReLU(0.1), x (3, 5), |x| >= 0.1", lambda m, rng: m.LeakyReLU(0.1),
                                        lambda rng: (away_from_zero(rng, 3, 5),)),
    "layers.activation.SiLU": Case("SiLU(), x (3, 5)", lambda m, rng: m.SiLU(), lambda rng: (normal(rng, 3, 5),)),
    "layers.prelu.PReLU": Case("PReLU(3), slopes 0.25, x (2, 3, 4), |x| >= 0.1", lambda m, rng: m.PReLU(3),
                               lambda rng: (away_from_zero(rng, 2, 3, 4),)),
    "layers.activation.ELU": Case("ELU(), x (3, 5), |x| >= 0.1", lambda m, rng: m.ELU(),
                                  lambda rng: (away_from_zero(rng, 3, 5),)),
    "layers.conv.Conv2d": Case("Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), x (2, 4, 7, 7)",
                               lambda m, rng: m.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rng=rng),
                               lambda rng: (normal(rng, 2, 4, 7, 7),)),
    "layers.pooling.MaxPool2d": Case("MaxPool2d(2), x (2, 3, 6, 6), no ties", lambda m, rng: m.MaxPool2d(2),
                                     lambda rng: (normal(rng, 2, 3, 6, 6),)),
    "layers.pooling.AvgPool2d": Case("AvgPool2d(3, stride=2, padding=1), x (2, 3, 7, 7)",
                                     lambda m, rng: m.AvgPool2d(3, stride=2, padding=1),
                                     lambda rng: (normal(rng, 2, 3, 7, 7),)),
    "layers.pooling.AdaptiveAvgPool2d": Case("AdaptiveAvgPool2d(1), x (2, 3, 5, 5)",
                                             lambda m, rng: m.AdaptiveAvgPool2d(1),
                                             lambda rng: (normal(rng, 2, 3, 5, 5),)),
    "layers.flatten.Flatten": Case("Flatten(), x (2, 3, 4, 5)", lambda m, rng: m.Flatten(),
                                   lambda rng: (normal(rng, 2, 3, 4, 5),)),
    "layers.batchnorm.BatchNorm1d": Case("BatchNorm1d(4), training, random gamma and beta, x (6, 4)",
                                         lambda m, rng: _with_random_affine(m.BatchNorm1d(4), rng),
                                         lambda rng: (normal(rng, 6, 4),)),
    "layers.batchnorm.BatchNorm2d": Case("BatchNorm2d(3), training, random gamma and beta, x (2, 3, 4, 5)",
                                         lambda m, rng: _with_random_affine(m.BatchNorm2d(3), rng),
                                         lambda rng: (normal(rng, 2, 3, 4, 5),)),
    "layers.elman.RNN": _recurrent_case("RNN", "RNN(3, 4, num_layers=2), x (5, 2, 3), h0; output and h_n"),
    # the stack machinery (layers, directions, backpropagation through time), measured through its plain cell
    "layers.rnn.RecurrentBase": _recurrent_case("RNN", "through RNN(3, 4, num_layers=2), x (5, 2, 3), h0"),
    "layers.lstm.LSTM": _recurrent_case("LSTM", "LSTM(3, 4, num_layers=2), x (5, 2, 3), h0, c0; output, h_n, c_n"),
    "layers.gru.GRU": _recurrent_case("GRU", "GRU(3, 4, num_layers=2), x (5, 2, 3), h0; output and h_n"),
    "models.cnn.CNN": Case("CNN(1, image_size=8, channels=(2, 3), hidden=4, num_classes=3), x (2, 1, 8, 8)",
                           lambda m, rng: m.CNN(1, 8, (2, 3), 4, 3, seed=0),
                           lambda rng: (normal(rng, 2, 1, 8, 8),)),
    "models.char_rnn.CharRNN": Case("CharRNN(7, n_embd=3, hidden_size=4, num_layers=2), LSTM, ids (3, 4): "
                                    "12 positions > 7 rows, the embedding folded into layer 0",
                                    lambda m, rng: _folded(m.CharRNN(7, 3, 4, 2, seed=0)),
                                    lambda rng: (labels(rng, 7, 3, 4),)),
})


def _gpt_case() -> Case:
    def build(m, rng):
        config = m.GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=4, dropout=0.0)
        return m.GPT(config, rng=rng) if "rng" in m.GPT.__init__.__code__.co_varnames else m.GPT(config)
    return Case("GPT(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=4), ids (2, 3)",
                build, lambda rng: (labels(rng, 7, 2, 3),))


CASES["models.gpt.GPT"] = _gpt_case()


def measure(names: list[str] | None = None) -> dict:
    """Run the cases whose class exists; return ``{"module.Class": {...}}`` sorted by name."""
    from mnn import backend, gradcheck

    previous = backend.default_dtype()
    backend.set_default_dtype(numpy.float64)
    results = {}
    try:
        for name in sorted(names if names is not None else CASES):
            module_name, class_name = name.rsplit(".", 1)
            try:
                module = importlib.import_module(f"mnn.{module_name}")
            except ImportError:
                continue
            if not hasattr(module, class_name):
                continue
            case = CASES[name]
            rng = numpy.random.default_rng(0)
            layer = case.build(module, rng)
            inputs = tuple(backend.xp.asarray(x) for x in case.inputs(numpy.random.default_rng(1)))

            def reseed(layer=layer):
                layer.rng = numpy.random.default_rng(2)

            errors = gradcheck(layer, inputs, eps=EPS, tol=TOLERANCE, seed=0,
                               before_forward=reseed if case.reseed else None, raise_on_failure=False)
            results[name] = {
                "case": case.text,
                "errors": {k: float(f"{v:.2e}") for k, v in sorted(errors.items())},
                "max_rel_error": float(f"{max(errors.values(), default=0.0):.2e}"),
            }
    finally:
        backend.set_default_dtype(previous)
    return results


def report(results: dict) -> dict:
    return {
        "about": "max relative error of mnn.gradcheck per class: float64, central differences; "
                 "written by tools/gradcheck_report.py",
        "eps": EPS,
        "tolerance": TOLERANCE,
        "classes": results,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the results, write nothing")
    args = parser.parse_args(argv)
    results = measure()
    for name, entry in results.items():
        flag = "" if entry["max_rel_error"] <= TOLERANCE else "   <-- above tolerance"
        print(f"{name:40s} {entry['max_rel_error']:.1e}{flag}")
    if not args.print:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(json.dumps(report(results), indent=2, sort_keys=True) + "\n")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0 if all(e["max_rel_error"] <= TOLERANCE for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
