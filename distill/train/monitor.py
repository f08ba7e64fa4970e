"""Watching a training run: straggler detection, the hang watchdog, goodput accounting.

The logic is pure and unit-tested without a process group: `StragglerDetector` decides from
per-rank step times, `hang_timeout` derives the watchdog's limit from recent steps, `goodput`
turns the step and attempt records a run leaves on disk into wall vs productive time. The one
piece with a side effect is `HangWatchdog`, a daemon thread that dumps every thread's Python stack
and ends the process when a step does not finish in time (stdlib only: threading, faulthandler).

What a rank's own time is: every step starts with a sync point (the loop's barrier after loading
data), so a rank that arrives late makes the others wait there and that wait is booked as their
communication time, not as work. A straggler is then a rank whose data + compute time is well
above the others'. Compute (forward + backward) still holds the collectives a backend overlaps
with backward (ZeRO-2/3 gradient reduction), so a rank that is slow *inside* backward is diluted
by its peers' waits there; skew that arises before compute (input pipeline, host stalls, a slow
CPU) is measured exactly.
"""

from __future__ import annotations

import faulthandler
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from distill.fsio import atomic_write_json, read_jsonl

if TYPE_CHECKING:
    from distill.train.config import FaultSection

STEP_TIME_KEYS = ("step", "rank", "node", "attempt", "data_s", "compute_s", "comm_s", "step_s", "time")
"""Keys of one line of RUN/train/step_times/rank-NNNNN.jsonl (read by the run report)."""

HANG_EXIT_CODE = 86
"""Exit status of a rank the watchdog ended (distinguishes a hang from a crash in launcher logs)."""


def step_times_path(train_dir: Path, rank: int) -> Path:
    return Path(train_dir) / "step_times" / f"rank-{rank:05d}.jsonl"


def hang_dump_path(dump_dir: Path, attempt: int, rank: int) -> Path:
    return Path(dump_dir) / f"attempt-{attempt}" / f"rank-{rank}.txt"


def append_jsonl(path: Path, obj: dict) -> None:
    """One line appended with a single write (lines from several ranks do not interleave)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_log(path: Path) -> list[dict]:
    """Records of one of the JSONL logs above; none when it does not exist yet, and a torn last
    line (a rank killed mid-write) is skipped."""
    return read_jsonl(path, skip_invalid=True) if Path(path).is_file() else []


# --------------------------------------------------------------------------- stragglers


def straggler_threshold(others: Sequence[float], *, ratio: float, mad_k: float) -> float:
    """Own time above which a rank is slow, given the other ranks' (window-median) times. Pure.

    max(ratio * median, median + mad_k * 1.4826 * MAD): the ratio alone is the rule for a few
    ranks; with many, a naturally wide spread (MAD) raises the bar so ordinary jitter is not a
    straggler. 1.4826 scales the MAD to a standard deviation for normal noise."""
    arr = np.asarray(others, dtype=np.float64)
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med)))
    return max(ratio * med, med + mad_k * 1.4826 * mad)


@dataclass
class StragglerFlag:
    step: int
    """The step that closed the window in which the rank was flagged."""
    rank: int
    ratio: float
    """The rank's window median over the median of the other ranks' window medians."""
    windows: int
    """Consecutive windows the rank has been over the threshold."""


@dataclass
class StragglerDetector:
    """Per-rank sliding windows of own step time; a rank is flagged once it has been over
    `straggler_threshold` for `windows` consecutive windows of `window` steps. Every rank can run
    its own copy on the same gathered times and reach the same decision without another
    collective. Pure (no clock, no I/O)."""

    world: int
    window: int
    windows: int
    ratio: float
    mad_k: float
    _buf: list[list[float]] = field(init=False, default_factory=list)
    _over: list[int] = field(init=False)
    last_ratios: list[float] = field(init=False)
    """Each rank's ratio in the last closed window (for metrics)."""

    def __post_init__(self):
        self._over = [0] * self.world
        self.last_ratios = [1.0] * self.world

    def add(self, step: int, own_s: Sequence[float]) -> list[StragglerFlag]:
        """Feed one step's own time of every rank; the ranks that cross into flagged state now."""
        if len(own_s) != self.world:
            raise ValueError(f"{len(own_s)} times for a world of {self.world}")
        self._buf.append([float(x) for x in own_s])
        if len(self._buf) < self.window or self.world < 2:
            return []
        medians = np.median(np.asarray(self._buf), axis=0)
        self._buf = []
        flags = []
        for r in range(self.world):
            others = np.delete(medians, r)
            ref = float(np.median(others))
            self.last_ratios[r] = float(medians[r] / ref) if ref > 0 else 1.0
            if medians[r] > straggler_threshold(others, ratio=self.ratio, mad_k=self.mad_k):
                self._over[r] += 1
                if self._over[r] == self.windows:  # once per episode, not every window after
                    flags.append(StragglerFlag(step, r, self.last_ratios[r], self._over[r]))
            else:
                self._over[r] = 0
        return flags


