"""Why a run stops before train.max_steps, and how it stops cleanly.

A stop signal (SIGINT/SIGTERM: `stop_signals`) ends the run after the step in flight, or drops that step where no
weight has changed yet (`StepGuard`, `StepAborted`); either way the loop checkpoints and raises
`TrainingInterrupted`. Several processes stop together, one step later, by `StopVote`. Too many consecutive non-finite steps (`NonFiniteCounter`) raise `NonFiniteLossError`.
Below the loop, above the step (the guard watches the step's optimizers).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kl_autoencoder.run_folder import TrainingState
from kl_autoencoder.signals import acknowledge, watch_signals
from kl_autoencoder.training_step import Training, inner_optimizer


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""



class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and training stopped cleanly."""

    def __init__(self, checkpoint: Path, step: int, signal_name: str | None):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name



@contextmanager
def stop_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag (the loop finishes or drops the step, checkpoints, and stops: StepGuard); handlers
    restored after. A second signal, or one no handler could run for (blocked in a library), stops at once
    (signals.watch_signals)."""
    flag: dict[str, str | None] = {"signal": None}
    previous = {}

    def handler(signum, frame):
        acknowledge()
        flag["signal"] = signal.Signals(signum).name

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        with watch_signals():
            yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopVote:
    """Several processes agree to stop together, at most two steps after any of them was signalled, without a step
    waiting on the agreement: each step's vote is an asynchronous all-reduce (max) that is read at the end of the
    next step. On a GPU the result is copied to pinned memory behind an event, so reading it waits for that copy
    only, never for the step queued after it. A single process needs no vote. Leaving the `with` block normally
    waits for the vote in flight; an exception leaves it (a peer may be gone)."""

    def __init__(self, t: Training):
        self.world, self.device = t.accelerator.num_processes, t.device
        self.pending: tuple[torch.Tensor, Any] | None = None  # (the vote on the host, what to wait for)

    def __call__(self, requested: bool) -> bool:
        """Whether every process stops after this step; every process calls it once per step."""
        if self.world == 1:
            return requested
        agreed = self._read()
        if not agreed:  # every process read the same vote, so all issue the next one or none does
            self.pending = self._issue(requested)
        return agreed

    def _issue(self, requested: bool) -> tuple[torch.Tensor, Any]:
        flag = torch.tensor([float(requested)], device=self.device)
        work = torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, async_op=True)
        if self.device.type != "cuda":
            return flag, work
        work.wait()  # NCCL: orders the current stream after the all-reduce; the host goes on
        host = torch.empty(1, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def _read(self) -> bool:
        if self.pending is None:
            return False
        flag, waitable = self.pending
        self.pending = None
        if isinstance(waitable, torch.cuda.Event):
            waitable.synchronize()
        else:
            waitable.wait()
        return bool(flag.item())

    def __enter__(self) -> "StopVote":
        return self

    def __exit__(self, error_type: Any, *_: Any) -> None:
        if error_type is None:
            self._read()


class StepAborted(Exception):
    """A stop signal arrived inside a step before any weight changed: the step is dropped, not finished."""


class StepGuard:
    """Lets a stop signal end a long step early where that is safe: one process (the others would wait in a
    collective), and no optimizer has stepped yet in this step (so the weights, the optimizers' moments and the EMA
    are the previous step's). Between micro-batches on any device; on a CPU, where one step of a full-size VAE takes
    minutes, also at every convolution of the trained model, forward or backward. The loop then rolls the data
    position back and checkpoints the previous step, so a resume replays the dropped step exactly."""

    def __init__(self, t: Training, stop: dict, state: TrainingState):
        self.stop, self.state, self.t = stop, state, t
        # one process, and weights that change only through an optimizer (whose step hook tells the guard)
        self.enabled = t.accelerator.num_processes == 1 and t.optimizer is not None
        self.committed, self.batches_seen, self.handles = False, state.batches_seen, []
        if self.enabled and t.device.type == "cpu" and not t.cfg.model.compile:  # hooks would break its graphs
            for module in t.raw_model.modules():
                if isinstance(module, nn.Conv2d):
                    self.handles += [module.register_forward_pre_hook(self.check),
                                     module.register_forward_hook(self._watch_backward)]
            for optimizer in (t.optimizer, t.d_optimizer):
                if optimizer is not None:
                    self.handles.append(inner_optimizer(optimizer).register_step_pre_hook(self._commit))

    def begin(self) -> None:
        self.committed, self.batches_seen = False, self.state.batches_seen

    def check(self, *_: Any) -> None:
        if self.enabled and not self.committed and self.stop["signal"] is not None:
            raise StepAborted

    def _commit(self, *_: Any) -> None:
        self.committed = True

    def _watch_backward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self.check)

    def roll_back(self) -> None:
        """The dropped step's gradients and data position undone."""
        self.state.batches_seen = self.batches_seen
        for optimizer in (self.t.optimizer, self.t.d_optimizer):
            if optimizer is not None:
                inner_optimizer(optimizer).zero_grad(set_to_none=True)

    def __enter__(self) -> "StepGuard":
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()



class NonFiniteCounter:
    """Device-side counts of skipped steps, read back only when asked (no per-step host sync on GPU)."""

    def __init__(self, state: TrainingState, device: torch.device):
        self.total = torch.tensor(state.nonfinite_total, device=device)
        self.run = torch.tensor(state.nonfinite_run, device=device)
        self.worst = self.run.clone()

    def update(self, skipped: torch.Tensor) -> None:
        self.total += skipped.long()
        self.run = (self.run + 1) * skipped.long()
        self.worst = torch.maximum(self.worst, self.run)

    def read(self, state: TrainingState) -> None:
        """Copy the counts into `state` (for a checkpoint)."""
        state.nonfinite_total, state.nonfinite_run = int(self.total.item()), int(self.run.item())

    def check(self, state: TrainingState, limit: int, logs: dict[str, torch.Tensor]) -> None:
        """Copy the counts into `state`; raise when `limit` consecutive steps were skipped since the last check."""
        worst = int(self.worst.item())
        self.read(state)
        if worst >= limit:
            terms = {k: float(v.float().mean().item()) for k, v in logs.items()}
            raise NonFiniteLossError(
                f"{worst} consecutive optimizer steps with a non-finite loss or gradient (limit "
                f"train.max_nonfinite_steps={limit}), stopping at step {state.step}; loss terms: {terms}")
        self.worst = self.run.clone()

