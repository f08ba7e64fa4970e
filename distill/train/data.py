"""SFT data: chat-template tokenisation with assistant-only labels, and the token cache.

A conversation is rendered with the student's own chat template, tokenised once, and stored
with its SHIFTED labels: `labels[t]` is the token to predict after reading `input_ids[:t+1]`
when that token belongs to an assistant turn (its content and end-of-turn marker), else -100.
Shifting here, not in the loss, is what lets packing put samples side by side: a sample's last
position is always -100, so no row ever asks the model to predict the next sample's first token.

Which tokens are assistant tokens is read from the rendered text itself: each assistant
message's content is located in the template's output and the tokens whose character spans
overlap it (plus the end-of-turn marker right after it) are targets. This works for any
template that copies the content verbatim (ChatML, Llama 3, Mistral, ...) without relying on
`{% generation %}` markers, which few shipped templates carry. A template that rewrites the
content (e.g. one that moves `<think>` blocks) is reported per row as `template_mismatch`.

The cache is a directory of Parquet shards plus `_manifest.json`, named by a hash of the
tokenizer, the chat template, the data content and `max_len`: a changed input gets a new
directory, an unchanged one is reused as is. Over-long samples are dropped and counted, never
cut (a cut chain of thought teaches the model to stop mid-thought); malformed rows go to
`rejected/` with their `file:line` and a reason, as every other stage does.

The build is parallel: the input is cut into chunks (JSONL byte ranges, Parquet row ranges) that
worker processes tokenise independently, and one writer merges them in input order, so the cache
is the same bytes whatever the number of workers (see `build_token_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.fsio import (
    QUARANTINE_SCHEMA, Chunk, chunk_rows, fingerprint, hash_files, quarantine_record, replace_dir,
)
from distill.fsio import plan_chunks as fsio_plan_chunks

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TOKENIZE_VERSION = 1
"""Bumped when the tokenisation or masking rules change, so older caches are not reused."""

_SHARD_SAMPLES = 4096
_ENCODE_BATCH = 512  # conversations per tokenizer call: the Rust tokenizer batches in parallel
_SENTINEL = "\x00distill-sentinel\x00"

SAMPLE_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32()),
     ("n_targets", pa.int32()), ("location", pa.string())]
)


class MalformedConversation(ValueError):
    """A row that cannot become a training sample; `str(e)` is "code: detail"."""


# --------------------------------------------------------------------------- validation


def validate_messages(messages: Any) -> list[dict]:
    """`messages` as a clean list of {role, content}, or MalformedConversation. Pure.

    Only the first message may be a system prompt, and there must be an assistant turn (a
    conversation without one has nothing to learn). Extra keys are dropped, so the rendering
    (and the cache key) depends on role and content only.
    """
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise MalformedConversation(f"bad_messages: a string that is not JSON ({e.msg})") from None
    if messages is None:
        raise MalformedConversation("no_messages: the row has no messages")
    if not isinstance(messages, (list, tuple)):
        raise MalformedConversation(f"bad_messages: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise MalformedConversation("no_messages: the message list is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MalformedConversation(f"bad_message: message {i} is not an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise MalformedConversation(f"bad_role: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise MalformedConversation(f"bad_role: message {i} is a system message; only the first may be")
        if not isinstance(content, str):
            raise MalformedConversation(f"bad_message: message {i} content has type {type(content).__name__}, expected a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise MalformedConversation("no_assistant: no assistant turn to learn from")
    return out


# --------------------------------------------------------------------------- tokenisation


_EOT_CACHE: dict[str, str] = {}


def end_of_turn(tokenizer) -> str:
    """The text the chat template writes right after an assistant message's content, stripped
    of whitespace (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3). It is a target: a model
    that never learns to emit it never stops."""
    template = tokenizer.chat_template or ""
    if template not in _EOT_CACHE:
        probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": _SENTINEL}]
        text = tokenizer.apply_chat_template(probe, tokenize=False)
        at = text.find(_SENTINEL)
        _EOT_CACHE[template] = text[at + len(_SENTINEL):].strip() if at >= 0 else ""
    return _EOT_CACHE[template]


def assistant_char_spans(text: str, messages: list[dict], eot: str) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn (content + end-of-turn marker) in
    the rendered `text`. Pure. Messages are located in order, so an assistant reply that
    repeats an earlier user message is found at its own place."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        at, found = text.find(content, cursor), content
        if at < 0 and content.strip() != content:  # templates that trim (Llama 3)
            found = content.strip()
            at = text.find(found, cursor)
        if at < 0:
            if m["role"] == "assistant":
                raise MalformedConversation(
                    f"template_mismatch: the chat template does not copy assistant message {i} verbatim"
                )
            continue  # a template may rewrite a system/user message; it is never a target
        end = at + len(found)
        cursor = end
        if m["role"] == "assistant":
            if eot and text.startswith(eot, end):
                end += len(eot)
            spans.append((at, end))
    return spans


def shifted_labels(input_ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """labels[t] = input_ids[t+1] where token t+1 is a target, else -100; the last is -100. Pure."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(target[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def _encode_rendered(tokenizer, texts: list[str], span_lists: list[list[tuple[int, int]]]):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], span_lists):
        ids = np.asarray(ids, dtype=np.int32)
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        target = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            # Overlap, not containment: a token that BPE merged across the prompt/content
            # boundary still carries content, and predicting it is what generation needs.
            target |= (off[:, 1] > a) & (off[:, 0] < b) & (off[:, 1] > off[:, 0])
        yield ids, shifted_labels(ids, target)


