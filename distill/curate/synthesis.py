"""New questions from the seed questions through the teacher engine (stage `synthesize`), as pure
functions: plan the tasks, build each task's prompt, parse the teacher's reply into a question.

Methods are a registry (`METHODS`): each turns seed questions into tasks (one prompt each) and
has its own config section. `augment` rewrites a seed (rephrase / new numbers / harder, as
OpenMathInstruct-2 does); `persona` rewrites a seed for a persona drawn from a list
(PersonaHub-style). A task's key, and so the question's id, is fixed by (method, seed ids,
variant, index, the method's settings hash): a resumed run regenerates nothing committed and
duplicates nothing, and a question keeps its id while its method's settings are unchanged.

The teacher is asked for `QUESTION:` / `ANSWER:` lines. A reply without a question, or with the
fields in no usable shape, is a rejected row with its reason (`no_question`, `unparsable`,
`truncated`, `same_as_seed`), never a crash and never a silent drop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from pydantic import Field, field_validator

from distill.fsio import Row, iter_jsonl, quarantine_record
from distill.section import Section

SYNTH_MARKER = "QUESTION SYNTHESIS"
"""Opens every synthesis prompt (the test server recognises it and answers in the asked format)."""

SHIPPED_PERSONAS = Path(__file__).with_name("personas.jsonl")

AugmentKind = Literal["rephrase", "numbers", "harder"]


class AugmentConfig(Section):
    """Rewrites of one seed (OpenMathInstruct-2's question augmentation)."""

    kinds: list[AugmentKind] = Field(default_factory=lambda: ["rephrase", "numbers", "harder"])
    """Which rewrites: `rephrase` (same problem and answer, other words), `numbers` (same
    structure, new numbers), `harder` (an added step or constraint)."""

    per_seed: int = Field(default=1, ge=1)
    """Questions of each kind per seed."""


class PersonaConfig(Section):
    """A seed rewritten for a persona drawn from a list (PersonaHub's persona-driven synthesis)."""

    path: str | None = None
    """Personas: a JSON Lines file (one `{"persona": "..."}` a line) or a Hub dataset id. Unset:
    the 30 personas shipped with distill (distill/curate/personas.jsonl). Malformed lines are
    quarantined in `synthesize/rejected/` with file:line and a reason."""

    column: str = "persona"
    """The field (file) or column (Hub dataset) holding a persona's description."""

    split: str = "train"
    """The split of a Hub dataset."""

    per_seed: int = Field(default=1, ge=1)
    """Personas drawn per seed (without repeats while the list lasts)."""

    max_bad_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """Error budget: the stage fails if more than this share of persona lines is malformed (they
    are quarantined first either way)."""


class ConceptGraphConfig(Section):
    """Questions that need a connected set of concepts (MathScale): the teacher lists each seed's
    topics and knowledge points (one cached pass), concepts that occur in the same seed are linked,
    and a seeded random walk on that graph picks the concepts of each new question."""

    questions: int = Field(default=100, ge=1)
    """Questions to make (not per seed: the graph pools every seed's concepts)."""

    concepts_per_question: int = Field(default=3, ge=2)
    """Distinct concepts a walk collects (fewer when its component is smaller)."""

    extract_max_tokens: int = Field(default=256, ge=16)
    """Tokens the teacher may write when listing a seed's concepts."""


class SkillPairConfig(Section):
    """Questions that need two skills at once (MATH²): skills are the knowledge points of the same
    cached extraction pass, pairs drawn at random among skills seen at least `min_count` times."""

    questions: int = Field(default=100, ge=1)
    """Questions to make (distinct pairs while there are enough)."""

    min_count: int = Field(default=1, ge=1)
    """A skill must occur in this many seeds to be paired (drops one-off, noisy extractions)."""


class SynthesizeConfig(Section):
    """New questions from the seeds through the teacher engine (`generate.engine`)."""

    _volatile = frozenset({"shard_size"})

    methods: list[str] = Field(default_factory=list)
    """Synthesis methods to run, each with its own section below. Known: augment, persona,
    concept_graph, skill_pair. Empty
    (the default): the stage passes the seeds through and asks the teacher nothing, so a run
    that lists every stage costs no teacher calls here until a method is chosen."""

    keep_seeds: bool = True
    """Pass the seed questions through as well. On by default: the seeds are the only questions
    with a human reference answer, and the stages after this one read only its output, so turning
    it off trains on synthetic questions alone."""

    teacher_answers: bool = False
    """Use the teacher's `ANSWER:` as the question's reference `answer` (always kept in
    `teacher_answer`). Off: a synthesized question has no reference, except a `rephrase`, which
    keeps its seed's, and verify falls back on agreement between samples."""

    temperature: float = Field(default=0.8, ge=0.0)
    """Sampling temperature of the synthesis requests (diverse rewrites want > 0)."""

    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling of the synthesis requests."""

    max_tokens: int = Field(default=512, ge=16)
    """Tokens the teacher may write per reply (a reasoning teacher thinks first: give it room).
    A reply cut before its `ANSWER:` line is rejected as `truncated`."""

    seed: int | None = 0
    """Base seed: each task's seed derives from it, so a retried or resumed request asks for the
    same question. None: unseeded."""

    shard_size: int = Field(default=256, ge=1)
    """Tasks per work unit (one committed shard each)."""

    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Method `augment`."""

    persona: PersonaConfig = Field(default_factory=PersonaConfig)
    """Method `persona`."""

    concept_graph: ConceptGraphConfig = Field(default_factory=ConceptGraphConfig)
    """Method `concept_graph`."""

    skill_pair: SkillPairConfig = Field(default_factory=SkillPairConfig)
    """Method `skill_pair`."""

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown synthesis method(s) {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class SynthTask:
    """One question to ask the teacher for, or (method `seed`) a seed passed through."""

    key: str
    id: str
    method: str
    variant: str
    """`rephrase` / `numbers` / `harder` (augment), the persona's index (persona), `seed`."""
    seeds: tuple[dict, ...]
    """The seed questions `{id, problem, answer, source}` it is made from."""
    params_hash: str
    persona: str | None = None
    concepts: tuple[str, ...] = ()
    seed: int | None = None


def synth_key(method: str, seed_ids: Iterable[str], variant: str, index: int, params_hash: str) -> str:
    return f"{method}#{'+'.join(seed_ids)}#{variant}#{index}#{params_hash}"


def synth_id(key: str) -> str:
    """A question id fixed by the task key (ids of seeds are theirs; these never collide with a
    source's `q-...` content ids)."""
    return "syn-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _derive_seed(base: int | None, key: str) -> int | None:
    from distill.teachers.base import derive_seed

    return derive_seed(base, key)


@dataclass
class PlanContext:
    """What planning needs besides the seeds: the settings, each method's settings hash, the
    persona list (loaded once by the driver)."""

    cfg: SynthesizeConfig
    hashes: dict[str, str]
    personas: list[str] = field(default_factory=list)
    graph: "ConceptGraph | None" = None
    """Built from the extraction pass when a graph method is on."""


def _task(ctx: PlanContext, method: str, seeds: tuple[dict, ...], variant: str, index: int, **extra) -> SynthTask:
    key = synth_key(method, [s["id"] for s in seeds], variant, index, ctx.hashes[method])
    return SynthTask(key, synth_id(key), method, variant, seeds, ctx.hashes[method],
                     seed=_derive_seed(ctx.cfg.seed, key), **extra)


def augment_tasks(q: dict, ctx: PlanContext) -> Iterator[SynthTask]:
    for kind in ctx.cfg.augment.kinds:
        for i in range(ctx.cfg.augment.per_seed):
            yield _task(ctx, "augment", (q,), kind, i)


def draw_personas(qid: str, n: int, n_personas: int, seed: int | None) -> list[int]:
    """`n` persona indices for seed `qid`, fixed by (seed, qid), without repeats while the list
    lasts. Few of many (the usual case, e.g. 1 of PersonaHub's 200k): hashed draws, a repeat
    drawn again, O(n) a seed. Many of few: a seeded shuffle's prefix, `n_personas` hashes a seed."""
    if n_personas == 0:
        return []
    if 2 * n > n_personas:
        order = sorted(range(n_personas), key=lambda j: _unit("persona", seed, qid, j))
        return [order[i % n_personas] for i in range(n)]
    picked: list[int] = []
    for attempt in itertools.count():
        if len(picked) == n:
            return picked
        j = int(_unit("persona", seed, qid, attempt) * n_personas)
        if j not in picked:
            picked.append(j)
    return picked


def persona_tasks(q: dict, ctx: PlanContext) -> Iterator[SynthTask]:
    for i, j in enumerate(draw_personas(q["id"], ctx.cfg.persona.per_seed, len(ctx.personas), ctx.cfg.seed)):
        yield _task(ctx, "persona", (q,), str(j), i, persona=ctx.personas[j])


def plan_tasks(seeds: Iterable[dict], ctx: PlanContext) -> Iterator[SynthTask]:
    """Every task of the stage in a fixed order (a resumed run plans the same tasks): seed by seed
    (seeds are streamed; per-seed methods hold one at a time), then the graph methods'."""
    for q in seeds:
        if ctx.cfg.keep_seeds:
            yield SynthTask(q["id"], q["id"], "seed", "seed", (q,), "")
        for name in ctx.cfg.methods:
            if METHODS[name].per_seed:
                yield from METHODS[name].tasks(q, ctx)
    for name in ctx.cfg.methods:
        if not METHODS[name].per_seed:
            yield from METHODS[name].tasks(None, ctx)


# --------------------------------------------------------------------------- prompts

_FORMAT = ("Reply in exactly this format and nothing else:\n"
           "QUESTION: <the new problem, complete and self-contained>\n"
           "ANSWER: <its final answer: a number or a short expression>")

AUGMENT_INSTRUCTIONS = {
    "rephrase": "Rewrite the seed problem in different words. Keep every quantity and every condition, so "
                "that its answer stays exactly the same.",
    "numbers": "Write a new problem with the same structure as the seed problem but different numbers. "
               "Choose numbers that still give a clean, well-defined answer.",
    "harder": "Write a harder variant of the seed problem: add a step or a constraint so that it needs more "
              "reasoning, while it stays well posed with a single answer.",
}


def _prompt(instruction: str, body: str) -> list[dict]:
    # The marker opens the prompt so a test server can tell a synthesis request from the others.
    return [{"role": "user", "content": f"{SYNTH_MARKER}\n{instruction}\n\n{_FORMAT}\n\n{body}"}]


def augment_messages(task: SynthTask) -> list[dict]:
    return _prompt(AUGMENT_INSTRUCTIONS[task.variant], "Seed problem:\n" + task.seeds[0]["problem"])


def persona_messages(task: SynthTask) -> list[dict]:
    return _prompt(
        f"Rewrite the seed problem as it would be posed by, or for, this persona: {task.persona}\n"
        "Change the setting and the story to fit the persona; keep the mathematical skill the seed "
        "tests, and keep the problem well posed with a single answer.",
        "Seed problem:\n" + task.seeds[0]["problem"])


def _concept_prompt(instruction: str, task: SynthTask) -> list[dict]:
    examples = "\n\n".join(f"Example problem:\n{q['problem']}" for q in task.seeds[:2])
    return _prompt(instruction + "\n" + "\n".join(f"- {c}" for c in task.concepts), examples)


def concept_graph_messages(task: SynthTask) -> list[dict]:
    return _concept_prompt("Write a new math problem whose solution needs every one of these concepts. The "
                           "example problems only show the style; do not copy them.", task)


def skill_pair_messages(task: SynthTask) -> list[dict]:
    return _concept_prompt("Write a new math problem that cannot be solved without using both of these skills "
                           "together. The example problems only show the style; do not copy them.", task)


# --------------------------------------------------------------------------- concepts and their graph

EXTRACT_MARKER = "CONCEPT EXTRACTION"
"""Opens the concept-extraction prompt (the test server answers it with JSON)."""


def extract_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"{EXTRACT_MARKER}\nList the math topics and the knowledge points (specific skills, theorems, "
        "techniques) a solver needs for the problem below. Reply with one JSON object and nothing else: "
        '{"topics": ["..."], "knowledge_points": ["..."]}\n\nProblem:\n' + problem)}]


