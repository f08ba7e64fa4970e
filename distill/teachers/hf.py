"""The transformers teacher engine: static batches through `model.generate`, on CPU or one GPU.

It is the engine that runs anywhere (the CPU quickstart, tests, a single GPU without vLLM).
Sequences are sorted by prompt length and decoded in left-padded batches of `batch_size`; a
batch costs as long as its longest row, so sorting keeps the padding waste small.

Seeding is honest but coarse: transformers samples a whole batch from one torch generator, so
the generator is seeded from the first seed in each batch. A sample is reproducible when the
same requests arrive in the same call with the same `batch_size` (a retried shard), not on its
own: the same request in a different batch draws different tokens. vLLM seeds per request.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import HFEngineConfig
from distill.teachers.base import Completion, Request, Result, SamplingParams
from distill.teachers.models import (
    PACKAGED_MODELS,
    admit,
    load_error_hint,
    prompt_limit,
    resolve_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sequence:
    """One row to decode: a request's prompt, once per sample it asked for."""

    request: int  # index of the request in the current call
    prompt: list[int]
    seed: int | None


def resolve_device(setting: str, cuda_available: bool) -> str:
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    if setting == "cuda" and not cuda_available:
        raise ValueError(
            "generate.hf.device=cuda, but no GPU is visible to this replica: set "
            "generate.gpus_per_replica (Ray hides GPUs from actors that reserve none), or "
            "generate.hf.device=auto"
        )
    return setting


def resolve_dtype(setting: str, device: str) -> str:
    """bfloat16 on GPU (half the memory, same range as float32); float32 on CPU, where bf16
    matmuls are slower and less exact on most chips."""
    if setting != "auto":
        return setting
    return "bfloat16" if device == "cuda" else "float32"


def model_context(config) -> int | None:
    """The context length a transformers config declares (None if it names none)."""
    text = config.get_text_config()
    # Architectures spell it differently; these cover Llama/Qwen/Mistral, GPT-2 and MPT styles.
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches of similar length.

    Longest first: a batch that runs out of memory fails on the first batch, not an hour in.
    Ties keep their input order, so a request's samples stay together and in order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seeds: list[int | None]) -> int | None:
    return next((s for s in seeds if s is not None), None)


def first_stop(text: str, stop: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the stop string that completes first in `text`; None if none occurs.

    Generation halts on the token that completes a stop string, so the earliest *end* is the
    one that stopped it; among those ending together the longest is cut (earliest start).
    """
    hits = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    if not hits:
        return None
    end, start = min(hits)
    return start, end


def tokens_to_reach(ids: list[int], n_chars: int, decode: Callable[[list[int]], str]) -> int:
    """The fewest leading tokens of `ids` whose text is at least `n_chars` long (binary search:
    ~log2(len) decodes). Off by one at most when a multi-byte character is split across tokens."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def trim_completion(
    new_ids: list[int], eos_ids: frozenset[int], stop: tuple[str, ...], decode: Callable[[list[int]], str]
) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one generated row.

    A row is its tokens, then (if it finished before the batch did) an EOS followed by padding,
    which is an EOS id too. The text stops before the first stop string; the token count
    includes the EOS or the tokens that spelled the stop string, never the padding.
    """
    end = next((i for i, t in enumerate(new_ids) if t in eos_ids), None)
    body = new_ids if end is None else new_ids[:end]
    text = decode(body)
    hit = first_stop(text, stop)
    if hit is not None:
        start, stop_end = hit
        return text[:start], "stop", tokens_to_reach(body, stop_end, decode)
    if end is not None:
        return text, "stop", end + 1
    # No EOS and no stop string: the row was never finished, so it ran to max_new_tokens.
    return text, "length", len(body)


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int],
    pad_id: int,
    seed: int | None,
) -> list[Completion]:
    """Decode `prompts` (token ids) as one left-padded batch; one completion per prompt.

    Sampling is exactly `params`: the caller's model should carry a generation config holding
    only token ids (HFEngine clears the checkpoint's suggested temperature, top_k, repetition
    penalty...), and transformers' default top_k=50 is switched off.
    """
    import torch

    if pad_id not in eos_ids:
        raise ValueError(f"pad_id {pad_id} must be one of the EOS ids {sorted(eos_ids)}: finished rows are "
                         "filled with it, and trimming cuts each row at its first EOS")
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        # Left padding: every row's last prompt token sits in the same column, where decoding starts.
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1

    sample = params.temperature > 0
    kwargs: dict = dict(do_sample=sample, max_new_tokens=params.max_new_tokens,
                        eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    if params.stop:
        kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    if seed is not None:
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator of this process
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
    rows = out[:, width:].tolist()  # the batch's one device->host copy

    def decode(t: list[int]) -> str:
        return tokenizer.decode(t, skip_special_tokens=True)

    completions = []
    for prompt, row in zip(prompts, rows):
        text, reason, n = trim_completion(row, eos_ids, params.stop, decode)
        completions.append(Completion(text, reason, prompt_tokens=len(prompt), completion_tokens=n))
    return completions


class HFEngine:
    """`TeacherEngine` over a transformers causal LM (config: `generate.hf`)."""

    def __init__(self, cfg: HFEngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.cfg = cfg
        self.device = resolve_device(cfg.device, torch.cuda.is_available())
        dtype = getattr(torch, resolve_dtype(cfg.dtype, self.device))
        path = resolve_model(cfg.model, cfg.cache_dir)
        started = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            if cfg.model in PACKAGED_MODELS or Path(path).is_dir():
                raise  # a broken local checkpoint: transformers' message names the missing file
            raise OSError(f"{load_error_hint(cfg.model, 'generate.hf.model')} ({e})") from e
        self.model = model.to(self.device).eval()
        self.load_s = time.perf_counter() - started

        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(f"model {cfg.model!r} declares no EOS token (generation_config.json or tokenizer), "
                             "so generation could never stop before max_new_tokens")
        self.eos_ids = frozenset(eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad in self.eos_ids else min(self.eos_ids)
        # Keep only the ids: checkpoints suggest sampling defaults (temperature, top_k,
        # repetition_penalty) that would silently apply on top of SamplingParams.
        model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id
        )
        self.context = model_context(model.config)
        self._stats = dict.fromkeys(
            ("prompt_tokens", "completion_tokens", "sequences", "batches", "rejected", "generate_s"), 0.0
        )

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """`request.n` completions per accepted request."""
        limit = prompt_limit(self.context, params.max_new_tokens, self.cfg.max_prompt_tokens)
        results, accepted = admit(self.tokenizer, requests, limit)
        self._stats["rejected"] += len(requests) - len(accepted)
        sequences = [Sequence(i, prompt, requests[i].seed) for i, prompt in accepted for _ in range(requests[i].n)]

        started = time.perf_counter()
        for batch in plan_batches([len(s.prompt) for s in sequences], self.cfg.batch_size):
            rows = [sequences[j] for j in batch]
            completions = generate_batch(
                self.model, self.tokenizer, [s.prompt for s in rows], params,
                eos_ids=self.eos_ids, pad_id=self.pad_id, seed=batch_seed([s.seed for s in rows]),
            )
            for s, c in zip(rows, completions):
                results[s.request].completions.append(c)
                self._stats["prompt_tokens"] += c.prompt_tokens
                self._stats["completion_tokens"] += c.completion_tokens
            self._stats["sequences"] += len(rows)
            self._stats["batches"] += 1
        self._stats["generate_s"] += time.perf_counter() - started
        return results

    def stats(self) -> dict[str, float]:
        """Totals since construction; prompt_tokens counts each sample's copy of its prompt."""
        return dict(self._stats)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
