"""Run under torchrun (gloo, CPU) by tests/test_megatron_*.py: one Megatron-backend check per
call, on tiny random-weight students built identically on every rank, with packed batches of
real GSM8K chats tokenised by the SmolLM2 tokenizer.

    megatron_probe.py logits ARCH TP PP OUT.npz   Megatron and HF logits of one packed batch
    megatron_probe.py grads  ARCH TP PP OUT.npz   HF-named gradients of one step, both paths
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from conftest import GSM8K_TRAIN

SEQ_LEN = 96


class ChatSamples:
    """The `sample(i)` view make_batch needs: (input ids, shifted labels with the prompt masked)."""

    def __init__(self, n: int):
        import json

        from transformers import AutoTokenizer

        from distill.teachers.models import resolve_model

        tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
        rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[:n]]
        self.samples = []
        for r in rows:
            prompt = tok.apply_chat_template([{"role": "user", "content": r["problem"][:120]}], tokenize=False,
                                             add_generation_prompt=True)
            ids_p = tok(prompt, add_special_tokens=False)["input_ids"]
            ids_a = tok(f"The answer is {r['answer']}.<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = np.asarray(ids_p + ids_a, dtype=np.int64)
            labels = np.full(len(ids), -100, dtype=np.int64)
            labels[len(ids_p) - 1:-1] = ids[len(ids_p):]
            self.samples.append((ids[:SEQ_LEN], labels[:SEQ_LEN]))

    def sample(self, i: int):
        return self.samples[i]


def batches(n_micro: int):
    """n_micro packed micro-batches of 2 rows each, several samples per row."""
    from distill.train.packing import best_fit_decreasing, make_batch

    data = ChatSamples(12 * n_micro)
    bins = best_fit_decreasing([len(x) for x, _ in data.samples], SEQ_LEN)
    assert len(bins) >= 2 * n_micro, len(bins)
    return [make_batch(data, bins[2 * j:2 * j + 2], SEQ_LEN) for j in range(n_micro)]


def tiny(arch: str):
    from distill.teachers.models import resolve_model
    from distill.train.model import tiny_student

    # Qwen2-style untied with QKV bias; Llama-style tied. 4 layers so PP=2 has 2 per stage.
    return tiny_student(resolve_model("smollm2-135m-instruct"), arch=arch, seed=7, num_hidden_layers=4,
                        tie_word_embeddings=arch != "qwen2")


def backend(tp: int, pp: int, grad_accum: int):
    from distill.train.backends.megatron import MegatronBackend
    from distill.train.config import TrainConfig

    cfg = TrainConfig.model_validate({
        "backend": "megatron", "seq_len": SEQ_LEN, "grad_accum": grad_accum, "grad_clip": None,
        "megatron": {"tensor_parallel": tp, "pipeline_parallel": pp},
        "launch": {"launcher": "torchrun", "num_workers": tp * pp}})
    return MegatronBackend(cfg, precision="fp32")


def main() -> None:
    import torch

    from distill.train.backends.megatron.convert import to_hf
    from distill.train.model import forward_loss

    mode, arch, tp, pp, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    torch.manual_seed(0)
    n_micro = 2 if mode == "grads" else 1
    mbs = batches(n_micro)
    ref = tiny(arch)
    be = backend(tp, pp, n_micro)
    be.setup(tiny(arch), total_steps=1)
    result = {}
    if mode == "logits":
        result["megatron"] = be.packed_logits(mbs[0]).numpy()
        with torch.no_grad():
            b = mbs[0]
            base = ref.base_model(input_ids=b.input_ids, position_ids=b.position_ids, cu_seq_lens_q=b.cu_seqlens,
                                  cu_seq_lens_k=b.cu_seqlens, max_length_q=b.max_seqlen, max_length_k=b.max_seqlen,
                                  use_cache=False)
            result["hf"] = ref.get_output_embeddings()(base.last_hidden_state).numpy()
    elif mode == "grads":
        total = sum(b.n_target_tokens for b in mbs)
        be.accumulate(mbs, total)
        shards = [None] * be.world_size
        torch.distributed.all_gather_object(shards, ((be.tp_rank, be.pp_rank), be.shard_grads()))
        merged = to_hf(dict(shards), be.spec, tp=tp, pp=pp)
        result["norm_megatron"] = np.array(be.optimizer.grad_norm())  # what clipping uses (collective)
        for b in mbs:
            (forward_loss(ref, b)[0] / total).backward()
        # fp64: an fp32 sum over millions of squares is off by ~1e-5 relative.
        result["norm_hf"] = np.array(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()) ** 0.5)
        for name, p in ref.named_parameters():
            result["hf/" + name] = p.grad.numpy()
            result["megatron/" + name] = merged[name].numpy()
    if be.rank == 0:
        np.savez(out, **result)
    be.close()


if __name__ == "__main__":
    main()
