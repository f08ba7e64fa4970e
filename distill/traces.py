"""Existing teacher outputs -> samples in the generate stage's schema, as pure functions.

A row of an imported set (OpenR1-Math, OpenThoughts, a vLLM dump) holds a problem and one or
several completions: a string column, a list-valued column of generations (one sample per item),
or a chat whose last assistant turn is the completion. Each becomes a `GENERATED_SCHEMA` row plus
its provenance (`ORIGIN_COLUMNS`), or a rejected item with its reason; nothing is dropped
silently. The set's own correctness flags are kept (`origin_correct`), never trusted as the
verdict: distill's verifier decides, and the report shows where the two disagree.

Nothing here reads files or knows about Ray; `distill/stages/import.py` runs these in workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from distill.config import TraceSource, output_fields
from distill.fsio import fingerprint, quarantine_record
from distill.generation import GENERATED_SCHEMA
from distill.sources import normalise_row
from distill.teachers.base import split_reasoning

ORIGIN_COLUMNS = [("origin", pa.string()), ("origin_path", pa.string()), ("origin_revision", pa.string()),
                  ("origin_sha256", pa.string()), ("origin_row", pa.string()), ("origin_correct", pa.bool_())]
"""Where an imported sample came from: the set's name, its path or Hub id, the revision asked
for, the hash of its content (sha256 of the files' bytes; a Hub dataset's fingerprint), the row
(`file:line`, `dataset[split]:row N`), and the set's own correctness flag (null if none)."""

IMPORTED_SCHEMA = pa.schema(list(GENERATED_SCHEMA) + [pa.field(n, t) for n, t in ORIGIN_COLUMNS])
IMPORT_REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("origin", pa.string()), ("location", pa.string()),
                                    ("reason", pa.string()), ("raw", pa.string())])
UNKNOWN_FINISH = "unknown"
"""The finish reason of a sample whose set does not say: never assumed to be `stop`."""


@dataclass(frozen=True)
class Origin:
    """What every sample of one source records about it."""

    name: str
    path: str
    revision: str | None
    content_hash: str
    teacher: str
    settings_hash: str


def mapping_hash(src: TraceSource) -> str:
    """The `params_hash` of a source's samples: what decides how its rows become samples."""
    return fingerprint(output_fields(src))


class Malformed(ValueError):
    """A row or item that is not a usable sample; the message is `code: detail`."""


def _texts(row: dict, src: TraceSource) -> list[Any]:
    cols = src.columns
    if cols.completion is not None:
        if cols.completion not in row:
            raise Malformed(f"missing_completion: no column {cols.completion!r}")
        value = row[cols.completion]
        if value is None:
            raise Malformed(f"missing_completion: column {cols.completion!r} is null")
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return [_assistant_turn(row.get(cols.messages), cols.messages)]


def _assistant_turn(messages: Any, column: str) -> str:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Malformed(f"malformed_completion: column {column!r} is not a list of chat turns")
    for turn in reversed(messages):
        if isinstance(turn, dict) and turn.get("role") == "assistant":
            return turn.get("content")
    raise Malformed(f"malformed_completion: no assistant turn in column {column!r}")


def _user_turn(messages: Any) -> Any:
    if isinstance(messages, (list, tuple)):
        for turn in messages:
            if isinstance(turn, dict) and turn.get("role") == "user":
                return turn.get("content")
    return None


def _aligned(row: dict, column: str | None, n: int, i: int) -> Any:
    """Item i of a per-row value that is either one value for the row or a list aligned with the
    completions (a list of another length is not trusted: None)."""
    if column is None:
        return None
    value = row.get(column)
    if isinstance(value, (list, tuple)):
        return value[i] if len(value) == n else None
    return value


def check_text(text: Any) -> str:
    """The completion if usable, else Malformed with why."""
    if not isinstance(text, str):
        raise Malformed(f"bad_type: completion has type {type(text).__name__}, expected a string")
    if not text.strip():
        raise Malformed("empty_completion: the completion is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
        raise Malformed(f"not_utf8: the completion holds {text[e.start]!r} at character {e.start}, "
                        "which is not UTF-8 text") from None
    return text


def row_samples(row: dict, location: str, where: str, src: TraceSource, origin: Origin) -> tuple[list[dict], list[dict]]:
    """One input row -> (samples, rejected items). `location` names the row for people
    (`file:line`); `where` is the same relative to the source (stable across machines), and with
    the item index it makes each sample's key."""
    cols = src.columns

    def reject(reason: str, item: int | None = None) -> dict:
        key = f"{origin.name}/{where}" + (f"#{item}" if item is not None else "")
        raw = json.dumps(row, default=str, ensure_ascii=False)
        return {"key": key, "origin": origin.name, **quarantine_record(location, reason, raw)}

    view = row
    if cols.messages is not None and cols.problem not in row:
        view = {**row, cols.problem: _user_turn(row.get(cols.messages))}
    question, why = normalise_row(view, src, origin.name)
    if question is None:
        return [], [reject(why)]
    try:
        texts = _texts(row, src)
    except Malformed as e:
        return [], [reject(str(e))]
    if not texts:
        return [], [reject(f"missing_completion: column {cols.completion!r} is an empty list")]
    samples, rejected = [], []
    for i, text in enumerate(texts):
        try:
            text = check_text(text)
        except Malformed as e:
            rejected.append(reject(str(e), i))
            continue
        reasoning, response = split_reasoning(text)
        finish = _aligned(row, cols.finish_reason, len(texts), i)
        flag = _aligned(row, cols.correct, len(texts), i)
        samples.append({
            "key": f"{origin.name}/{where}#{i}", "id": question["id"], "problem": question["problem"],
            "answer": question["answer"], "source": question["source"], "sample_idx": i, "seed": None,
            "teacher": origin.teacher, "params_hash": origin.settings_hash, "completion": text,
            "reasoning": reasoning, "response": response,
            "finish_reason": finish if isinstance(finish, str) and finish else UNKNOWN_FINISH,
            "prompt_tokens": None, "n_tokens": None,
            "origin": origin.name, "origin_path": origin.path, "origin_revision": origin.revision,
            "origin_sha256": origin.content_hash, "origin_row": location,
            "origin_correct": flag if isinstance(flag, bool) else None,
        })
    return samples, rejected


def generated_sample(record: dict, location: str, origin: Origin) -> dict:
    """A row of a distill generate stage (this run's or another's) as an imported sample: its own
    key, teacher and settings are kept."""
    out = {name: record.get(name) for name in GENERATED_SCHEMA.names}
    out.update({"origin": origin.name, "origin_path": origin.path, "origin_revision": None,
                "origin_sha256": origin.content_hash, "origin_row": location, "origin_correct": None})
    return out
