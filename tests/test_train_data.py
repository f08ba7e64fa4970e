"""SFT tokenisation: assistant-only labels checked against the chat template, the token cache
(reuse, keys, over-long samples, malformed rows). Real SmolLM2 tokenizer, real GSM8K text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GSM8K_TRAIN
from distill.train.data import (
    IGNORE_INDEX,
    MalformedConversation,
    build_token_cache,
    load_token_cache,
    tokenize_conversation,
    validate_messages,
)

SYSTEM = "You are a careful math tutor. Think step by step."


# ----------------------------------------------------------------- helpers shared by the trainer tests


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    from distill.teachers.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def gsm8k_chats(n: int, *, start: int = 0, system: bool = False) -> list[list[dict]]:
    """Real question/solution pairs as chats (the assistant turn is GSM8K's reference solution)."""
    out = []
    with open(GSM8K_TRAIN) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(out) == n:
                break
            r = json.loads(line)
            chat = [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]
            out.append(([{"role": "system", "content": SYSTEM}] if system else []) + chat)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def target_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The predicted tokens, as maximal runs of consecutive target positions."""
    runs, cur = [], []
    for t, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert lab == ids[t + 1], f"label at {t} is not the next token"
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# ----------------------------------------------------------------- masks against the chat template


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("turns", [1, 3])
def test_targets_are_exactly_the_assistant_turns(tokenizer, system, turns):
    chats = gsm8k_chats(turns, system=system)
    messages = chats[0][: 2 + int(system)]
    for c in chats[1:]:  # further turns: new questions in the same conversation
        messages += c[-2:]
    ids, labels = tokenize_conversation(tokenizer, messages)

    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == expected_ids
    assert labels[-1] == IGNORE_INDEX and len(labels) == len(ids)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = target_runs(ids, labels)
    assert [tokenizer.decode(r) for r in runs] == [c + "<|im_end|>" for c in assistant]
    # The template's own default system prompt appears when none is given, and is never a target.
    text = tokenizer.decode(ids)
    assert ("You are a helpful AI assistant named SmolLM" in text) is (not system)


def test_assistant_reply_repeating_the_question_is_found_at_its_own_place(tokenizer):
    messages = [{"role": "user", "content": "Say: 42"}, {"role": "assistant", "content": "42"},
                {"role": "user", "content": "42"}, {"role": "assistant", "content": "Yes, 42."}]
    ids, labels = tokenize_conversation(tokenizer, messages)
    targets = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    decoded = tokenizer.decode([ids[t + 1] for t in targets])
    assert decoded == "42<|im_end|>Yes, 42.<|im_end|>"
    # The first target is predicted from the first "assistant\n" header, before the 2nd user turn.
    assert tokenizer.decode(ids[: targets[0] + 1]).endswith("user\nSay: 42<|im_end|>\n<|im_start|>assistant\n")


def test_trimming_template_with_another_end_of_turn(tokenizer):
    """A Llama-3-like template that trims content and ends turns with a different marker."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|endoftext|>{% endfor %}"
    )
    messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n Hello there \n"}]
    ids, labels = tokenize_conversation(tok, messages)
    assert [tok.decode(r) for r in target_runs(ids, labels)] == ["Hello there<|endoftext|>"]


@pytest.mark.parametrize(
    "messages, code",
    [
        (None, "no_messages"),
        ([], "no_messages"),
        ("not json", "bad_messages"),
        ({"role": "user"}, "bad_messages"),
        ([{"role": "user", "content": "q"}], "no_assistant"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}], "bad_role"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "bad_role"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "bad_message"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "bad_message"),
        (["hello", {"role": "assistant", "content": "a"}], "bad_message"),
    ],
)
def test_malformed_conversations_are_named(messages, code):
    with pytest.raises(MalformedConversation) as e:
        validate_messages(messages)
    assert str(e.value).split(":")[0] == code


def test_messages_as_json_string_and_extra_keys(tokenizer):
    chat = gsm8k_chats(1)[0]
    with_extra = [{**m, "name": "x"} for m in chat]
    assert tokenize_conversation(tokenizer, json.dumps(with_extra)) == tokenize_conversation(tokenizer, chat)


# ----------------------------------------------------------------- the cache


