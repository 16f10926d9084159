"""``mnn exercise list | start NAME [DIR] | check FILE [--hint [N]]``: the command line of the exercises."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from mnn.errors import MnnError

DESCRIPTION = """Learn backpropagation by deriving it: each exercise is one of mnn's layers with its backward
removed. `start` writes it to a file; you derive the gradient and write the code; `check` runs
your backward against finite differences (float64) and against mnn's own layer on random
shapes, and says which gradient is wrong, by how much, and the likely mistake (a transposed
gradient, a sign, a factor 1/N, an overwritten gradient, a cache not released, ...).

  mnn exercise list
  mnn exercise start Linear            # writes ./linear.py
  mnn exercise check linear.py         # the verdict
  mnn exercise check linear.py --hint  # the first step of mnn's derivation (--hint 2: the next)"""


def add_exercise_parser(commands) -> None:
    """The ``exercise`` command and its three actions, on the ``mnn`` parser's subcommands."""
    exercise = commands.add_parser("exercise", help="write a layer's backward yourself and have it checked",
                                   description=DESCRIPTION)
    actions = exercise.add_subparsers(dest="action", metavar="ACTION", parser_class=type(exercise),
                                      title="actions")
    actions.add_parser("list", help="every exercise, its difficulty and its chapter of the learning path",
                       description="Every exercise, its difficulty and its chapter of the learning path.")
    start = actions.add_parser("start", help="write an exercise's file (the layer with its backward removed)",
                               description="Write NAME's file into DIR: mnn's layer with its backward removed.")
    start.add_argument("name", metavar="NAME", help="an exercise (mnn exercise list), e.g. Linear")
    start.add_argument("folder", metavar="DIR", nargs="?", default=".", help="where to write it (default: .)")
    start.add_argument("--solution", action="store_true", help="write mnn's own backward instead (for teachers)")
    start.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    check = actions.add_parser("check", help="check the backward written in FILE and say what is wrong",
                               description="Check the backward in FILE against finite differences (float64) and "
                                           "mnn's own layer, and the layer contract.")
    check.add_argument("file", metavar="FILE", help="a file written by mnn exercise start")
    check.add_argument("--hint", type=int, nargs="?", const=1, metavar="N",
                       help="also show step N of mnn's derivation (default 1; --hint 2 the next)")
    check.add_argument("--cases", type=int, default=2, metavar="K", help="random cases to check (default: 2)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random cases (default: 0)")
    exercise.set_defaults(actions_parser=exercise)


def list_text() -> str:
    from mnn.exercises.catalog import DIFFICULTIES, EXERCISES  # noqa: PLC0415

    lines = [f"{len(EXERCISES)} exercises. mnn exercise start NAME [DIR] writes one; mnn exercise check FILE "
             "checks it.", "", f"{'NAME':<20}{'DIFFICULTY':<12}{'CHAPTER (docs/learning-path.md)':<34}WHAT IT TEACHES"]
    for e in EXERCISES:
        lines.append(f"{e.name:<20}{f'{e.difficulty} {DIFFICULTIES[e.difficulty]}':<12}{e.chapter:<34}{e.summary}")
    return "\n".join(lines) + "\n"


def start(name: str, folder: str, solution: bool = False, force: bool = False) -> Path:
    """Write the exercise's file into ``folder``; returns its path.

    Raises:
        MnnError: an unknown exercise, or a file already there (a student's work is never overwritten
            without ``force``).
    """
    from mnn.exercises.catalog import find  # noqa: PLC0415
    from mnn.exercises.skeleton import skeleton  # noqa: PLC0415

    try:
        exercise = find(name)
    except KeyError as error:
        raise MnnError(error.args[0]) from None
    path = Path(folder) / (exercise.file_name if not solution else f"{exercise.name.lower()}_solution.py")
    if path.exists() and not force:
        raise MnnError(f"{path} exists already (your work?): give another DIR, or --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(skeleton(exercise, solution=solution), encoding="utf-8")
    return path


def hint_text(exercise, number: int) -> str:
    from mnn.exercises.skeleton import hints  # noqa: PLC0415

    steps = hints(exercise)
    number = min(max(number, 1), len(steps))
    method = "/".join(exercise.write)
    more = f"--hint {number + 1} for the next step" if number < len(steps) else "the last step"
    head = f"Hint {number} of {len(steps)} for {exercise.name}.{method} (mnn's own derivation; {more}):"
    return head + "\n\n" + textwrap.indent(steps[number - 1], "    ") + "\n"


def run_exercise(args) -> int:
    """Run ``mnn exercise ACTION``: 0 when done (a check that passes), 1 when a check fails, 2 for usage errors."""
    if args.action is None:
        sys.stderr.write(args.actions_parser.format_help())
        print("mnn: error: mnn exercise: give an ACTION: one of list, start, check", file=sys.stderr)
        return 2
    if args.action == "list":
        sys.stdout.write(list_text())
        return 0
    if args.action == "start":
        path = start(args.name, args.folder, args.solution, args.force)
        what = "mnn's own backward (the solution)" if args.solution else "the layer, its backward left for you to write"
        print(f"wrote {path}: {what}.\nCheck it with:  mnn exercise check {path}\n"
              f"A hint:         mnn exercise check {path} --hint")
        return 0
    from mnn.exercises.check import check  # noqa: PLC0415

    report = check(args.file, trials=max(1, args.cases), seed=args.seed)
    sys.stdout.write(report.text())
    if args.hint is not None:
        sys.stdout.write("\n" + hint_text(report.exercise, args.hint))
    return 0 if report.passed else 1
