"""What every training run shares: stop signals, checkpoints, resume, non-finite steps, history.

A *task* (:mod:`mnn.train.classifier`, :mod:`mnn.train.language_model`)
says what is particular to it: how a step's gradients are taken, when and how
the model is evaluated, what the run returns. :func:`run` does the rest, the
same way for every model:

* step ``s`` (counted from 0) sets the learning rate ``schedule(s)``, zeroes
  the gradients, lets the task take them, checks them, and updates;
* after every ``log_interval`` steps: one log line and one history row (the
  mean loss since the last row);
* whenever ``task.evaluation_due(s)``: the task evaluates, the history gets a
  row, and a checkpoint is written;
* the run's settings in ``config.json`` at the start (also in every checkpoint);
* every ``checkpoint_interval`` steps, and when SIGINT (Ctrl-C) or SIGTERM
  arrives: a checkpoint; a signal then stops the run at the step boundary and
  names the command that resumes it, bit for bit;
* a non-finite loss or gradient norm of step ``s`` (named ``s + task.step_base``:
  the GPT numbers its iterations from 0 as nanoGPT does, the MLP counts steps
  from 1) stops the run (the last checkpoint is
  kept) or, with ``skip_nonfinite``, skips the step; a run whose every step
  since the last evaluation was skipped stops.

The loop's own state in the checkpoint: ``evaluated`` (the evaluation of this
step is done), ``lr``, ``running`` (the losses since the last log row),
``last_loss`` and ``history``; the task adds its own keys.

Gradient accumulation (``grad_accum`` $A$ in the config, nanoGPT's
``gradient_accumulation_steps``): a step takes $A$ micro-steps, micro-step
$m$ backpropagating with the upstream gradient the task gives it (the
share of the step's rows it holds, $1/A$ for equal micro-batches), so that
the sum of their gradients is the gradient of the mean over all of their
rows: one step on an $A$ times larger batch.

Several ranks (``mpiexec -n N``, :mod:`mnn.distributed`): every rank runs
this loop on its own slice of each micro-batch; the gradients are averaged
over the ranks after the last micro-step (:class:`~mnn.distributed.DistributedDataParallel`,
``no_sync`` on the others), and so is the loss. Rank 0 alone logs,
evaluates and writes files while the others wait; a checkpoint holds every
rank's random generators and the number of ranks, and resumes only with the
same number. A stop signal is agreed on with the step's loss, so that every
rank stops at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy

from mnn.distributed import DistributedDataParallel, world
from mnn.errors import CheckpointError, TrainingError
from mnn.io.checkpoint import CHECKPOINT_NAME, read_checkpoint, restore, save_checkpoint, weights_finite
from mnn.throughput import speed
from mnn.train.reporting import History, StepTimer, log, progress_bar


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request to stop at the next step boundary.

    Used as a context manager around the training loop: the first signal only
    sets :attr:`signal_name`; the loop checks :attr:`requested` after each
    step, saves a checkpoint and returns. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once (the last checkpoint stays as it was).
    Outside the main thread (where Python cannot install handlers) it does
    nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def resume_command(model: str, folder) -> str:
    """The command that continues a run saved in ``folder``."""
    return f"mnn train {model} --resume {shlex.quote(str(folder))}"


def loop_state(state: dict, step: int) -> dict:
    """The loop's keys of a checkpoint's ``state``, also from files of mnn before the shared loop.

    Those MLP checkpoints kept ``epoch``/``batches_done`` instead of
    ``evaluated``: one written at an epoch's end (``batches_done == 0``) came
    after that epoch's evaluation. GPT checkpoints kept no running losses.
    """
    evaluated = state["evaluated"] if "evaluated" in state else (state.get("batches_done") == 0 and step > 0)
    return {"evaluated": bool(evaluated), "lr": state.get("lr"), "running": list(state.get("running", [])),
            "last_loss": state.get("last_loss"), "history": list(state.get("history", []))}


class Run:
    """One training run of ``task``: its position, history and checkpoints (see the module docstring)."""

    def __init__(self, task, resume=None, on_step=None) -> None:
        self.task, self.config, self.on_step = task, task.config, on_step
        self.out = Path(self.config.out)
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self.history, self.running, self.last_loss = History(), [], None
        self.start, self.evaluated, self.saved_step, self.ms_per_step = 0, False, None, 0.0
        self.world, self.accum = world(), getattr(self.config, "grad_accum", 1)
        self.ddp = DistributedDataParallel(task.model, self.world) if self.world.size > 1 else None
        self.stop, self.stop_agreed = None, False  # several ranks: a stop signal every rank has heard of
        if self.world.rank:  # each rank draws its own dropout masks and augmentations, the shared ones excepted
            shared = getattr(task, "shared_generators", ())
            for index, (name, rng) in enumerate(sorted(task.generators.items())):
                if name not in shared:
                    seeds = numpy.random.SeedSequence([self.config.seed, index, self.world.rank])
                    rng.bit_generator.state = type(rng.bit_generator)(seeds).state
        if self.world.size > 1 or self.accum > 1:
            rows = self.config.batch_size * self.world.size * self.accum
            block = getattr(self.config, "block_size", None)
            log(f"global batch {rows} = {self.config.batch_size} per rank x {self.world.size} ranks x "
                f"{self.accum} micro-steps" + (f" ({rows * block:,} tokens per iteration)" if block else ""))
        if resume is not None:
            self.resume(Path(resume) / CHECKPOINT_NAME)

    def resume(self, path: Path) -> None:
        task = self.task
        tensors, metadata = read_checkpoint(path)
        step, state = metadata["step"], metadata["state"]
        loop = loop_state(state, step)
        total = task.total_steps
        if step > total or (step == total and loop["evaluated"]):
            raise CheckpointError(
                f"{path}: the checkpoint is at step {step}, and this run ends at step {total}: nothing to train; "
                f"give {task.length_option} so that the run goes past step {step}")
        task.check_resume(metadata, path)
        saved_ranks = int(metadata.get("world_size", 1))
        if saved_ranks != self.world.size:
            raise CheckpointError(
                f"{path}: written by {saved_ranks} rank(s), this run has {self.world.size}: each rank's batches and "
                f"random streams depend on the number of ranks, so the run would not continue exactly; resume it "
                f"with {saved_ranks} rank(s)" + (f" (mpiexec -n {saved_ranks})" if saved_ranks > 1 else ""))
        restore(tensors, metadata, path, task.model, task.optimizer, task.generators)
        if self.world.rank:  # restore() gave every rank rank 0's generators
            own = json.loads(metadata["ranks_rng"])[self.world.rank - 1]
            for name, rng in task.generators.items():
                rng.bit_generator.state = own[name]
        self.start, self.evaluated, self.saved_step = step, loop["evaluated"], step
        self.history, self.running, self.last_loss = History(loop["history"]), loop["running"], loop["last_loss"]
        if loop["lr"] is not None:
            task.optimizer.lr = loop["lr"]
        task.load_state(state, step)
        log(f"resumed from {path} at step {step}")

    def save_checkpoint(self, step: int, evaluated: bool) -> None:
        task = self.task
        extra = {"world_size": self.world.size} if self.world.size > 1 else {}
        if self.world.size > 1:  # every rank's generators: each resumes its own streams
            states = self.world.gather({name: rng.bit_generator.state for name, rng in task.generators.items()})
            extra["ranks_rng"] = states[1:] if self.world.is_main else None
        if self.world.is_main:
            state = {"evaluated": evaluated, "lr": task.optimizer.lr, "running": self.running,  # no timings:
                     "last_loss": self.last_loss, "history": self.history.rows, **task.state(step)}  # runs must match
            save_checkpoint(self.checkpoint_path, task.model, task.optimizer, task.generators,
                            dataclasses.asdict(self.config), step, state, **task.checkpoint_metadata(), **extra)
        self.saved_step = step
        if self.world.size > 1:  # the others wait (asleep) for rank 0's evaluation and file, and agree on stopping
            self.stop_agreed = self.world.wait_for_all(self.stop_requested(local=True))

    def stop_requested(self, local: bool = False) -> bool:
        """A stop signal came: in one process, to this one; with several ranks, the one all have agreed on."""
        if self.world.size == 1 or local:
            return self.stop is not None and self.stop.requested
        return self.stop_agreed

    def gradients(self, step: int) -> float:
        """The step's gradients: ``grad_accum`` micro-steps, averaged over the ranks; the step's mean loss."""
        task, ddp = self.task, self.ddp
        if ddp is None and self.accum == 1:
            return task.forward_backward(step)
        if ddp is not None:
            ddp.sync_buffers()
        loss = 0.0
        for micro in range(self.accum):
            with nullcontext() if ddp is None or micro == self.accum - 1 else ddp.no_sync():
                part = task.forward_backward(step, micro)  # weighted by the micro-batch's share of the rows
                if ddp is not None:
                    ddp.finish_backward()  # the reduction, on the last micro-step only
            loss = part if micro == 0 else loss + part
        if ddp is None:
            return loss
        mean_loss, stopping = self.world.mean([loss, float(self.stop_requested(local=True))])
        self.stop_agreed = self.stop_agreed or bool(stopping > 0)
        return float(mean_loss)

    def kept_message(self) -> str:
        if self.saved_step is None:
            return "no checkpoint had been saved yet"
        return (f"the last good checkpoint (step {self.saved_step}) is kept in {self.checkpoint_path}"
                f"{self.task.weights_note()}; resume with: {resume_command(self.task.name, self.out)}")

    def evaluate(self, step: int, timers: tuple, bar) -> None:
        if self.world.is_main:
            with self.world.main_alone():
                self.evaluate_here(step, timers, bar)
        self.save_checkpoint(step, evaluated=True)

    def evaluate_here(self, step: int, timers: tuple, bar) -> None:
        started = time.perf_counter()
        metrics = self.task.evaluate(step)
        timer = timers[0]
        for each in timers:  # evaluation does not count as step time
            each.start += time.perf_counter() - started
        if step > self.start or timer.steps:
            self.ms_per_step = timer.read_ms()
        log(self.task.evaluation_line(step, metrics, self.ms_per_step), bar)
        self.history.add(step=step, **self.task.row_extras(step), **metrics, lr=self.task.optimizer.lr)
        if not all(math.isfinite(value) for value in metrics.values()):
            listing = " / ".join(f"{value} ({name})" for name, value in metrics.items())
            raise TrainingError(f"the evaluated {self.task.evaluation_name} is {listing} at step {step}: the model "
                                f"is broken, training "
                                f"stopped; {self.kept_message()}. Lower the learning rate")
        self.task.after_evaluation(step, metrics)

    def nonfinite(self, step: int, what: str, value, skipped_all: bool = False) -> None:
        """Stop, or (with ``skip_nonfinite``, while the weights are finite) log and skip the step."""
        skipping = self.config.skip_nonfinite
        if skipping and weights_finite(self.task.model) and not skipped_all:
            return
        if skipped_all:
            raise TrainingError(f"every step of {what} was skipped (non-finite loss or gradient): the "
                                f"model is broken, training stopped; {self.kept_message()}. Lower the learning rate")
        hint = "" if skipping else ", or pass --skip-nonfinite to skip such steps"
        named = step + self.task.step_base
        raise TrainingError(f"{what} became {value} at step {named}: training stopped; {self.kept_message()}. "
                            f"Lower the learning rate{hint}")

    def train(self) -> dict:
        """Run to ``task.total_steps`` or a stop signal; write the history and its plot; return the task's result."""
        task, config = self.task, self.config
        total, interval = task.total_steps, config.checkpoint_interval
        main = self.world.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        bar = progress_bar(total, initial=self.start, description="train") if main else None
        timer, log_timer = StepTimer(), StepTimer()  # ms per step at evaluations / at log lines
        skipped, last_evaluation, step = 0, self.start, self.start
        zeroed = False  # whether every gradient the optimizer updates is zero now
        with StopRequest() as stop:
            self.stop = stop
            for step in range(self.start, total + 1):
                if self.on_step is not None:
                    self.on_step(step)
                if self.stop_requested():  # the signal came during the last step: save before anything else
                    if self.saved_step != step:
                        self.save_checkpoint(step, evaluated=False)
                    break
                if task.evaluation_due(step) and not (step == self.start and self.evaluated):
                    if skipped and skipped == step - last_evaluation:
                        self.nonfinite(step, task.stretch(last_evaluation, step), None, skipped_all=True)
                    self.evaluate(step, (timer, log_timer), bar)
                    skipped, last_evaluation = 0, step
                if self.stop_requested() and self.saved_step != step:  # the signal came during the evaluation
                    self.save_checkpoint(step, evaluated=False)
                if step == total or self.stop_requested():
                    break
                task.optimizer.lr = task.schedule(step)
                if not zeroed:  # the last update zeroed them right after it read them (step(zero_grad=True))
                    task.optimizer.zero_grad()
                zeroed = False
                loss = self.gradients(step)
                norm = task.gradient_norm() if math.isfinite(loss) else math.nan
                if not math.isfinite(loss) or not math.isfinite(norm):
                    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                    self.nonfinite(step, what, value)
                    log(f"step {step + task.step_base} | {what} {value}: step skipped", bar)
                    task.discard_step()
                    skipped += 1
                else:
                    task.optimizer.step(zero_grad=True)
                    zeroed = True
                    self.running.append(loss)
                    self.last_loss = loss
                timer.tick()
                log_timer.tick()
                if bar is not None:
                    bar.update(1)
                if (step + 1) % config.log_interval == 0 and self.running:
                    mean_loss = math.fsum(self.running) / len(self.running)
                    self.running = []
                    log(f"step {step + 1} | loss {mean_loss:.4f} | lr {task.optimizer.lr:.1e} | "
                        f"{speed(log_timer.read_ms(), task)}", bar)  # with GFLOP/s and MFU (mnn.throughput)
                    self.history.add(step=step + 1, **task.row_extras(step + 1), loss=mean_loss, lr=task.optimizer.lr)
                if interval and (step + 1) % interval == 0:
                    self.save_checkpoint(step + 1, evaluated=False)
        if bar is not None:
            bar.close()
        stopped = self.stop_requested() and step < total
        self.stop = None
        with StopRequest() as late:  # a signal now waits until the weights, history and plot are written
            if main:
                task.finish(stopped)
                self.history.write(self.out)
                self.history.plot(self.out / "loss.png", task.plot_series, task.plot_title)
            elif hasattr(task, "parallel"):
                task.parallel.close()
        self.world.wait_for_all()
        if late.requested:
            log(f"{late.signal_name} came while the outputs were written: they are complete")
        if stopped:
            log(f"stopped by {stop.signal_name} at step {step} of {total}: checkpoint (the weights at step "
                f"{step}, optimizer and position) saved in {self.checkpoint_path}{task.weights_note()}")
            log(f"resume with: {resume_command(task.name, self.out)}")
            return {**task.result_of(step, self.last_loss, self.ms_per_step), "interrupted": True}
        return task.result_of(step, self.last_loss, self.ms_per_step)


def run(task, resume=None, on_step=None) -> dict:
    """Train ``task`` (resuming the run saved in the folder ``resume``, if given); see :class:`Run`."""
    return Run(task, resume=resume, on_step=on_step).train()