def test_cache_counts_quarantines_and_reuses(tmp_path, smollm_dir, tokenizer):
    good = gsm8k_chats(40)
    long_chat = [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": "word " * 600}]
    rows = [{"messages": c} for c in good[:20]]
    rows += [
        "{not json",
        {"id": 1},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": long_chat},
    ]
    rows += [{"messages": c} for c in good[20:]]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cache = build_token_cache([data], smollm_dir, max_len=512, out_dir=tmp_path / "cache")

    assert cache.n_samples == 40 and cache.n_dropped == 1 and cache.n_rejected == 5
    assert cache.reasons == {"invalid_json": 1, "no_messages": 2, "no_assistant": 1, "bad_role": 1, "too_long": 1}
    rejected = pq.read_table(cache.path / "rejected" / "part-00000.parquet").to_pylist()
    by_line = {r["location"]: r["reason"] for r in rejected}
    assert by_line[f"{data}:21"].startswith("invalid_json")
    assert by_line[f"{data}:25"].startswith("bad_role: message 0 has role 'bot'")
    assert by_line[f"{data}:26"].startswith("too_long:")  # dropped whole, never cut
    # Samples keep the input order and equal the one-at-a-time tokenisation.
    for i in (0, 19, 20, 39):
        ids, labels = tokenize_conversation(tokenizer, good[i])
        got_ids, got_labels = cache.sample(i)
        assert got_ids.tolist() == ids and got_labels.tolist() == labels
        assert cache.lengths[i] == len(ids) and cache.n_targets[i] == sum(x != IGNORE_INDEX for x in labels)

    # Same inputs: the same directory, not rebuilt. Reopened by path: the same content.
    mtime = (cache.path / "part-00000.parquet").stat().st_mtime_ns
    again = build_token_cache([data], smollm_dir, max_len=512, out_dir=tmp_path / "cache")
    assert again.path == cache.path and (cache.path / "part-00000.parquet").stat().st_mtime_ns == mtime
    reopened = load_token_cache(cache.path)
    assert np.array_equal(reopened.lengths, cache.lengths) and reopened.fingerprint == cache.fingerprint
    assert np.array_equal(reopened.sample(7)[1], cache.sample(7)[1])

    # A different max_len or different data content is a different cache.
    longer = build_token_cache([data], smollm_dir, max_len=4096, out_dir=tmp_path / "cache")
    assert longer.path != cache.path and longer.n_samples == 41 and longer.n_dropped == 0
    write_jsonl(data, rows[:-1])
    changed = build_token_cache([data], smollm_dir, max_len=512, out_dir=tmp_path / "cache")
    assert changed.path not in (cache.path, longer.path) and changed.n_samples == 39


def test_cache_key_follows_the_chat_template(tmp_path, smollm_dir):
    import shutil

    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(5)])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(smollm_dir) / name, tok_dir / name)
    a = build_token_cache([data], str(tok_dir), max_len=512, out_dir=tmp_path / "cache")
    template = (tok_dir / "chat_template.jinja").read_text()
    (tok_dir / "chat_template.jinja").write_text(template.replace("<|im_start|>' + message['role']", "<|im_start|>' + message['role'] + ':'"))
    b = build_token_cache([data], str(tok_dir), max_len=512, out_dir=tmp_path / "cache")
    assert a.path != b.path
    assert b.lengths.sum() > a.lengths.sum()  # one more token per message header: the new template was used


def test_parquet_directory_input_matches_jsonl(tmp_path, smollm_dir):
    chats = gsm8k_chats(12, system=True)
    shard_dir = tmp_path / "sft"
    (shard_dir / "rejected").mkdir(parents=True)
    for k in range(2):
        table = pa.Table.from_pylist([{"messages": c, "id": str(i)} for i, c in enumerate(chats[k * 6:(k + 1) * 6])])
        pq.write_table(table, shard_dir / f"part-{k:05d}.parquet")
    # A stage's rejected records sit beside its output; they are not training data.
    pq.write_table(pa.Table.from_pylist([{"messages": chats[0]}]), shard_dir / "rejected" / "part-00000.parquet")
    from_parquet = build_token_cache([shard_dir], smollm_dir, max_len=1024, out_dir=tmp_path / "c1")
    jsonl = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in chats])
    from_jsonl = build_token_cache([jsonl], smollm_dir, max_len=1024, out_dir=tmp_path / "c2")
    assert from_parquet.n_samples == from_jsonl.n_samples == 12
    for i in range(12):
        assert np.array_equal(from_parquet.sample(i)[1], from_jsonl.sample(i)[1])


