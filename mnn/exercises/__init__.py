r"""Exercises: write a layer's backward yourself, and have it checked in words (``mnn exercise``).

Each exercise is one of mnn's layers with its backward removed
(:mod:`~mnn.exercises.skeleton` cuts it from mnn's own source). The student
derives the gradient, writes it, and ``mnn exercise check FILE``
(:mod:`~mnn.exercises.check`) compares it with finite differences and with
mnn's own layer on random shapes, checks the layer contract, and says which
tensor is wrong, by how much, and the likely mistake
(:mod:`~mnn.exercises.diagnosis`). ``--hint N`` hands out mnn's own
derivation one step at a time. The exercises, their difficulty and their
chapter of the learning path are in :mod:`~mnn.exercises.catalog`.
"""

from mnn.exercises.catalog import EXERCISES, Exercise, find
from mnn.exercises.check import Report, check
from mnn.exercises.skeleton import hints, skeleton

__all__ = ["EXERCISES", "Exercise", "Report", "check", "find", "hints", "skeleton"]
