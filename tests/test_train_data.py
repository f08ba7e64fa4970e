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
