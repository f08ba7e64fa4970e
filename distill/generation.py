"""Teacher generation as plain functions: plan the missing (question, sample) pairs, turn a
unit of them into engine requests, and the engine's results into records.

Nothing here knows about Ray; `stages/generate.py` runs `run_unit` inside actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Iterable, Iterator

import pyarrow as pa

from distill.config import GenerateConfig, PromptConfig, fingerprint, output_fields
from distill.store import KeyHashes, key_hash
from distill.teachers.base import Message, Request, SamplingParams, TeacherEngine, derive_seed, split_reasoning

_QUESTION = [("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("source", pa.string())]
_SAMPLE = [("key", pa.string()), *_QUESTION, ("sample_idx", pa.int32()), ("seed", pa.int64()),
           ("teacher", pa.string()), ("params_hash", pa.string())]

GENERATED_SCHEMA = pa.schema(
    _SAMPLE + [("completion", pa.string()), ("reasoning", pa.string()), ("response", pa.string()),
               ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("n_tokens", pa.int32())]
)
"""One row per (question, sample). `completion` is the raw text; `reasoning` the `<think>` part
(null if none) and `response` the rest; `n_tokens` counts completion tokens."""

GEN_REJECTED_SCHEMA = pa.schema(_SAMPLE + [("reason", pa.string())])


def generation_settings(gen: GenerateConfig) -> dict:
    """What determines a sample's distribution: engine, its model settings, prompt, sampling.

    `n_samples`, shard size and replica counts are absent on purpose: they change how much is
    generated or how fast, not what one sample is, so changing them reuses finished samples.
    """
    return {"engine": gen.engine, "model": output_fields(gen.engine_config()),
            "prompt": output_fields(gen.prompt), "sampling": output_fields(gen.sampling)}


def teacher_name(gen: GenerateConfig) -> str:
    return f"{gen.engine}:{gen.engine_config().model}"


def sample_key(question_id: str, sample_idx: int, params_hash: str) -> str:
    """The idempotent record key: the same question, sample and settings give the same key."""
    return f"{question_id}#{sample_idx}#{params_hash}"


@dataclass(frozen=True)
class Task:
    key: str
    question: dict
    sample_idx: int
    seed: int | None


@dataclass
class WorkUnit:
    """A shard's worth of tasks: the unit of scheduling, retry and atomic commit."""

    index: int
    tasks: list[Task]


@dataclass
class UnitResult:
    index: int
    records: list[dict]
    rejected: list[dict]
    stats: dict[str, float] = field(default_factory=dict)


def iter_units(
    questions: Iterable[dict], *, n_samples: int, params_hash: str, done: Container[str], shard_size: int,
    first_index: int, base_seed: int | None,
) -> Iterator[WorkUnit]:
    """Every (question, sample < n_samples) whose key is not in `done`, in shards of `shard_size`,
    made one at a time as the pool asks for them (the driver never holds the whole plan).

    Deterministic given its inputs, so a resumed run plans exactly the work that is missing.
    """
    tasks: list[Task] = []
    index = first_index
    for q in questions:
        for s in range(n_samples):
            if (key := sample_key(q["id"], s, params_hash)) not in done:
                tasks.append(Task(key, q, s, derive_seed(base_seed, q["id"], s)))
                if len(tasks) == shard_size:
                    yield WorkUnit(index, tasks)
                    tasks, index = [], index + 1
    if tasks:
        yield WorkUnit(index, tasks)


def count_missing(questions: Iterable[dict], n_samples: int, params_hash: str, done: Container[str]) -> int:
    return sum(sample_key(q["id"], s, params_hash) not in done for q in questions for s in range(n_samples))


def changed_questions(existing: Iterable[dict], questions: Iterable[dict]) -> list[str]:
    """Ids whose problem text differs between stored samples and the current source: samples
    keyed by such an id answer a question that is no longer the one asked. Both may be streams
    (one shard's rows at a time): the source is held as 16 bytes a question (64-bit hashes of id
    and problem, sorted), not as its text. A change is missed only if two different problem texts
    hash alike (2^-64 a question)."""
    current = KeyHashes.from_pairs((q["id"], key_hash(q["problem"])) for q in questions)
    changed = {r["id"] for r in existing
               if (problem := current.get(r["id"])) is not None and problem != key_hash(r["problem"])}
    return sorted(changed)


def build_messages(problem: str, prompt: PromptConfig) -> list[Message]:
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    # str.replace, not str.format: problems are full of LaTeX braces.
    return messages + [{"role": "user", "content": prompt.template.replace("{problem}", problem)}]


def sampling_params(gen: GenerateConfig) -> SamplingParams:
    s = gen.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                          seed=s.seed, stop=tuple(s.stop))


def run_unit(engine: TeacherEngine, unit: WorkUnit, params: SamplingParams, prompt: PromptConfig,
             teacher: str, params_hash: str) -> UnitResult:
    """Generate one sample per task (one request each, so every sample has its own seed)."""
    requests = [Request(build_messages(t.question["problem"], prompt), n=1, seed=t.seed) for t in unit.tasks]
    results = engine.generate(requests, params)
    if len(results) != len(requests):
        raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
    records, rejected = [], []
    for task, res in zip(unit.tasks, results):
        base = {"key": task.key, **{k: task.question[k] for k in ("id", "problem", "answer", "source")},
                "sample_idx": task.sample_idx, "seed": task.seed, "teacher": teacher, "params_hash": params_hash}
        if not res.ok:
            rejected.append({**base, "reason": res.rejected})
            continue
        if len(res.completions) != 1:
            raise RuntimeError(f"engine returned {len(res.completions)} completions for n=1")
        c = res.completions[0]
        reasoning, response = split_reasoning(c.text)
        records.append({**base, "completion": c.text, "reasoning": reasoning, "response": response,
                        "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                        "n_tokens": c.completion_tokens})
    return UnitResult(unit.index, records, rejected)


def settings_hash(gen: GenerateConfig) -> str:
    return fingerprint(generation_settings(gen))
