"""The SFT record: a curated sample as the chat the student will be trained on (pure functions)."""

from __future__ import annotations

from typing import Literal

from distill.section import Section


class SFTFormatConfig(Section):
    system: str | None = None
    """System message of every training conversation (unset: none). Use the system prompt you
    will deploy the student with; the chat template adds its own default otherwise."""

    user_template: str = "{problem}"
    """The user turn; `{problem}` is replaced by the question. Often the same instruction the
    teacher saw, so the student learns to answer in the format you verify (e.g. `\\boxed{}`)."""

    assistant: Literal["think", "response", "completion"] = "think"
    """The assistant turn: `think` = the teacher's reasoning inside think tags, then its final
    response (R1-style students; samples without reasoning get the response alone); `response` =
    the final response only (no long chain of thought); `completion` = the raw teacher text."""

    think_open: str = "<think>\n"
    """Text before the reasoning in `think` format."""

    think_close: str = "\n</think>\n\n"
    """Text between the reasoning and the final response in `think` format."""


def assistant_text(record: dict, cfg: SFTFormatConfig) -> str:
    if cfg.assistant == "completion":
        return record["completion"]
    response = (record.get("response") or "").strip()
    reasoning = (record.get("reasoning") or "").strip()
    if cfg.assistant == "response" or not reasoning:
        return response
    return f"{cfg.think_open}{reasoning}{cfg.think_close}{response}"


def to_messages(record: dict, cfg: SFTFormatConfig) -> list[dict]:
    """The training conversation for one curated sample."""
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages.append({"role": "user", "content": cfg.user_template.replace("{problem}", record["problem"])})
    messages.append({"role": "assistant", "content": assistant_text(record, cfg)})
    return messages
