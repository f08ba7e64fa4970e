"""Generate + curation at scale: wall time per stage, samples/s and peak memory of `distill run`.

A loopback teacher (OpenAI-compatible, served by this process on 127.0.0.1) answers every request
with a long-CoT-like completion: a `<think>` block whose length in words is lognormal (median
~3,000 words, as R1 traces on GSM8K-level questions; `--mean-words`, `--sigma`), then a final
`\\boxed{}` that is right for `--correct` of the samples. The seed questions are GSM8K train
questions replicated to the requested count under distinct ids: copies past the first pass get an
irrelevant context sentence borrowed from another question (so they stay distinct for dedup),
and `--dup-share` of them are near-duplicate rewordings (a word dropped, or case and spacing
changed) that dedup should remove. Then the real CLI runs every curation stage against it:

    distill run CONFIG  (stages generate, verify, filter, dedup, decontam, sft; engine openai)

in a subprocess whose RSS, and that of every Ray worker it spawns (`ray::ClassName`), is polled
every `--poll-s`. Only the CLI and a config written here are used, with keys that exist since
Ray sections and the openai engine were added, so `--repo` can point at any checkout:

    git worktree add /tmp/distill-before HEAD
    .venv/bin/python tools/bench_scale.py --sizes 10000,30000 --repo /tmp/distill-before \\
        --label before --out tools/data/bench_scale_before.jsonl
    .venv/bin/python tools/bench_scale.py --sizes 10000,30000 --label after

Prints a JSON line per size (appended to `--out` too) and a markdown table at the end.
Everything runs on this machine: the teacher server shares the CPUs with the pipeline (it is the
same server for every checkout, so comparisons stay fair; its CPU time is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
STAGES = ("generate", "verify", "filter", "dedup", "decontam", "sft")
TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
TOKENS_PER_WORD = 1.3
"""Completion tokens the server reports per word (R1-family tokenizers on English math prose)."""


# --------------------------------------------------------------------------- questions


def load_questions(path: Path) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"problem": r["problem"], "answer": str(r["answer"])} for r in rows if r.get("problem")]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _context(base: list[dict], i: int, min_words: int) -> str:
    """Leading sentences of the questions after `i` (never the asked sentence) until at least
    `min_words` words: an irrelevant context that lowers the word-bigram Jaccard with question
    `i` well under dedup's 0.8 threshold."""
    words, parts, j = 0, [], i
    while words < min_words:
        j = (j + 7919) % len(base)  # a prime stride: neighbours in the list are often similar
        for s in _sentences(base[j]["problem"])[:-1]:  # one-sentence questions give nothing
            parts.append(s)
            words += len(s.split())
            if words >= min_words:
                break
    return " ".join(parts)


def _reword(problem: str, rng: random.Random) -> str:
    """A near duplicate: one word dropped, or the same text in another case and spacing."""
    words = problem.split()
    if rng.random() < 0.5 and len(words) > 8:
        del words[rng.randrange(1, len(words) - 1)]
        return " ".join(words)
    return "  ".join(words).lower()


