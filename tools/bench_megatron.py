"""Throughput of the Megatron backend: tokens/s and MFU of a random-weight Llama-like student on
packed rows (flash-attn varlen on GPU), through the backend's real train_step.

    python tools/bench_megatron.py                      # GPU: ~1.1B params, 8192-token rows, bf16
    python tools/bench_megatron.py --seq-len 16384
    torchrun --nproc-per-node 2 tools/bench_megatron.py --tp 2
    python tools/bench_megatron.py --tiny               # CPU smoke test (seconds)

MFU = (6 * params * tokens + causal attention FLOPs of the packed samples) / s / peak, the
trainer's metric (distill.train.metrics.mfu); --peak-flops defaults to 989e12 (H100/H200 dense
bf16). Prints one JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.testing.batches import packed_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, hidden 64, 256-token rows")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--peak-flops", type=float, default=989e12)
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.train.attention import flash_attn_available
    from distill.train.backends.megatron import MegatronBackend
    from distill.train.config import TrainConfig
    from distill.train.loop import local_env
    from distill.train.metrics import attention_flops, attention_shape, flop_params, mfu

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(local_env(s.getsockname()[1]))
    gpu = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=32000)
        seq_len, lens = 256, (32, 128)
    else:  # TinyLlama-1.1B's shape
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000)
        seq_len, lens = args.seq_len, (512, 4096)
    hf_cfg = AutoConfig.for_model("llama", max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=False,
                                  **shape)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig.model_validate({
        "backend": "megatron", "seq_len": seq_len, "grad_accum": args.grad_accum, "schedule": {"warmup_steps": 1},
        "megatron": {"tensor_parallel": args.tp, "pipeline_parallel": args.pp},
        "launch": {"launcher": "torchrun" if world > 1 else "local", "num_workers": world}})
    precision = "bf16" if gpu else "fp32"
    backend = MegatronBackend(cfg, precision=precision)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16 if gpu else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    n_flop_params, (layers, attn_dim) = flop_params(model), attention_shape(hf_cfg)
    backend.setup(model, total_steps=args.warmup + args.steps)
    del model
    step_batches = [[packed_rows(1, seq_len, shape["vocab_size"], seed=1000 * s + 10 * backend.dp_rank + j,
                                 min_len=lens[0], max_len=lens[1]) for j in range(args.grad_accum)]
                    for s in range(args.warmup + args.steps)]
    tokens_per_step = seq_len * args.grad_accum * backend.dp_size
    losses, compute = [], 0.0
    for s, mbs in enumerate(step_batches):
        if s == args.warmup:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        stats = backend.train_step(mbs, tokens_per_step)
        losses.append(round(stats.loss, 4))
        if s >= args.warmup:
            compute += stats.compute_s
    if gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = tokens_per_step * args.steps
    # Every data rank runs batches of the same lengths' distribution; rank 0's timed ones stand for all.
    attn = backend.dp_size * sum(attention_flops(torch.diff(b.cu_seqlens).tolist(), layers, attn_dim)
                                 for mbs in step_batches[args.warmup:] for b in mbs)
    out = {"bench": "megatron", "device": torch.cuda.get_device_name(0) if gpu else "cpu", "params": n_params,
           "seq_len": seq_len, "tp": args.tp, "pp": args.pp, "dp": backend.dp_size, "precision": precision,
           "flash_attn": gpu and flash_attn_available(),
           "steps": args.steps, "tokens_per_s": round(tokens / dt, 1),
           "mfu": round(mfu(n_flop_params, tokens, dt, args.peak_flops, backend.world_size, attn), 4) if gpu else None,
           "compute_share": round(compute / dt, 3), "losses": losses,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None}
    if backend.rank == 0:
        print(json.dumps(out), flush=True)
    backend.close()


if __name__ == "__main__":
    main()