def _render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
        raise MalformedConversation(f"template_error: {e}") from None
    return text, assistant_char_spans(text, messages, end_of_turn(tokenizer))


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and SHIFTED labels for one chat: labels[t] is the token to predict after
    reading input_ids[:t+1] (i.e. input_ids[t+1]) when that token belongs to an assistant turn
    (content and its end-of-turn token), else -100. The last position is always -100.

    The ids are those of `tokenizer.apply_chat_template(messages)`. Raises
    MalformedConversation ("code: detail") for rows that cannot be a sample."""
    text, spans = _render(tokenizer, validate_messages(messages))
    ids, labels = next(_encode_rendered(tokenizer, [text], [spans]))
    return ids.tolist(), labels.tolist()


# --------------------------------------------------------------------------- the cache


@dataclass
class TokenCache:
    """A directory of Parquet shards + _manifest.json (see the module docstring)."""

    path: Path
    fingerprint: str
    n_samples: int
    n_dropped: int
    """Samples longer than max_len: counted (and listed in rejected/), never cut."""
    lengths: np.ndarray
    """int32 [n_samples]: tokens per sample."""
    n_targets: np.ndarray
    """int32 [n_samples]: target tokens (labels != -100) per sample: what loss normalisation counts."""
    n_rejected: int = 0
    """Malformed rows (no messages, no assistant turn, bad roles, ...), listed in rejected/."""
    reasons: dict = field(default_factory=dict)
    """Dropped and rejected rows by reason code."""
    _ids: np.ndarray | None = field(default=None, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _offsets: np.ndarray | None = field(default=None, repr=False)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample i, int32. The first call loads every shard into memory
        (8 bytes a token: ~3 GB for 400M tokens, per process); planning needs only `lengths`."""
        if self._ids is None:
            self._load_tokens()
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._ids[a:b], self._labels[a:b]

    def _load_tokens(self) -> None:
        ids, labels = [], []
        for part in _shards(self.path):
            t = pq.read_table(part, columns=["input_ids", "labels"])
            ids.append(t.column("input_ids").combine_chunks().flatten().to_numpy())
            labels.append(t.column("labels").combine_chunks().flatten().to_numpy())
        self._ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self._labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        if self._offsets[-1] != len(self._ids):
            raise RuntimeError(f"{self.path}: shards hold {len(self._ids)} tokens, the lengths say {self._offsets[-1]}")


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("part-*.parquet"))