# --------------------------------------------------------------------------- hang watchdog


def hang_timeout(configured: float | None, recent_step_s: Sequence[float], *, min_s: float, factor: float,
                 first_step_s: float) -> float:
    """Seconds a step may take before the watchdog fires. Pure.

    A configured value wins. Otherwise `first_step_s` until a step has completed (the first
    step also pays for warm-up: allocator, kernels, communicator setup), then
    max(min_s, factor * median of the recent steps)."""
    if configured is not None:
        return float(configured)
    if len(recent_step_s) == 0:
        return float(first_step_s)
    return max(float(min_s), float(factor) * float(np.median(np.asarray(recent_step_s, dtype=np.float64))))


class HangWatchdog:
    """A daemon thread that ends this process when an armed step runs past its timeout.

    On expiry it writes a header and every thread's Python stack (faulthandler) to `dump_path`,
    calls `on_hang(message)` (the loop records the cause), waits `grace_s` so the peers blocked in
    the same collective reach their own timeout and dump too, then `exit(HANG_EXIT_CODE)`. The
    default exit is os._exit: a thread stuck in a C++ collective cannot be interrupted, so the
    process is ended and the launcher restarts the group (Ray Train: the actor died; torchrun:
    a rank exited non-zero)."""

    def __init__(self, dump_path: Path, *, header: str, on_hang: Callable[[str], None] | None = None,
                 grace_s: float = 5.0, exit: Callable[[int], None] = os._exit, poll_s: float = 0.2):
        self.dump_path, self.header, self.on_hang = Path(dump_path), header, on_hang
        self.grace_s, self._exit, self.poll_s = grace_s, exit, poll_s
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._armed_at = 0.0
        self._step = 0
        self._what = ""
        self._stop = threading.Event()
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distill-hang-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step: int, timeout_s: float, what: str | None = None) -> None:
        """Watch from now for `timeout_s`; `what` names the phase in the dump and the cause
        (default "step N")."""
        with self._lock:
            self._step, self._armed_at = step, time.monotonic()
            self._what = what or f"step {step}"
            self._deadline = self._armed_at + timeout_s

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                deadline, what, armed_at = self._deadline, self._what, self._armed_at
            if deadline is None or time.monotonic() < deadline:
                continue
            waited = time.monotonic() - armed_at
            message = (f"hang: {what} made no progress for {waited:.1f}s "
                       f"(timeout {deadline - armed_at:.1f}s)")
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_path, "w") as f:
                f.write(f"{self.header}\n{message}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            self.fired.set()
            if self.on_hang is not None:
                self.on_hang(message)
            time.sleep(self.grace_s)
            self._exit(HANG_EXIT_CODE)
            return


# --------------------------------------------------------------------------- goodput


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def goodput(starts: list[dict], causes: dict[int, str], steps: list[dict], *, wall_s: float, now: float) -> dict:
    """Wall time vs productive step time of one launch, and what each failure cost. Pure.

    `starts`: the launch's attempts in order, {"attempt", "started" (unix s), "resumed_from_step"};
    `causes`: the first recorded cause per attempt; `steps`: rank 0's step records of the launch
    (STEP_TIME_KEYS). A step is productive in the attempt that last ran it (earlier runs of it
    were thrown away by a restart). A failure's lost time runs from the last progress the restart
    kept (the end of the step it resumed from, or the failed attempt's start if it kept nothing)
    to the start of the next step any later attempt ran; recover time runs from the failed
    attempt's last sign of life (its last step end) to that same point: detection, restart and
    reload. The top-level lost_s counts overlapping failures once."""
    starts = sorted(starts, key=lambda s: s["attempt"])
    by_attempt: dict[int, list[dict]] = {s["attempt"]: [] for s in starts}
    for rec in steps:
        if rec["attempt"] in by_attempt:
            by_attempt[rec["attempt"]].append(rec)
    kept: dict[int, dict] = {}
    for s in starts:
        for rec in sorted(by_attempt[s["attempt"]], key=lambda r: r["step"]):
            kept[rec["step"]] = rec  # later attempts overwrite: their run of the step is the one kept
    productive = float(sum(r["step_s"] for r in kept.values()))
    failures, intervals = [], []
    for i, s in enumerate(starts[:-1]):
        recs = sorted(by_attempt[s["attempt"]], key=lambda r: r["time"])
        resumed = starts[i + 1]["resumed_from_step"]
        kept_end = next((r["time"] for r in recs if r["step"] == resumed), s["started"])
        last_alive = recs[-1]["time"] if recs else s["started"]
        later = [r["time"] - r["step_s"] for t in starts[i + 1:] for r in by_attempt[t["attempt"]]]
        progress = min(later) if later else now
        failures.append({"attempt": s["attempt"], "cause": causes.get(s["attempt"], "unknown (no cause recorded: "
                                                                                      "process killed or node lost)"),
                         "failed_at_step": max((r["step"] for r in recs), default=s["resumed_from_step"]),
                         "resumed_from_step": resumed, "lost_s": round(progress - kept_end, 3),
                         "recover_s": round(progress - last_alive, 3)})
        intervals.append((kept_end, progress))
    return {"wall_s": round(wall_s, 3), "productive_s": round(productive, 3),
            "goodput": round(productive / wall_s, 4) if wall_s > 0 else 0.0,
            "restarts": len(starts) - 1, "lost_s": round(_merged_length(intervals), 3), "failures": failures}


# --------------------------------------------------------------------------- run records

ATTEMPTS_FILE = "attempts.jsonl"
"""RUN/train/attempts.jsonl: one "start" line per attempt (rank 0) and "cause" lines (any rank
that knows why its attempt ended: an injected fault, an error, a hang, a straggler restart)."""
STRAGGLERS_FILE = "stragglers.jsonl"
GOODPUT_FILE = "goodput.json"


def next_attempt(train_dir: Path, launch: float) -> int:
    """The attempt number the group starting now has within launch `launch` (0 for the first)."""
    return sum(1 for r in read_log(Path(train_dir) / ATTEMPTS_FILE)
               if r.get("event") == "start" and r.get("launch") == launch)


def launch_records(train_dir: Path, launch: float) -> tuple[list[dict], dict[int, str], list[str]]:
    """(start records, first cause per attempt, nodes a straggler restart excluded) of a launch."""
    starts, causes, excluded = [], {}, []
    for r in read_log(Path(train_dir) / ATTEMPTS_FILE):
        if r.get("launch") != launch:
            continue
        if r["event"] == "start":
            starts.append(r)
        elif r["event"] == "cause":
            causes.setdefault(r["attempt"], r["cause"])
            if r.get("exclude_node") and r["exclude_node"] not in excluded:
                excluded.append(r["exclude_node"])
    return starts, causes, excluded


def launch_goodput(train_dir: Path, launch: float, *, now: float) -> dict:
    """`goodput` of launch `launch` from the records on disk (rank 0's step times)."""
    starts, causes, _ = launch_records(train_dir, launch)
    steps = [r for r in read_log(step_times_path(train_dir, 0)) if r["time"] >= launch]
    return goodput(starts, causes, steps, wall_s=now - launch, now=now)


def write_goodput(train_dir: Path, report: dict) -> Path:
    path = Path(train_dir) / GOODPUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report, indent=1)
    return path


