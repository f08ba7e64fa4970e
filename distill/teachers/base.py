"""The teacher-engine protocol: chat prompts + sampling parameters -> completions.

Every engine (transformers, an OpenAI-compatible server, vLLM) implements `TeacherEngine`.
The generation stage only sees this protocol, so it never imports torch, aiohttp or vllm.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


@dataclass(frozen=True)
class SamplingParams:
    """What every engine understands. How many samples is per `Request` (`Request.n`)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One prompt. `seed` is derived per (question, sample) by the stage so that a retried or
    resumed request asks for the same sample, and a new sample index asks for a fresh one."""

    messages: list[Message]
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (hit max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Result:
    """The answer to one `Request`: either `n` completions or a rejection with a reason.

    A rejected prompt (too long for the context, refused by the server) never fails the batch
    it travelled in; the stage writes it to `rejected/` with `reason`.
    """

    completions: list[Completion] = field(default_factory=list)
    rejected: str | None = None

    @property
    def ok(self) -> bool:
        return self.rejected is None


@runtime_checkable
class TeacherEngine(Protocol):
    """Turns requests into results, one `Result` per request, in order."""

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]: ...

    def stats(self) -> dict[str, float]:
        """Counters since construction (retries by cause, tokens, ...); merged into the summary."""
        ...

    def close(self) -> None: ...


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a long chain-of-thought completion into (reasoning, final response).

    `<think>…</think>` holds the reasoning; everything after the last closing tag is the
    response. Reasoning models often omit the opening tag (it is in the chat template), so a
    lone `</think>` also splits. An unclosed `<think>` (truncated output) is all reasoning and
    an empty response, which the truncation filter later rejects.
    """
    close = text.rfind("</think>")
    if close >= 0:
        head = text[:close]
        open_ = head.find("<think>")
        reasoning = head[open_ + len("<think>") :] if open_ >= 0 else head
        return reasoning.strip(), text[close + len("</think>") :].strip()
    open_ = text.find("<think>")
    if open_ >= 0:
        return text[open_ + len("<think>") :].strip(), ""
    return None, text.strip()


def derive_seed(base_seed: int | None, *parts: object) -> int | None:
    """A stable 31-bit seed for (base_seed, question id, sample index); None stays None."""
    if base_seed is None:
        return None
    digest = hashlib.sha256(":".join(map(str, (base_seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