def build_questions(base: list[dict], count: int, dup_share: float, seed: int = 0) -> list[dict]:
    """`count` questions with distinct ids: `base` in order, then copies with an irrelevant
    context; a `dup_share` of all of them are rewordings of an earlier question (same answer)."""
    rng = random.Random(seed)
    out: list[dict] = []
    n_base = 0
    for k in range(count):
        if out and rng.random() < dup_share:
            src = out[rng.randrange(len(out))]
            out.append({"id": f"bench-{k}", "problem": _reword(src["problem"], rng), "answer": src["answer"]})
            continue
        q = base[n_base % len(base)]
        rep = n_base // len(base)
        problem = q["problem"]
        if rep:
            ctx = _context(base, (n_base + 104729 * rep) % len(base), max(12, len(problem.split()) // 2))
            problem = f"{ctx} {problem}"
        out.append({"id": f"bench-{k}", "problem": problem, "answer": q["answer"]})
        n_base += 1
    return out


# --------------------------------------------------------------------------- completions

_VOCAB = ("so we need the total number of first then let me check again wait that is not right "
          "because each one has twice as many half more less per day week hour minutes dollars cost "
          "price left remaining after she he they gives buys sells makes uses altogether sum difference "
          "product divide multiply add subtract equals means which gives us hmm actually maybe I should "
          "recompute this step carefully since the problem says every and only if also but hence thus "
          "therefore answer question number value calculate compute find amount rate time distance "
          "speed ratio percent fraction whole part group box bag apples cookies students pages miles "
          "okay alternatively another way to see it is consider case where if we assume suppose").split()


def _sentence_pool(n: int = 4096, seed: int = 0) -> list[str]:
    """Reasoning-like sentences (words, small numbers and arithmetic); drawn from a pool of
    thousands, a completion's last 400 words repeat no 8-gram (the repetition filter's view)."""
    rng = random.Random(seed)
    pool = []
    for _ in range(n):
        words = [rng.choice(_VOCAB) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.4:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            words.insert(rng.randrange(len(words)), f"{a} * {b} = {a * b},")
        words[0] = words[0].capitalize()
        pool.append(" ".join(words) + rng.choice(".?."))
    return pool


_POOL = _sentence_pool()
_POOL_WORDS = [len(s.split()) for s in _POOL]


def _rng(*parts: object) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little"))


@dataclass(frozen=True)
class Teacher:
    """How completions look: reasoning length lognormal in words, a share of right answers."""

    mean_words: float = 3600.0
    sigma: float = 0.6
    correct: float = 0.7

    @property
    def median_words(self) -> float:
        return self.mean_words / math.exp(self.sigma ** 2 / 2)

    def completion(self, problem: str, answer: str, seed: object) -> tuple[str, int]:
        """(text, words): fixed by (problem, seed)."""
        rng = _rng(problem, seed)
        target = max(20, int(rng.lognormvariate(math.log(self.median_words), self.sigma)))
        parts, words = [], 0
        while words < target:
            i = rng.randrange(len(_POOL))
            parts.append(_POOL[i])
            words += _POOL_WORDS[i]
        final = answer if rng.random() < self.correct else _wrong(answer, rng)
        tail = f"Therefore, the final answer is $\\boxed{{{final}}}$."
        return f"<think>\n{' '.join(parts)}\n</think>\n\n{tail}", words + len(tail.split())


def _wrong(answer: str, rng: random.Random) -> str:
    try:
        return str(int(float(answer.replace(",", ""))) + rng.randint(1, 9))
    except ValueError:
        return answer + "1"


def respond(teacher: Teacher, answers: dict[str, str], prompt: str, seed: object,
            max_tokens: int) -> tuple[str, str, int, bool]:
    """(text, finish_reason, completion_tokens, known): cut at `max_tokens` like a model would."""
    problem = prompt.rsplit("\nPlease reason step by step", 1)[0]
    known = problem in answers
    text, words = teacher.completion(problem, answers.get(problem, "?"), seed)
    tokens = math.ceil(words * TOKENS_PER_WORD)
    if tokens <= max_tokens:
        return text, "stop", tokens, known
    keep = int(max_tokens / TOKENS_PER_WORD)
    return " ".join(text.split()[:keep]), "length", max_tokens, known


class TeacherServer:
    """`POST /v1/chat/completions` on 127.0.0.1 from a daemon thread (plain aiohttp, so the same
    server runs against any checkout). Counters are read after the client is done."""

    def __init__(self, teacher: Teacher, answers: dict[str, str]):
        self.teacher, self.answers = teacher, answers
        self.requests = self.unknown = self.truncated = self.words = 0
        self.cpu_s = 0.0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request):
        from aiohttp import web

        body = await request.json()
        prompt = next((str(m.get("content", "")) for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        t0 = time.thread_time()
        text, finish, tokens, known = respond(self.teacher, self.answers, prompt, body.get("seed"),
                                              int(body.get("max_tokens") or 16))
        payload = json.dumps({
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "bench"),
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": tokens,
                      "total_tokens": len(prompt.split()) + tokens},
        })
        self.cpu_s += time.thread_time() - t0
        self.requests += 1
        self.unknown += not known
        self.truncated += finish == "length"
        self.words += int(tokens / TOKENS_PER_WORD)
        return web.Response(text=payload, content_type="application/json")

    def __enter__(self) -> "TeacherServer":
        started = threading.Event()

        def serve():
            from aiohttp import web

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="bench-teacher", daemon=True)
        self._thread.start()
        started.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


# --------------------------------------------------------------------------- memory polling


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssShmem (KiB) from /proc/PID/status; {} once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


@dataclass
class ProcPeak:
    title: str
    rss: int = 0
    """Largest VmRSS seen by polling (KiB)."""
    hwm: int = 0
    """Largest VmHWM seen: the kernel's own peak RSS, which catches spikes between polls (KiB)."""
    anon: int = 0
    """Largest RssAnon seen: RSS without file and shared-memory pages, i.e. not Ray's object
    store mappings (KiB)."""


@dataclass
class MemoryPoller:
    """Polls the CLI process and every process under it (Raylet, GCS, Ray workers) every
    `interval` seconds from a thread. Ray workers are those whose cmdline starts with `ray::`
    (Ray retitles them `ray::ClassName` / `ray::IDLE`); the title kept is the last non-idle one."""

    pid: int
    interval: float = 0.2
    driver: ProcPeak = field(default_factory=lambda: ProcPeak("driver"))
    workers: dict[int, ProcPeak] = field(default_factory=dict)
    tree_rss: int = 0
    """Largest sum of VmRSS over the whole process tree (KiB; counts shared pages once per process)."""
    cpu_s: dict[int, float] = field(default_factory=dict)
    """User + system CPU seconds per pid of the tree, as last polled (the last interval of each
    process is lost): load on the machine stretches wall time far more than CPU time."""
    polls: int = 0
    driver_samples: list = field(default_factory=list)
    """(monotonic seconds, VmRSS KiB, RssAnon KiB) of the driver at every poll: where it grows."""

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def start(self) -> "MemoryPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            self.poll(root)
            self._stop.wait(self.interval)

    def poll(self, root) -> None:
        import psutil

        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in [root, *children]:
            st = _status_kib(proc.pid)
            if not st:
                continue
            total += st.get("VmRSS", 0)
            try:
                t = proc.cpu_times()
                self.cpu_s[proc.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
            if proc.pid == self.pid:
                peak = self.driver
                self.driver_samples.append((time.monotonic(), st.get("VmRSS", 0), st.get("RssAnon", 0)))
            else:
                try:
                    title = " ".join(" ".join(proc.cmdline()).split())  # Ray pads titles with spaces
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if not title.startswith("ray::"):
                    continue
                peak = self.workers.setdefault(proc.pid, ProcPeak(title))
                if not title.startswith("ray::IDLE"):
                    peak.title = title
            peak.rss = max(peak.rss, st.get("VmRSS", 0))
            peak.hwm = max(peak.hwm, st.get("VmHWM", 0))
            peak.anon = max(peak.anon, st.get("RssAnon", 0))
        self.tree_rss = max(self.tree_rss, total)
        self.polls += 1

    def largest_worker(self) -> ProcPeak | None:
        return max(self.workers.values(), key=lambda p: max(p.rss, p.hwm), default=None)


# --------------------------------------------------------------------------- one run


def write_config(path: Path, run_dir: Path, source: Path, base_url: str, args, benchmarks: list[Path]) -> None:
    import yaml

    cfg = {
        "run": {"dir": str(run_dir), "stages": list(STAGES), "progress": False},
        "ray": {"num_cpus": args.ray_cpus},
        "source": {"path": str(source), "columns": {"problem": "problem", "answer": "answer", "id": "id"}},
        "generate": {
            "engine": "openai", "n_samples": args.n_samples, "shard_size": args.gen_shard_size,
            "replicas": args.replicas, "cpus_per_replica": 1,
            "prompt": {"template": TEMPLATE},
            "sampling": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": args.max_new_tokens, "seed": 0},
            "openai": {"base_url": base_url, "model": "bench-teacher", "api_key_env": None,
                       "concurrency": args.concurrency, "timeout_s": 600},
        },
        "curate": {
            "shard_size": args.curate_shard_size, "workers": args.workers,
            "decontam": {"benchmarks": [{"name": p.stem, "path": str(p)} for p in benchmarks]},
            "sft": {"user_template": TEMPLATE},
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def stage_walls(lines: list[tuple[float, str]]) -> tuple[dict[str, float | None], float | None]:
    """Wall seconds per stage from the CLI's timestamped output lines, and the time at which the
    stages started (the `ray:` line; before it: imports, preflight, ingest, Ray start). A stage
    ends at its last line `STAGE: ...`; it starts where the previous one ended."""
    start = next((t for t, s in lines if s.startswith("ray:")), None)
    ends = {st: max((t for t, s in lines if s.startswith(f"{st}:")), default=None) for st in STAGES}
    walls: dict[str, float | None] = {}
    prev = start
    for st in STAGES:
        end = ends[st]
        walls[st] = round(end - prev, 2) if end is not None and prev is not None else None
        prev = end if end is not None else prev
    return walls, start


def driver_peak_by_stage(samples: list, lines: list[tuple[float, str]], t0: float) -> dict[str, float | None]:
    """The driver's largest RSS (MiB) while each stage ran (windows as in `stage_walls`; "startup"
    is everything before the `ray:` line), to see which stage's memory grows with the data."""
    walls, start = stage_walls(lines)
    edges, at = [("startup", 0.0, start if start is not None else 0.0)], start or 0.0
    for st in STAGES:
        if walls[st] is not None:
            edges.append((st, at, at + walls[st]))
            at += walls[st]
    out = {}
    for name, lo, hi in edges:
        inside = [rss for t, rss, _ in samples if lo <= t - t0 <= hi]
        out[name] = _mib(max(inside)) if inside else None
    return out


def _manifest(run_dir: Path, stage: str) -> dict:
    try:
        return json.loads((run_dir / stage / "_manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _git_head(repo: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def run_size(size: int, args, base: list[dict], benchmarks: list[Path], work: Path) -> dict:
    n_questions = math.ceil(size / args.n_samples)
    questions = build_questions(base, n_questions, args.dup_share)
    run_root = work / f"size-{size}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    source = run_root / "questions.jsonl"
    with open(source, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    answers = {q["problem"]: q["answer"] for q in questions}
    teacher = Teacher(args.mean_words, args.sigma, args.correct)
    env = {**os.environ, "PYTHONPATH": str(args.repo), "PYTHONUNBUFFERED": "1",
           # Ray's object store would take 30% of RAM; a modest fixed store keeps RSS comparable.
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": f"{args.object_store_gb * 2**30 / _total_ram():.4f}"}
    env.pop("RAY_ADDRESS", None)
    load_before = os.getloadavg()
    with TeacherServer(teacher, answers) as server:
        config = run_root / "bench.yaml"
        write_config(config, run_root / "run", source, server.base_url, args, benchmarks)
        cmd = [args.python, "-m", "distill.cli", "run", str(config)]
        t0, cpu0 = time.monotonic(), time.process_time()
        proc = subprocess.Popen(cmd, cwd=run_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        poller = MemoryPoller(proc.pid, args.poll_s).start()
        lines: list[tuple[float, str]] = []
        with open(run_root / "cli.log", "w") as log:
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                log.write(f"{lines[-1][0]:9.2f} {line}")
                if args.verbose:
                    print(f"  [{lines[-1][0]:7.1f}s] {line}", end="", file=sys.stderr)
        rc = proc.wait()
        wall, tool_cpu = time.monotonic() - t0, time.process_time() - cpu0
        poller.stop()
    if rc != 0:
        tail = "\n".join(s for _, s in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc} (log: {run_root / 'cli.log'}):\n{tail}")

    walls, stages_start = stage_walls(lines)
    manifests = {st: _manifest(run_root / "run", st) for st in STAGES}
    worker = poller.largest_worker()
    row = {
        "label": args.label, "size": size, "questions": n_questions, "n_samples": args.n_samples,
        "repo": str(args.repo), "commit": _git_head(args.repo),
        "wall_s": round(wall, 2),
        "samples_per_s": round(size / wall, 1),
        "startup_s": round(stages_start, 2) if stages_start is not None else None,
        "stage_wall_s": walls,
        "stage_manifest_s": {st: m.get("summary", {}).get("seconds") for st, m in manifests.items()},
        "kept": {st: m.get("counts", {}).get("records") for st, m in manifests.items()},
        "driver_peak_rss_mib": _mib(max(poller.driver.rss, poller.driver.hwm)),
        "driver_peak_anon_mib": _mib(poller.driver.anon),
        "driver_peak_by_stage_mib": driver_peak_by_stage(poller.driver_samples, lines, t0),
        "ray_worker_peak_rss_mib": _mib(max(worker.rss, worker.hwm)) if worker else None,
        "ray_worker_peak_anon_mib": _mib(max(p.anon for p in poller.workers.values())) if worker else None,
        "ray_worker_peak_title": worker.title if worker else None,
        "ray_workers_seen": len(poller.workers),
        "tree_peak_rss_mib": _mib(poller.tree_rss),
        "driver_cpu_s": round(poller.cpu_s.get(proc.pid, 0.0), 1),
        "ray_workers_cpu_s": round(sum(poller.cpu_s.get(pid, 0.0) for pid in poller.workers), 1),
        "tree_cpu_s": round(sum(poller.cpu_s.values()), 1),
        "polls": poller.polls,
        "teacher": {"mean_words": args.mean_words, "sigma": args.sigma, "correct": args.correct,
                    "served": server.requests, "served_mean_words": round(server.words / max(server.requests, 1)),
                    "truncated": server.truncated, "unknown_prompts": server.unknown,
                    "server_cpu_s": round(server.cpu_s, 1),
                    # This process: the server (aiohttp included), the poller, the log reader.
                    "tool_cpu_s": round(tool_cpu, 1)},
        "config": {"gen_shard_size": args.gen_shard_size, "curate_shard_size": args.curate_shard_size,
                   "workers": args.workers, "replicas": args.replicas, "concurrency": args.concurrency,
                   "ray_cpus": args.ray_cpus, "object_store_gb": args.object_store_gb},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if not args.keep:
        shutil.rmtree(run_root, ignore_errors=True)
    return row


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def markdown(rows: list[dict]) -> str:
    head = (["label", "samples", "wall s", "samples/s"] + [f"{st} s" for st in STAGES]
            + ["CPU s (tree)", "driver peak MiB", "largest Ray worker MiB", "load before"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        walls = [f"{r['stage_wall_s'][st]:.1f}" if r["stage_wall_s"][st] is not None else "-" for st in STAGES]
        worker = (f"{r['ray_worker_peak_rss_mib']:,.0f} ({r['ray_worker_peak_title'].split()[0]})"
                  if r["ray_worker_peak_rss_mib"] is not None else "-")
        out.append("| " + " | ".join([r["label"], f"{r['size']:,}", f"{r['wall_s']:.0f}", f"{r['samples_per_s']:.0f}",
                                      *walls, f"{r['tree_cpu_s']:.0f}", f"{r['driver_peak_rss_mib']:,.0f}", worker,
                                      f"{r['load_before'][0]:.2f}"]) + " |")
    return "\n".join(out)


def _check_import(args) -> None:
    """The CLI must import distill from --repo, not from wherever the venv installed it."""
    r = subprocess.run([args.python, "-c", "import distill, os; print(os.path.realpath(distill.__file__))"],
                       env={**os.environ, "PYTHONPATH": str(args.repo)}, cwd=tempfile.gettempdir(),
                       capture_output=True, text=True)
    where = r.stdout.strip()
    if r.returncode or not where.startswith(str(args.repo.resolve()) + os.sep):
        sys.exit(f"bench_scale: {args.python} imports distill from {where or r.stderr.strip()!r}, not from "
                 f"--repo {args.repo}; pass --python with an interpreter whose site-packages do not shadow it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,30000,100000", help="comma-separated sample counts")
    p.add_argument("--label", default="current", help="names the rows (e.g. before / after)")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose CLI runs (PYTHONPATH)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the CLI")
    p.add_argument("--questions", type=Path, default=DATA / "train" / "gsm8k_train.jsonl",
                   help="seed questions, JSONL with problem and answer")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated JSONL files for decontam (default: gsm8k.jsonl and math500.jsonl in "
                        "../benchmarks next to --questions' directory)")
    p.add_argument("--n-samples", type=int, default=4, help="samples per question (questions = size / this)")
    p.add_argument("--mean-words", type=float, default=3600.0,
                   help="mean reasoning length in words (lognormal; 3600 with --sigma 0.6 is a median of ~3000)")
    p.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of the reasoning length")
    p.add_argument("--correct", type=float, default=0.7, help="share of samples whose boxed answer is right")
    p.add_argument("--dup-share", type=float, default=0.03, help="share of questions that reword an earlier one")
    p.add_argument("--max-new-tokens", type=int, default=16384, help="generate.sampling.max_new_tokens")
    p.add_argument("--gen-shard-size", type=int, default=256, help="generate.shard_size")
    p.add_argument("--curate-shard-size", type=int, default=256, help="curate.shard_size")
    p.add_argument("--workers", type=int, default=2, help="curate.workers")
    p.add_argument("--replicas", type=int, default=2, help="generate.replicas (1 CPU each)")
    p.add_argument("--concurrency", type=int, default=32, help="generate.openai.concurrency per replica")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="ray.num_cpus")
    p.add_argument("--object-store-gb", type=float, default=2.0, help="Ray object store size")
    p.add_argument("--poll-s", type=float, default=0.2, help="RSS polling interval")
    p.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep each size's run directory and cli.log")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--verbose", action="store_true", help="echo the CLI's output with timestamps")
    args = p.parse_args(argv)
    args.repo = args.repo.resolve()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    bench_dir = args.questions.resolve().parent.parent / "benchmarks"
    benchmarks = ([Path(b).resolve() for b in args.benchmarks.split(",")] if args.benchmarks
                  else [bench_dir / "gsm8k.jsonl", bench_dir / "math500.jsonl"])
    missing = [str(b) for b in [args.questions, *benchmarks] if not b.exists()]
    if missing:
        sys.exit(f"bench_scale: missing {', '.join(missing)} (see --questions / --benchmarks)")
    _check_import(args)
    base = load_questions(args.questions)

    rows = []
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    try:
        for size in sizes:
            print(f"bench_scale: {args.label} size {size:,} ({args.repo}, load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
            row = run_size(size, args, base, benchmarks, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