class StepMonitor:
    """One rank's per-step bookkeeping: step-time records, the straggler detector over every
    rank's gathered times, the hang watchdog armed around each step, cause records.

    `gather(values)` is the collective the loop provides (all-gather of a few floats; every rank
    calls it with the same length and gets one list per rank). With straggler policy `off`
    nothing is gathered and the step has no sync point."""

    def __init__(self, cfg: "FaultSection", train_dir: Path, *, rank: int, world: int, node: str,
                 nodes: list[str], attempt: int, launch: float, gather: Callable[[list[float]], list[list[float]]],
                 log: Callable[[str], None] = print):
        self.cfg, self.train_dir, self.rank, self.node, self.nodes = cfg, Path(train_dir), rank, node, nodes
        self.attempt, self.launch, self.gather, self.log = attempt, launch, gather, log
        st = cfg.straggler
        self.detector = None if st.policy == "off" else StragglerDetector(world, st.window, st.windows, st.ratio,
                                                                          st.mad_k)
        self.recent: list[float] = []
        dump_dir = Path(cfg.dump_dir) if cfg.dump_dir else self.train_dir / "hang-dumps"
        self.watchdog = HangWatchdog(hang_dump_path(dump_dir, attempt, rank), on_hang=self.record_cause,
                                     header=f"rank {rank} (node {node}, pid {os.getpid()}), attempt {attempt}")

    def record_start(self, *, started: float, resumed_from_step: int) -> None:
        append_jsonl(self.train_dir / ATTEMPTS_FILE, {"event": "start", "launch": self.launch, "attempt": self.attempt,
                                                      "started": started, "resumed_from_step": resumed_from_step,
                                                      "nodes": self.nodes})

    def record_cause(self, cause: str, **extra) -> None:
        append_jsonl(self.train_dir / ATTEMPTS_FILE, {"event": "cause", "launch": self.launch, "attempt": self.attempt,
                                                      "rank": self.rank, "cause": cause, "time": time.time(), **extra})

    def begin(self, step: int) -> None:
        """Arm the watchdog for `step` (1-based, the step about to run)."""
        cfg = self.cfg
        self.watchdog.arm(step, hang_timeout(cfg.hang_timeout_s, self.recent[-50:], min_s=cfg.hang_min_timeout_s,
                                             factor=cfg.hang_factor, first_step_s=cfg.first_step_timeout_s))

    def guard(self, what: str, timeout_s: float) -> None:
        """Watch a phase that is not a step (start-up, a checkpoint write) with its own timeout;
        a hang there dumps stacks and restarts the group like a hung step. `begin` or `unguard`
        ends it."""
        self.watchdog.arm(0, timeout_s, what)

    def unguard(self) -> None:
        self.watchdog.disarm()

    def sync(self, barrier: Callable[[], None]) -> float:
        """The step's sync point after loading data; seconds this rank waited in it."""
        if self.detector is None:
            return 0.0
        t0 = time.perf_counter()
        barrier()
        return time.perf_counter() - t0

    def end(self, step: int, *, data_s: float, compute_s: float, comm_s: float, step_s: float) -> list[dict]:
        """Record the finished step, run the detector; the straggler lines flagged now."""
        append_jsonl(step_times_path(self.train_dir, self.rank),
                     {"step": step, "rank": self.rank, "node": self.node, "attempt": self.attempt, "data_s": data_s,
                      "compute_s": compute_s, "comm_s": comm_s, "step_s": step_s, "time": time.time()})
        self.recent.append(step_s)
        lines = []
        if self.detector is not None:
            own = [row[0] for row in self.gather([data_s + compute_s])]
            policy = self.cfg.straggler.policy
            for flag in self.detector.add(step, own):
                node = self.nodes[flag.rank]
                lines.append({"step": flag.step, "rank": flag.rank, "node": node, "ratio": round(flag.ratio, 3),
                              "windows": flag.windows, "policy": policy,
                              "action": "warned" if policy == "warn" else "restart_without_node"})
                if self.rank == 0:
                    append_jsonl(self.train_dir / STRAGGLERS_FILE, lines[-1])
                    self.log(f"train: straggler: rank {flag.rank} (node {node}) took {flag.ratio:.2f}x the other "
                             f"ranks' median step time for {flag.windows} windows of "
                             f"{self.cfg.straggler.window} steps (policy {policy})")
        self.watchdog.disarm()
        return lines

    @property
    def max_ratio(self) -> float | None:
        return max(self.detector.last_ratios) if self.detector is not None else None

    def close(self) -> None:
        self.watchdog.close()
