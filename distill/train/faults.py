"""Fault injection for training: kill, slow down, hang or fail one rank at a chosen step.

Faults come from the config (`train.fault.inject`, a list of specs), so a user checks a cluster's
recovery the same way the tests do, e.g.
`distill train CONFIG 'train.fault.inject=["kill:rank=1:step=50"]'`. Specs:

    kill:rank=1:step=5        rank 1 sends itself SIGKILL as step 5 begins (a dead process / node)
    hang:rank=1:step=4        rank 1 blocks at step 4 in a collective no other rank joins
    sleep:rank=1:factor=2     from step 1 (or step=N) on, rank 1 takes `factor` times its own
                              step time: it sleeps (factor-1) x its last unslowed time while
                              loading data (a slow host or input pipeline)
    raise:rank=0:step=3       rank 0 raises RuntimeError at step 3 (an ordinary Python failure)

kill, hang and raise take `phase=checkpoint` to fire inside the checkpoint write after step N
instead (e.g. `hang:rank=1:step=2:phase=checkpoint`: a rank stuck while the others wait in the
save's barrier), which the watchdog catches with `train.fault.checkpoint_timeout_s`.

Steps count from 1 (step N is the N-th optimizer step of the plan, so it is the same step after a
resume). A fault fires in attempt 0 of a launch only, so the restarted group runs clean; add
`attempt=N` for another attempt or `attempt=*` for every one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

FAULT_KINDS = ("kill", "hang", "sleep", "raise")
PHASES = ("step", "checkpoint")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = 1
    """The step it fires at (kill, hang, raise) or from (sleep)."""
    factor: float = 2.0
    """sleep: the rank's own step time is multiplied by this."""
    attempt: int | None = 0
    """The attempt of the launch it fires in; None: every attempt."""
    phase: str = "step"
    """kill / hang / raise: as step N begins (`step`) or inside the checkpoint write after
    step N (`checkpoint`)."""


def parse_fault(spec: str) -> Fault:
    """`kind:key=value:...` -> Fault; FaultSpecError says what is wrong. Pure."""
    kind, *pairs = spec.strip().split(":")
    if kind not in FAULT_KINDS:
        raise FaultSpecError(f"fault {spec!r}: unknown kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    values: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("rank", "step", "factor", "attempt", "phase"):
            raise FaultSpecError(f"fault {spec!r}: {pair!r} is not one of rank=R, step=N, factor=F, attempt=N|*, "
                                 f"phase={'|'.join(PHASES)}")
        if key == "phase":
            if value not in PHASES or kind == "sleep":
                raise FaultSpecError(f"fault {spec!r}: phase must be one of {', '.join(PHASES)} "
                                     "(and only for kill, hang, raise)")
            values[key] = value
            continue
        try:
            if key == "factor":
                values[key] = float(value)
            elif key == "attempt" and value == "*":
                values[key] = None
            else:
                values[key] = int(value)
        except ValueError:
            raise FaultSpecError(f"fault {spec!r}: {key}={value!r} is not a number") from None
    if "rank" not in values:
        raise FaultSpecError(f"fault {spec!r}: rank=R is required")
    if kind in ("kill", "hang", "raise") and "step" not in values:
        raise FaultSpecError(f"fault {spec!r}: step=N is required for {kind}")
    fault = Fault(kind=kind, **values)
    if fault.rank < 0 or fault.step < 1 or (fault.attempt is not None and fault.attempt < 0):
        raise FaultSpecError(f"fault {spec!r}: rank and attempt must be >= 0, step >= 1")
    if kind == "sleep" and fault.factor < 1:
        raise FaultSpecError(f"fault {spec!r}: factor must be >= 1 (a slowdown)")
    return fault


def parse_faults(specs: list[str]) -> list[Fault]:
    return [parse_fault(s) for s in specs]


def _block_in_collective(group) -> None:
    """The injected hang: a barrier on a group whose other members never call it (the frame a
    stack dump must show). Without peers (world 1) there is no collective to block in."""
    import torch.distributed as dist

    if dist.get_world_size(group) > 1:
        dist.barrier(group=group)
    threading.Event().wait()


class FaultInjector:
    """The faults of one rank in one attempt. `setup` is collective (every rank calls it)."""

    def __init__(self, faults: list[Fault], *, rank: int, attempt: int, record_cause: Callable[[str], None]):
        def live(f: Fault) -> bool:
            return f.attempt is None or f.attempt == attempt

        self.mine = [f for f in faults if f.rank == rank and live(f)]
        self._any_hang = any(f.kind == "hang" and live(f) for f in faults)
        self.rank, self.record_cause = rank, record_cause
        self._group = None
        self._own_s: float | None = None

    def setup(self) -> None:
        if self._any_hang:
            import torch.distributed as dist

            # new_group is collective: every rank creates it, only the hanging rank uses it.
            self._group = dist.new_group(backend="gloo")

    def at_step_start(self, step: int) -> None:
        self._fire(step, "step")

    def at_checkpoint(self, step: int) -> None:
        """Inside the checkpoint write after step `step` (before this rank writes its parts)."""
        self._fire(step, "checkpoint")

    def _fire(self, step: int, phase: str) -> None:
        for f in self.mine:
            if f.step != step or f.phase != phase or f.kind == "sleep":
                continue
            where = f"rank {self.rank}, step {step}" + (", checkpoint write" if phase == "checkpoint" else "")
            if f.kind == "kill":
                self.record_cause(f"injected kill ({where})")
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "raise":
                raise RuntimeError(f"injected failure ({where})")
            elif f.kind == "hang":
                _block_in_collective(self._group)

    def slow_down(self, step: int) -> float:
        """Sleep for the active `sleep` faults (call inside the data phase); seconds slept."""
        slept = 0.0
        for f in self.mine:
            if f.kind == "sleep" and step >= f.step and self._own_s is not None:
                time.sleep((f.factor - 1.0) * self._own_s)
                slept += (f.factor - 1.0) * self._own_s
        return slept

    def observe(self, own_s: float, slept_s: float) -> None:
        """The rank's own time of the step just done, so the next sleep scales the unslowed time."""
        self._own_s = max(0.0, own_s - slept_s)