def test_custom_messages_column_and_missing_column(tmp_path, smollm_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"chat": c} for c in gsm8k_chats(3)])
    cache = build_token_cache([data], smollm_dir, max_len=1024, out_dir=tmp_path / "c", messages_column="chat")
    assert cache.n_samples == 3
    missing = build_token_cache([data], smollm_dir, max_len=1024, out_dir=tmp_path / "c")
    assert missing.n_samples == 0 and missing.reasons == {"no_messages": 3}


def test_template_without_end_of_turn_is_refused(tmp_path, smollm_dir):
    import shutil

    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(2)])
    tok_dir = tmp_path / "tok"
    shutil.copytree(smollm_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (tok_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="never learn to stop"):
        build_token_cache([data], str(tok_dir), max_len=512, out_dir=tmp_path / "cache")


def test_leftovers_of_a_killed_build_are_replaced(tmp_path, smollm_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(3)])
    first = build_token_cache([data], smollm_dir, max_len=512, out_dir=tmp_path / "cache")
    # A build killed mid-way leaves a temp dir; one killed between rename steps a dir without manifest.
    (first.path / "_manifest.json").unlink()
    (tmp_path / "cache" / f".{first.path.name}.tmp-dead").mkdir()
    again = build_token_cache([data], smollm_dir, max_len=512, out_dir=tmp_path / "cache")
    assert again.path == first.path and again.n_samples == 3
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


# ----------------------------------------------------------------- the parallel build


def mixed_inputs(tmp: Path) -> tuple[list[Path], dict[str, str]]:
    """Real GSM8K chats in two JSONL files and a Parquet file of several row groups, with
    malformed rows planted among them; the files and {location: expected reason code}."""
    chats = gsm8k_chats(420)
    planted: dict[str, str] = {}
    bad = [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{\"messages\": 1}", "undecodable"),
        (b"[1, 2]", "not_an_object"),
        (json.dumps({"id": 1}).encode(), "no_messages"),
        (json.dumps({"messages": "not json"}).encode(), "bad_messages"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), "no_assistant"),
        (json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(), "bad_role"),
        (json.dumps({"messages": [{"role": "user", "content": "Repeat."},
                                  {"role": "assistant", "content": "word " * 600}]}).encode(), "too_long"),
    ]
    lines: list[bytes] = []
    first = tmp / "a.jsonl"
    for i, chat in enumerate(chats[:200]):
        if i % 23 == 11:
            raw, code = bad[(i // 23) % len(bad)]
            lines.append(raw)
            planted[f"{first}:{len(lines)}"] = code
        if i % 37 == 5:
            lines.append(b"   ")  # blank: skipped, but it still counts as a line
        lines.append(json.dumps({"messages": chat}).encode())
    first.write_bytes(b"\n".join(lines) + b"\n")

    table = pa.Table.from_pylist([{"messages": c, "id": str(i)} for i, c in enumerate(chats[200:300])]
                                 + [{"messages": None, "id": "null"}])
    parquet = tmp / "b.parquet"
    pq.write_table(table, parquet, row_group_size=30)  # four row groups: chunks cut through them
    planted[f"{parquet}:row 101"] = "no_messages"

    last = tmp / "c.jsonl"
    rows = [json.dumps({"messages": [{"role": "system", "content": SYSTEM}, *c]}) for c in chats[300:]]
    last.write_text("\n".join(rows[:60] + ["{not json"] + rows[60:]))  # and no newline at the end
    planted[f"{last}:61"] = "invalid_json"
    return [first, parquet, last], planted


def cache_files(path: Path) -> dict[str, bytes]:
    """Every file of a cache directory by relative path; the manifest without its time stamp."""
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.name == "_manifest.json":
            manifest = json.loads(data)
            manifest.pop("updated")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(f.relative_to(path))] = data
    return out


def test_parallel_build_equals_serial_build(tmp_path, smollm_dir, monkeypatch):
    from distill.train import data

    monkeypatch.setattr(data, "_SHARD_SAMPLES", 64)  # several shards, cut across chunk results
    files, planted = mixed_inputs(tmp_path)
    assert len(data.plan_chunks(files)) == 3  # the default: one chunk per small file
    assert len(data.plan_chunks(files, 16_000)) >= 10
    serial = build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "serial")
    parallel = build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "parallel",
                                 map_chunks=data.local_chunk_map(2), chunk_bytes=16_000)
    # One line (or Parquet row) per chunk, one after another: every chunk boundary there is.
    per_row = build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "per_row", chunk_bytes=1)

    # Real GSM8K solutions run past 256 tokens: the drop path sees more than the planted sample.
    assert serial.n_samples > 200 and serial.n_dropped > 20 and len(list(serial.path.glob("part-*.parquet"))) > 3
    assert serial.path.name == parallel.path.name == per_row.path.name  # the key ignores parallelism
    expected = cache_files(serial.path)
    assert cache_files(parallel.path) == expected
    assert cache_files(per_row.path) == expected

    rejected = pq.read_table(serial.path / "rejected" / "part-00000.parquet").to_pylist()
    reasons = {r["location"]: r["reason"].split(":")[0] for r in rejected}
    assert {loc: reasons.get(loc) for loc in planted} == planted
    assert serial.n_rejected == len(planted) - 1  # all but the over-long chat are malformed
    assert serial.n_samples + serial.n_dropped + serial.n_rejected == 420 + len(planted)
    order = [(files.index(Path(r["location"].rsplit(":", 1)[0])), int(r["location"].rsplit(" ", 1)[-1].rsplit(":", 1)[-1]))
             for r in rejected]
    assert order == sorted(order)  # quarantine in input order