def load_token_cache(path: Path) -> TokenCache:
    """Open a complete cache directory written by `build_token_cache` (tokens load lazily)."""
    from distill.store import Manifest

    path = Path(path)
    manifest = Manifest.read(path)
    if manifest is None or manifest.status != "complete":
        raise FileNotFoundError(f"{path} is not a complete token cache (no complete _manifest.json); rebuild it")
    lengths, n_targets = [], []
    for part in _shards(path):
        t = pq.read_table(part, columns=["length", "n_targets"])
        lengths.append(t.column("length").to_numpy())
        n_targets.append(t.column("n_targets").to_numpy())
    lengths = np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)
    n_targets = np.concatenate(n_targets).astype(np.int32) if n_targets else np.zeros(0, np.int32)
    counts = manifest.counts
    if len(lengths) != counts["samples"]:
        raise RuntimeError(f"{path}: {len(lengths)} samples in the shards, the manifest says {counts['samples']}")
    return TokenCache(path=path, fingerprint=manifest.fingerprint, n_samples=len(lengths), n_dropped=counts["dropped"],
                      lengths=lengths, n_targets=n_targets, n_rejected=counts["rejected"], reasons=counts["by_reason"])


def expand_data_files(data_files: list[Path]) -> list[Path]:
    """Files to read: each file as given, each directory's top-level *.parquet / *.jsonl
    (so a stage's `rejected/` subdirectory is never read as training data)."""
    out = []
    for p in map(Path, data_files):
        if p.is_dir():
            found = sorted([*p.glob("*.parquet"), *p.glob("*.jsonl")])
            if not found:
                raise FileNotFoundError(f"{p} holds no *.parquet or *.jsonl files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"training data {p} does not exist")
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids: vocabulary, merges, normalisation, added tokens, and
    the chat template. Content-based, so the same tokenizer from a directory or the Hub agrees."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers; slow ones: the vocab
    h.update((backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- parallel build
#
# The input is cut into chunks (a byte range of a JSONL file, a row range of a Parquet file). Each
# chunk is tokenised on its own by `tokenize_chunk`, wherever a `ChunkMap` runs it (this process,
# a local process pool, Ray tasks), and ONE writer merges the results in input order. A chunk's
# result depends only on its rows and shards are cut from the merged stream, so the cache is the
# same bytes whatever the number of workers or the chunk size.

ChunkMap = Callable[[Callable[..., "ChunkResult"], list[tuple]], Iterator["ChunkResult"]]
"""`map_chunks(fn, calls)` yields `fn(*call)` for each call IN ORDER; where the calls run is its
business (`serial_chunk_map`, `local_chunk_map`, the launcher's Ray tasks). `fn` is a module-level
function, so it pickles by name."""

_CHUNK_BYTES = 4 << 20
"""Text per chunk: ~1.5M tokens of GSM8K-like chat, 3-20 s on one core depending on the text and
the machine. Many chunks keep every worker busy to the end; each costs a task round trip and ~8
bytes a token shipped back to the driver."""
_MAX_AUTO_WORKERS = 64
"""Unset train.data.tokenize_workers uses every CPU up to this: each worker process holds
transformers, torch and a tokenizer (~0.5 GB), and the one writer has to keep up with them."""
_WRITER_THREADS = 4


@dataclass
class Samples:
    """Kept samples in input order: token arrays concatenated (int32), one length per sample."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    n_targets: np.ndarray
    locations: list[str]

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        if len(parts) == 1:
            return parts[0]
        return Samples(*(np.concatenate([getattr(p, k) for p in parts]).astype(np.int32, copy=False)
                         for k in ("ids", "labels", "lengths", "n_targets")),
                       [loc for p in parts for loc in p.locations])

    def split(self, n: int) -> tuple["Samples", "Samples"]:
        """The first n samples and the rest."""
        cut = int(self.lengths[:n].sum())
        return (Samples(self.ids[:cut], self.labels[:cut], self.lengths[:n], self.n_targets[:n], self.locations[:n]),
                Samples(self.ids[cut:], self.labels[cut:], self.lengths[n:], self.n_targets[n:], self.locations[n:]))

    def table(self) -> pa.Table:
        offsets = pa.array(np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]), pa.int32())
        return pa.Table.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int32())),
             pa.ListArray.from_arrays(offsets, pa.array(self.labels, pa.int32())),
             pa.array(self.lengths, pa.int32()), pa.array(self.n_targets, pa.int32()),
             pa.array(self.locations, pa.string())], schema=SAMPLE_SCHEMA)


@dataclass
class ChunkResult:
    """What one chunk became: its samples, and its rejected rows ({location, reason, raw}) in input
    order, of which `n_dropped` are samples over max_len and the rest malformed rows."""

    samples: Samples
    rejected: list[dict]
    n_dropped: int


def plan_chunks(files: list[Path], chunk_bytes: int = _CHUNK_BYTES) -> list[Chunk]:
    """The input cut into chunks of about `chunk_bytes` of text, in input order (`fsio.plan_chunks`:
    each chunk names its rows `file:line` / `file:row N` exactly as one serial read would)."""
    return fsio_plan_chunks(files, chunk_bytes)


_TOKENIZERS: dict[tuple[str, str], Any] = {}


def _worker_tokenizer(path: str, fingerprint: str):
    """The tokenizer, loaded once per process and kept: importing transformers (and torch, which
    it pulls in) and loading the tokenizer take ~3-8 s, about as long as tokenising a chunk, so
    loading it per chunk would halve the throughput. Checked against the driver's fingerprint: a worker that finds other files under
    the same path (another node) must not write tokens that the cache key does not describe."""
    key = (path, fingerprint)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer_fingerprint(tokenizer) != fingerprint:
            raise RuntimeError(f"the tokenizer at {path} in process {os.getpid()} differs from the one the token "
                               "cache was keyed with: every node must see the same model files")
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def tokenize_chunk(chunk: Chunk, tokenizer_path: str, fingerprint: str, max_len: int,
                   messages_column: str) -> ChunkResult:
    """Tokenise one chunk: samples of at most `max_len` tokens, and the rows rejected (malformed,
    with the reason; over-long, dropped whole) in input order."""
    tokenizer = _worker_tokenizer(tokenizer_path, fingerprint)
    rejected: list[tuple[int, dict]] = []  # (row position, record): sorted back into input order
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []
    pending: list[tuple[int, str, str, list[tuple[int, int]], Any]] = []
    n_dropped = 0

    def reject(pos: int, location: str, reason: str, raw: Any) -> None:
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
        rejected.append((pos, quarantine_record(location, reason, text)))

    def encode() -> None:
        nonlocal n_dropped
        encoded = _encode_rendered(tokenizer, [p[2] for p in pending], [p[3] for p in pending])
        for (pos, location, _, _, raw), (ids, labels) in zip(pending, encoded):
            if len(ids) > max_len:
                n_dropped += 1
                reject(pos, location, f"too_long: {len(ids)} tokens > max_len {max_len} (dropped, not cut)", raw)
            else:
                kept.append((location, ids, labels))
        pending.clear()

    for pos, row in enumerate(chunk_rows(chunk)):
        if isinstance(row.value, str):  # the reader could not decode the line
            reject(pos, row.location, row.value, row.raw)
            continue
        raw = row.value.get(messages_column)
        try:
            if messages_column not in row.value:
                raise MalformedConversation(f"no_messages: no column {messages_column!r}")
            text, spans = _render(tokenizer, validate_messages(raw))
        except MalformedConversation as e:
            reject(pos, row.location, str(e), row.raw or row.value)
            continue
        pending.append((pos, row.location, text, spans, row.raw or raw))
        if len(pending) >= _ENCODE_BATCH:
            encode()
    if pending:
        encode()
    empty = np.zeros(0, np.int32)
    samples = Samples(np.concatenate([k[1] for k in kept]) if kept else empty,
                      np.concatenate([k[2] for k in kept]) if kept else empty,
                      np.array([len(k[1]) for k in kept], np.int32),
                      np.array([int((k[2] != IGNORE_INDEX).sum()) for k in kept], np.int32),
                      [k[0] for k in kept])
    rejected.sort(key=lambda r: r[0])
    return ChunkResult(samples, [r for _, r in rejected], n_dropped)


def ordered_map(submit: Callable[[tuple], Any], get: Callable[[Any], Any], calls: Iterable[tuple], *,
                window: int, cancel: Callable[[Any], Any]) -> Iterator[Any]:
    """`get(submit(call))` for each call, in order, with up to `window` calls submitted ahead of the
    one being waited for: the workers do not idle while the driver writes, and the driver holds
    at most `window` results. Calls not collected when it stops (an error, an early close) are
    cancelled."""
    pending: deque = deque()
    try:
        for call in calls:
            if len(pending) >= window:
                yield get(pending.popleft())
            pending.append(submit(call))
        while pending:
            yield get(pending.popleft())
    finally:
        for handle in pending:
            cancel(handle)


def serial_chunk_map(fn: Callable[..., ChunkResult], calls: list[tuple]) -> Iterator[ChunkResult]:
    """Every chunk in this process, one after another."""
    return (fn(*call) for call in calls)


def local_chunk_map(workers: int) -> ChunkMap:
    """Chunks on a pool of `workers` local processes (1: `serial_chunk_map`). The processes start
    by forkserver (spawn where there is none): a fork of a driver that runs threads (Ray's, the
    Rust tokenizer's) can deadlock. Each pays the transformers import and tokenizer load once
    (~3-8 s), so the pool never has more processes than chunks."""
    if workers <= 1:
        return serial_chunk_map

    def run(fn: Callable[..., ChunkResult], calls: list[tuple]) -> Iterator[ChunkResult]:
        import multiprocessing as mp
        from concurrent.futures import Future, ProcessPoolExecutor

        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max(1, min(workers, len(calls))), mp_context=mp.get_context(method)) as pool:
            yield from ordered_map(lambda call: pool.submit(fn, *call), Future.result, calls,
                                   window=2 * workers, cancel=Future.cancel)

    return run


def auto_workers(available: int, requested: int | None) -> int:
    """train.data.tokenize_workers if set, else every available CPU up to _MAX_AUTO_WORKERS. Pure."""
    return requested if requested is not None else max(1, min(int(available), _MAX_AUTO_WORKERS))


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- building the cache


def build_token_cache(data_files: list[Path], tokenizer_dir: str, *, max_len: int, out_dir: Path,
                      messages_column: str = "messages", map_chunks: ChunkMap | None = None,
                      chunk_bytes: int = _CHUNK_BYTES) -> TokenCache:
    """Tokenise once; keyed by hash(tokenizer files + chat template + data content + max_len);
    reuses a matching cache, rebuilds otherwise. Runs in ONE process before the training workers
    start (the driver) so no rank tokenises while others wait on a collective; that process may
    spread the chunks over `map_chunks` (`local_chunk_map(n)`, the launcher's Ray tasks; unset:
    one after another here). Neither it nor `chunk_bytes` changes the result, so neither is in
    the key; an input of one chunk is tokenised here either way (no worker start-up to pay).

    The cache is `out_dir/<key>/`; it appears by rename of a finished build, so a killed build
    leaves nothing that looks complete, and a file lock keeps two builders from racing. Workers
    open `data_files` and the tokenizer by the paths given: where they run on other machines,
    those must be absolute paths every machine sees."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    from distill.store import Manifest
    from distill.teachers.models import resolve_model

    if max_len < 2:
        raise ValueError(f"max_len={max_len}: a sample needs at least 2 tokens")
    files = expand_data_files(data_files)
    tokenizer_path = resolve_model(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {tokenizer_dir!r} has no chat template; SFT data needs one")
    if not end_of_turn(tokenizer):
        raise ValueError(f"the chat template of {tokenizer_dir!r} writes nothing after an assistant message: "
                         "a model trained on it would never learn to stop; use a template with an end-of-turn token")
    settings = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": hash_files(files), "max_len": max_len,
                "messages_column": messages_column, "version": TOKENIZE_VERSION}
    key = fingerprint(settings)
    out_dir = Path(out_dir)
    target = out_dir / key
    if (target / "_manifest.json").exists():
        return load_token_cache(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / f".{key}.lock")):
        if (target / "_manifest.json").exists():  # another builder finished while this one waited
            return load_token_cache(target)
        for stale in out_dir.glob(f".{key}.tmp-*"):  # holding the lock: leftovers of a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=out_dir))
        try:
            chunks = plan_chunks(files, chunk_bytes)
            _TOKENIZERS[(tokenizer_path, settings["tokenizer"])] = tokenizer  # chunks run here reuse it
            calls = [(c, tokenizer_path, settings["tokenizer"], max_len, messages_column) for c in chunks]
            run = map_chunks if map_chunks is not None and len(calls) > 1 else serial_chunk_map
            counts = _write_cache(tmp, run(tokenize_chunk, calls))
            Manifest("tokenize", key, settings, inputs={str(f): settings["data"] for f in files},
                     status="complete", counts=counts).write(tmp)
            replace_dir(tmp, target)  # over a cache dir without manifest: a crashed rename
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_token_cache(target)


def _write_cache(out: Path, results: Iterable[ChunkResult]) -> dict:
    """Write chunk results, in the order given, as shards of _SHARD_SAMPLES samples plus
    rejected/part-00000.parquet; the manifest's counts."""
    from concurrent.futures import ThreadPoolExecutor

    stats = {"samples": 0, "dropped": 0, "rejected": 0, "tokens": 0, "target_tokens": 0}
    reasons: Counter = Counter()
    rejected: list[dict] = []
    buffer: list[Samples] = []
    buffered = shard = 0
    writes: deque = deque()

    # Shards are encoded on threads (Parquet encoding releases the GIL): merging and writing on one
    # thread ran at 10-20M tokens/s on the 2-core dev machine, the output of only 20-40 workers at
    # its ~0.5M tokens/s each. Each shard is one table whatever thread writes it, so the bytes do
    # not change; at most 8 shards wait in memory.
    with ThreadPoolExecutor(_WRITER_THREADS) as writers:
        def write(samples: Samples) -> None:
            nonlocal shard
            if len(writes) >= 8:
                writes.popleft().result()
            writes.append(writers.submit(pq.write_table, samples.table(), out / f"part-{shard:05d}.parquet"))
            shard += 1

        for result in results:
            samples = result.samples
            stats["samples"] += len(samples)
            stats["dropped"] += result.n_dropped
            stats["rejected"] += len(result.rejected) - result.n_dropped
            stats["tokens"] += int(samples.lengths.sum())
            stats["target_tokens"] += int(samples.n_targets.sum())
            reasons.update(r["reason"].split(":", 1)[0] for r in result.rejected)
            rejected += result.rejected
            buffer.append(samples)
            buffered += len(samples)
            while buffered >= _SHARD_SAMPLES:
                head, rest = Samples.concat(buffer).split(_SHARD_SAMPLES)
                write(head)
                buffer, buffered = [rest], buffered - _SHARD_SAMPLES
        if buffered:
            write(Samples.concat(buffer))
        while writes:
            writes.popleft().result()
    if rejected:
        (out / "rejected").mkdir()
        pq.write_table(pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA), out / "rejected" / "part-00000.parquet")
    return {**stats, "by_reason": dict(reasons)}