def _concept(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def parse_concepts(text: str) -> tuple[list[str], list[str]]:
    """(topics, knowledge points), lower-cased and de-duplicated, from an extraction reply; a
    `<think>` block and a ```json fence are dropped first. ReplyError (`unparsable: ...`,
    `no_concepts: ...`) otherwise. Pure."""
    from distill.teachers.base import split_reasoning

    body = split_reasoning(text or "")[1].strip()
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", body)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ReplyError(f"unparsable: the reply is not JSON ({e.msg} at column {e.colno}; it opens {body[:40]!r})")
    if not isinstance(obj, dict):
        raise ReplyError(f"unparsable: the reply is JSON {type(obj).__name__}, not an object")
    out = []
    for name in ("topics", "knowledge_points"):
        items = obj.get(name, [])
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ReplyError(f"unparsable: {name} is not a list of strings")
        out.append(list(dict.fromkeys(c for c in map(_concept, items) if c)))
    if not out[0] and not out[1]:
        raise ReplyError("no_concepts: the reply lists no topic and no knowledge point")
    return out[0], out[1]


@dataclass
class ConceptGraph:
    """Concepts (topics and knowledge points) as nodes; an edge's weight is the number of seeds
    that need both. `seeds[i]`: up to two seed questions that need concept i (the new question's
    provenance and the style examples of its prompt)."""

    nodes: list[str]
    counts: list[int]
    edges: list[dict[int, int]]
    seeds: list[list[dict]]
    skills: set[int]
    """Nodes that were extracted as knowledge points (the skills `skill_pair` pairs)."""

    def digest(self) -> str:
        blob = json.dumps([self.nodes, self.counts, [sorted(e.items()) for e in self.edges]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_graph(extractions: Iterable[tuple[dict, list[str], list[str]]]) -> ConceptGraph:
    """The co-occurrence graph of (seed question, topics, knowledge points) rows. Pure; memory is
    the graph, not the seeds (two example seeds kept per concept)."""
    index: dict[str, int] = {}
    g = ConceptGraph([], [], [], [], set())
    for seed, topics, points in extractions:
        ids = []
        for c in dict.fromkeys([*topics, *points]):
            if c not in index:
                index[c] = len(g.nodes)
                g.nodes.append(c), g.counts.append(0), g.edges.append({}), g.seeds.append([])
            i = index[c]
            ids.append(i)
            g.counts[i] += 1
            if len(g.seeds[i]) < 2:
                g.seeds[i].append(seed)
        g.skills.update(index[p] for p in points)
        for a in ids:
            for b in ids:
                if a != b:
                    g.edges[a][b] = g.edges[a].get(b, 0) + 1
    return g


def _pick(weights: list[tuple[int, int]], u: float) -> int:
    total = sum(w for _, w in weights)
    for node, w in weights:
        u -= w / total
        if u < 0:
            return node
    return weights[-1][0]


def random_walk(g: ConceptGraph, length: int, seed: int | None, index: int) -> list[int]:
    """Up to `length` distinct connected concepts, fixed by (seed, index): start at a concept drawn
    by how many seeds need it, then step to a neighbour drawn by edge weight, preferring ones not
    yet taken (MathScale's walk). Stops early when its component has no new concept."""
    if not g.nodes:
        return []
    walk = [_pick(list(enumerate(g.counts)), _unit("walk", seed, index, 0))]
    for step in range(1, 4 * length):
        if len(walk) == length:
            break
        fresh = [(n, w) for n, w in sorted(g.edges[walk[-1]].items()) if n not in walk]
        if not fresh:  # go on from any concept already taken that still has new neighbours
            fresh = [(n, w) for t in walk for n, w in sorted(g.edges[t].items()) if n not in walk]
            if not fresh:
                break
        walk.append(_pick(fresh, _unit("walk", seed, index, step)))
    return walk


def _graph_seeds(g: ConceptGraph, nodes: list[int]) -> tuple[dict, ...]:
    return tuple({q["id"]: q for n in nodes for q in g.seeds[n]}.values())


def concept_graph_tasks(_q, ctx: PlanContext) -> Iterator[SynthTask]:
    g, cfg = ctx.graph, ctx.cfg.concept_graph
    for i in range(cfg.questions):
        walk = random_walk(g, cfg.concepts_per_question, ctx.cfg.seed, i)
        if len(walk) >= 2:  # a lone concept is no combination; its index is skipped, not retried
            yield _task(ctx, "concept_graph", _graph_seeds(g, walk), "walk", i,
                        concepts=tuple(g.nodes[n] for n in walk))


def skill_pairs(g: ConceptGraph, n: int, min_count: int, seed: int | None) -> list[tuple[int, int]]:
    """`n` distinct skill pairs (fewer if there are not that many), a seeded shuffle of all pairs
    of skills seen at least `min_count` times. Cost: every pair is hashed, so 2,000 skills are
    2M hashes (~2 s); a larger set wants sampling instead."""
    skills = sorted(i for i in g.skills if g.counts[i] >= min_count)
    pairs = [(a, b) for k, a in enumerate(skills) for b in skills[k + 1:]]
    pairs.sort(key=lambda p: _unit("pair", seed, g.nodes[p[0]], g.nodes[p[1]]))
    return pairs[:n]


def skill_pair_tasks(_q, ctx: PlanContext) -> Iterator[SynthTask]:
    g, cfg = ctx.graph, ctx.cfg.skill_pair
    for i, (a, b) in enumerate(skill_pairs(g, cfg.questions, cfg.min_count, ctx.cfg.seed)):
        yield _task(ctx, "skill_pair", _graph_seeds(g, [a, b]), "pair", i, concepts=(g.nodes[a], g.nodes[b]))


# --------------------------------------------------------------------------- replies


class ReplyError(ValueError):
    """A reply that gives no usable question; the message is the rejection reason."""


_FIELD = re.compile(r"^[\s*#_>]*(QUESTION|ANSWER)[\s*_]*[:：][\s*_]*(.*)$", re.I)


def parse_reply(text: str, finish_reason: str = "stop") -> tuple[str, str | None]:
    """(question, answer or None) from a teacher reply in the `QUESTION:` / `ANSWER:` format.
    A `<think>` block is dropped first; a field runs until the next field line. ReplyError
    (`no_question: ...`, `unparsable: ...`, `truncated: ...`) otherwise. Pure."""
    from distill.teachers.base import split_reasoning

    reasoning, response = split_reasoning(text or "")
    fields: list[tuple[str, list[str]]] = []
    for line in response.splitlines():
        if m := _FIELD.match(line):
            fields.append((m.group(1).upper(), [m.group(2)]))
        elif fields:
            fields[-1][1].append(line)
    questions = ["\n".join(v).strip() for k, v in fields if k == "QUESTION"]
    answers = ["\n".join(v).strip() for k, v in fields if k == "ANSWER"]
    if not questions:
        if reasoning is not None and not response:
            raise ReplyError("truncated: the reply ends inside its <think> block")
        raise ReplyError(f"no_question: no QUESTION: line in the reply (it opens {response[:60]!r})")
    if len(questions) > 1 or len(answers) > 1:
        raise ReplyError(f"unparsable: {len(questions)} QUESTION: and {len(answers)} ANSWER: fields, expected one each")
    if not questions[0]:
        raise ReplyError("no_question: the QUESTION: field is empty")
    if not answers and finish_reason == "length":
        raise ReplyError("truncated: the reply hit max_tokens before its ANSWER: line")
    answer = answers[0].rstrip(".").strip() if answers else None
    return questions[0], answer or None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def reply_record(task: SynthTask, text: str, finish_reason: str, teacher: str,
                 teacher_answers: bool) -> tuple[dict, str | None]:
    """The question row for a reply, and the rejection reason (None: kept). Pure."""
    row = base_row(task, teacher)
    try:
        question, answer = parse_reply(text, finish_reason)
    except ReplyError as e:
        return {**row, "reply": text}, str(e)
    row.update(problem=question, teacher_answer=answer)
    seed = task.seeds[0]
    if len(task.seeds) == 1 and _norm(question) == _norm(seed["problem"]):
        return {**row, "reply": text}, f"same_as_seed: the question repeats seed {seed['id']!r}"
    # A rephrase asks the seed's question: its reference answer is the seed's.
    row["answer"] = seed["answer"] if task.variant == "rephrase" else (answer if teacher_answers else None)
    return row, None


def base_row(task: SynthTask, teacher: str | None) -> dict:
    """Provenance columns of a task's row (problem and answer still unset for a synthesized one)."""
    if task.method == "seed":
        q = task.seeds[0]
        return {"key": task.key, "id": q["id"], "problem": q["problem"], "answer": q["answer"], "source": q["source"],
                "method": "seed", "variant": None, "seed_ids": [], "persona": None, "concepts": [], "teacher": None,
                "params_hash": None, "teacher_answer": None}
    return {"key": task.key, "id": task.id, "problem": None, "answer": None, "source": f"synthesize/{task.method}",
            "method": task.method, "variant": task.variant, "seed_ids": [s["id"] for s in task.seeds],
            "persona": task.persona, "concepts": list(task.concepts), "teacher": teacher,
            "params_hash": task.params_hash, "teacher_answer": None}


# --------------------------------------------------------------------------- personas


def _persona_value(row: Row, column: str) -> tuple[str | None, str | None]:
    if isinstance(row.value, str):  # iter_jsonl's reason for a line it could not read
        return None, row.value
    if column not in row.value:
        return None, f"missing_persona: no field {column!r}"
    value = row.value[column]
    if not isinstance(value, str):
        return None, f"bad_type: {column} has type {type(value).__name__}, expected a string"
    if not value.strip():
        return None, f"empty_persona: {column} is empty"
    return " ".join(value.split()), None


def read_personas(rows: Iterable[Row], column: str) -> tuple[list[str], list[dict]]:
    """(personas in file order, quarantined rows `{location, reason, raw}`) from persona rows.
    A repeated persona is quarantined too (`duplicate_persona`): it would be drawn twice as often."""
    personas, bad, seen = [], [], {}
    for row in rows:
        value, reason = _persona_value(row, column)
        if value is not None and value in seen:
            value, reason = None, f"duplicate_persona: first seen at {seen[value]}"
        if value is None:
            raw = row.raw or json.dumps(row.value, default=str, ensure_ascii=False)
            bad.append(quarantine_record(row.location, reason, raw))
            continue
        seen[value] = row.location
        personas.append(value)
    return personas, bad


def persona_rows(cfg: PersonaConfig) -> Iterator[Row]:
    """The persona list's rows: the shipped file, a JSON Lines file, or a Hub dataset."""
    path = Path(cfg.path) if cfg.path else SHIPPED_PERSONAS
    if path.is_file():
        return iter_jsonl(path)
    if cfg.path.startswith((".", "/")) or path.suffix in (".jsonl", ".json"):
        raise FileNotFoundError(f"questions.synthesize.persona.path: {cfg.path!r} does not exist")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as e:  # offline, no such dataset or split: name the key
        raise FileNotFoundError(f"questions.synthesize.persona.path: could not load Hub dataset {cfg.path!r} "
                                f"(split {cfg.split!r}): {e}") from e
    return (Row(f"{cfg.path}[{cfg.split}]:row {i}", r, "") for i, r in enumerate(ds, start=1))


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Method:
    """A synthesis method: the tasks it makes from one seed, and a task's prompt."""

    name: str
    tasks: Callable[[dict | None, PlanContext], Iterator[SynthTask]]
    messages: Callable[[SynthTask], list[dict]]
    per_seed: bool = True
    """False: the method plans from the concept graph (`tasks(None, ctx)`), after every seed."""


METHODS: dict[str, Method] = {
    "augment": Method("augment", augment_tasks, augment_messages),
    "persona": Method("persona", persona_tasks, persona_messages),
    "concept_graph": Method("concept_graph", concept_graph_tasks, concept_graph_messages, per_seed=False),
    "skill_pair": Method("skill_pair", skill_pair_tasks, skill_pair_messages, per_seed=False),
}
GRAPH_METHODS = tuple(m for m, spec in METHODS.items() if not spec.per_seed)


# --------------------------------------------------------------------------- a work unit


def synthesize_unit(engine, tasks: list[SynthTask], params, teacher: str, teacher_answers: bool
                    ) -> tuple[list[dict], list[dict]]:
    """(kept rows, rejected rows with `reason` and the raw `reply`) for one unit of tasks: one
    request per synthesized question (each has its own seed), none for a seed passed through.
    `engine` is a `TeacherEngine`, `params` its `SamplingParams`."""
    from distill.teachers.base import Request

    asked = [t for t in tasks if t.method != "seed"]
    results = engine.generate([Request(METHODS[t.method].messages(t), n=1, seed=t.seed) for t in asked], params) \
        if asked else []
    if len(results) != len(asked):
        raise RuntimeError(f"engine returned {len(results)} results for {len(asked)} requests")
    replies = dict(zip((t.key for t in asked), results))
    kept, rejected = [], []
    for t in tasks:
        if t.method == "seed":
            kept.append(base_row(t, None))
            continue
        res = replies[t.key]
        if not res.ok:
            rejected.append({**base_row(t, teacher), "reason": res.rejected})
            continue
        c = res.completions[0]
        row, reason = reply_record(t, c.text, c.finish_reason, teacher, teacher_answers)
        if reason is None:
            kept.append(row)
        else:
            rejected.append({**row, "reason": reason})
    return kept, rejected


def extract_unit(engine, seeds: list[dict], params, teacher: str) -> tuple[list[dict], list[dict]]:
    """(concept rows, rejected rows with `reason` and `reply`) for seeds `{id, problem, ...}`: one
    greedy-or-not request each (`params`), the reply parsed by `parse_concepts`."""
    from distill.teachers.base import Request

    results = engine.generate([Request(extract_messages(q["problem"]), n=1) for q in seeds], params)
    kept, rejected = [], []
    for q, res in zip(seeds, results):
        base = {"key": q["id"], "id": q["id"], "problem": q["problem"], "answer": q["answer"], "source": q["source"],
                "teacher": teacher}
        if not res.ok:
            rejected.append({**base, "reason": res.rejected, "reply": None})
            continue
        text = res.completions[0].text
        try:
            topics, points = parse_concepts(text)
        except ReplyError as e:
            rejected.append({**base, "reason": str(e), "reply": text})
            continue
        kept.append({**base, "topics": topics, "knowledge_points": points})
    return kept, rejected
