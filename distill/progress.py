"""Progress bar and end-of-stage summary for long-running stages."""

from __future__ import annotations

import sys
import time
from collections import Counter


class Progress:
    """Shards done/total with samples/s, tokens/s and ETA (tqdm computes the ETA from shards)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self.start = time.monotonic()
        self.samples = 0
        self.tokens = 0
        self.bar = tqdm(total=total, desc=desc, unit="shard", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        dt = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.samples / dt:.2f} samples/s, {self.tokens / dt:.0f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def format_counter(c: dict | Counter, empty: str = "none") -> str:
    items = [f"{k}={v}" for k, v in sorted(dict(c).items()) if v]
    return ", ".join(items) if items else empty