def test_local_chunk_map_keeps_the_input_order():
    from distill.train.data import local_chunk_map

    assert list(local_chunk_map(2)(pow, [(i, 2) for i in range(30)])) == [i * i for i in range(30)]


def test_a_failed_chunk_leaves_no_cache(tmp_path, smollm_dir):
    files, _ = mixed_inputs(tmp_path)

    def worker_lost(fn, calls):
        yield fn(*calls[0])
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "cache", map_chunks=worker_lost)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    assert build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "cache").n_samples > 200


def test_a_worker_with_another_tokenizer_refuses(tmp_path, smollm_dir):
    from distill.train.data import plan_chunks, tokenize_chunk

    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(2)])
    with pytest.raises(RuntimeError, match="differs from the one the token cache was keyed with"):
        tokenize_chunk(plan_chunks([data])[0], smollm_dir, "0" * 16, 512, "messages")


def test_tokenize_workers_is_volatile_and_auto_is_capped():
    from pydantic import ValidationError

    from distill.config import output_fields
    from distill.train.config import TrainConfig
    from distill.train.data import _MAX_AUTO_WORKERS, auto_workers

    assert output_fields(TrainConfig.model_validate({"data": {"tokenize_workers": 3}})) == output_fields(TrainConfig())
    with pytest.raises(ValidationError, match="tokenize_workers"):
        TrainConfig.model_validate({"data": {"tokenize_workers": 0}})
    assert auto_workers(2, None) == 2 and auto_workers(0, None) == 1 and auto_workers(1000, 5) == 5
    assert auto_workers(1000, None) == _MAX_AUTO_WORKERS


@pytest.mark.slow
def test_ray_tasks_build_the_same_cache(tmp_path, smollm_dir):
    import ray

    from distill.train.launch import _chunk_map

    if ray.is_initialized():  # a connection an earlier test left behind is not this test's subject
        ray.shutdown()
    files, _ = mixed_inputs(tmp_path)
    serial = build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "serial")
    assert _chunk_map(None).__qualname__ == "local_chunk_map.<locals>.run"  # not connected: a local pool
    ray.init(num_cpus=2, address="local", include_dashboard=False)
    try:
        on_ray = _chunk_map(None)
        assert on_ray.__qualname__ == "_chunk_map.<locals>.run"  # connected: Ray tasks
        on_ray = build_token_cache(files, smollm_dir, max_len=256, out_dir=tmp_path / "ray",
                                   map_chunks=on_ray, chunk_bytes=16_000)
    finally:
        ray.shutdown()
    assert on_ray.path.name == serial.path.name
    assert cache_files(on_ray.path) == cache_files(serial.path)
