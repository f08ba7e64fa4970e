"""The vLLM teacher engine: one offline `vllm.LLM` per replica (tensor-parallel over its GPUs).

vLLM schedules the whole call itself (continuous batching, paged KV cache), so `generate` hands
it every accepted prompt at once. Unlike the transformers engine, each request carries its own
seed into vLLM, so a sample is reproducible whatever it was batched with.

Prompts are rendered with the model's chat template here and sent as token ids, so the length
check and vLLM see the same tokens; an over-long prompt is rejected before it reaches vLLM
(which would otherwise fail the whole call).
"""

from __future__ import annotations

import gc
import time

from distill.config import VLLMEngineConfig
from distill.teachers.base import Completion, Request, Result, SamplingParams
from distill.teachers.models import admit, prompt_limit, resolve_model

FINISH_REASONS = {"stop": "stop", "length": "length"}
"""vLLM's finish reasons -> ours; anything else ("abort") is an engine failure, raised."""


def finish_reason(vllm_reason: str | None) -> str:
    if vllm_reason not in FINISH_REASONS:
        raise RuntimeError(f"vLLM finished a sequence with reason {vllm_reason!r} (expected stop or length)")
    return FINISH_REASONS[vllm_reason]


class VLLMEngine:
    """`TeacherEngine` over vLLM's offline `LLM` (config: `generate.vllm`)."""

    def __init__(self, cfg: VLLMEngineConfig):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "generate.engine=vllm needs vLLM, which is not installed: on a CUDA machine run "
                "pip install 'distill[vllm]' (or choose generate.engine=hf)"
            ) from e
        if not cfg.model:
            raise ValueError("generate.vllm.model is empty: set it to a local model directory or a Hub id")
        self._vllm = vllm
        self.cfg = cfg
        started = time.perf_counter()
        self.llm = vllm.LLM(
            model=resolve_model(cfg.model),
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            # The replica actor already holds its GPUs through Ray (generate.gpus_per_replica), so
            # tensor-parallel workers must be local processes on those GPUs: vLLM's Ray executor
            # would ask Ray for GPUs again and wait forever for the ones this actor holds.
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None,
        )
        self.load_s = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        # What vLLM settled on: cfg.max_model_len, or the model's own context when unset.
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._stats = dict.fromkeys(("prompt_tokens", "completion_tokens", "sequences", "rejected", "generate_s"), 0.0)

    def sampling_params(self, request: Request, params: SamplingParams):
        """vLLM's sampling parameters for one request. Given explicitly, they replace the
        checkpoint's suggested defaults (top_k, repetition penalty), as in the hf engine."""
        return self._vllm.SamplingParams(
            n=request.n,
            temperature=params.temperature,  # 0: greedy
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=request.seed,
            stop=list(params.stop) or None,
        )

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """`request.n` completions per accepted request (the stage sends one request per
        sample, each with its own seed)."""
        results, accepted = admit(self.tokenizer, requests, prompt_limit(self.max_model_len, params.max_new_tokens, None))
        self._stats["rejected"] += len(requests) - len(accepted)
        accepted = [(i, prompt) for i, prompt in accepted if requests[i].n > 0]  # vLLM refuses n=0
        if not accepted:
            return results

        started = time.perf_counter()
        outputs = self.llm.generate(
            [{"prompt_token_ids": prompt} for _, prompt in accepted],
            [self.sampling_params(requests[i], params) for i, _ in accepted],
            use_tqdm=False,
        )  # in input order
        self._stats["generate_s"] += time.perf_counter() - started
        for (i, _), out in zip(accepted, outputs):
            n_prompt = len(out.prompt_token_ids)
            for seq in out.outputs:
                # token_ids include the EOS that ended a sequence (text does not), and the
                # tokens that spelled a stop string (text stops before it).
                results[i].completions.append(
                    Completion(seq.text, finish_reason(seq.finish_reason), n_prompt, len(seq.token_ids))
                )
                self._stats["prompt_tokens"] += n_prompt
                self._stats["completion_tokens"] += len(seq.token_ids)
                self._stats["sequences"] += 1
        return results

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def close(self) -> None:
        # Dropping the LLM releases its workers and KV cache; empty_cache hands the memory back
        # so a following engine in the same process can claim its gpu_memory_utilization share.
        self.llm = None
        gc.collect()
        import torch

        torch.cuda.empty_cache()
