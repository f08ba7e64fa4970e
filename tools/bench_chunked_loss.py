"""Peak memory and time of the loss's forward + backward: the dense loss (all targets' logits at
once: `F.linear` then `token_loss_sum`, what forward_loss does with train.loss_chunk=0) against the
chunked loss (`chunked_token_loss_sum`, train.loss_chunk > 0), on CPU.

Each variant runs in a fresh process, which resets its peak resident memory (Linux VmHWM) just
before the loss (torch, the hidden states and the output weight allocated) and reads it after
backward; the peak minus the resident memory at the reset is the loss's working memory, the
weight's gradient included. One JSON line per variant.

    python tools/bench_chunked_loss.py                          # 152k vocab, hidden 1536, 1k-8k targets
    python tools/bench_chunked_loss.py --hidden 256 --dense-targets 1024 2048 4096   # a 2-core machine
    python tools/bench_chunked_loss.py --targets 512 --vocab 32000   # a smoke run

The dense loss at 8k targets of a 152k vocabulary needs ~15 GB (fp32 logits, log-softmax and
their gradients): `--dense-targets` lists the sizes it is run at, so a small machine can skip
the largest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the peak read later is the loss's own,
    not a temporary of making the inputs or of importing torch."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(variant: str, targets: int, vocab: int, hidden: int, chunk: int, dtype: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distill.train.loss import chunked_token_loss_sum, token_loss_sum

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(targets, hidden, generator=g).to(dt).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).mul_(0.02).to(dt).requires_grad_()
    labels = torch.randint(0, vocab, (targets,), generator=g)

    def loss_of(h, w, labels):
        if variant == "dense":
            return token_loss_sum(F.linear(h, w), labels)[0]
        return chunked_token_loss_sum(h, w, labels, chunk)

    # A tiny run first, so that loading the matmul libraries and starting autograd's threads
    # (constant resident memory, ~200 MiB) is not counted as the loss's.
    small = [x[:8].detach().requires_grad_(x.requires_grad) for x in (h, w)]
    loss_of(*small, labels[:8].clamp(max=7)).backward()
    del small
    _reset_peak()
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    loss = loss_of(h, w, labels)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = _status_mib("VmHWM")
    return {"variant": variant, "targets": targets, "vocab": vocab, "hidden": hidden,
            "chunk": chunk if variant == "chunked" else None, "dtype": dtype, "threads": threads,
            "loss": float(loss.detach()), "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
            "rss_before_loss_mib": round(before), "rss_peak_mib": round(peak),
            "loss_peak_mib": round(peak - before),
            "dense_logits_fp32_mib": round(targets * vocab * 4 / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen2's vocabulary by default")
    ap.add_argument("--hidden", type=int, default=1536, help="Qwen2.5-1.5B's hidden size by default")
    ap.add_argument("--targets", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--dense-targets", type=int, nargs="*", default=None,
                    help="target counts to run the dense loss at (default: all of --targets)")
    ap.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "TARGETS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        variant, targets = args.worker
        print(json.dumps(worker(variant, int(targets), args.vocab, args.hidden, args.chunk, args.dtype,
                                args.threads)))
        return
    dense = set(args.targets if args.dense_targets is None else args.dense_targets)
    for n in args.targets:
        for variant in ("dense", "chunked") if n in dense else ("chunked",):
            cmd = [sys.executable, __file__, "--worker", variant, str(n), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--dtype", args.dtype,
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(json.dumps({"variant": variant, "targets": n, "error": out.stderr.strip()[-500:]}), flush=True)
                continue
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
