"""Stage `dedup`: drop questions that duplicate another question of the set.

Reads `RUN/filter/`, writes `RUN/dedup/`. Exact duplicates after normalisation and near
duplicates by MinHash LSH. The kept representative is the question that comes first in the
source, so the choice does not depend on shard order or worker timing. MinHash signatures are
computed on Ray in chunks; the LSH pass over all signatures runs in the driver (it is a dict of
band hashes: memory linear in questions, seconds for 10^5 of them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from distill.config import RunConfig, output_fields
from distill.stages.derived import (
    done_question_ids, finish_stage, group_by_question, input_schema, open_derived, rejected_schema_for,
)
from distill.store import read_records

DUP_COLUMNS = [("dup_of", pa.string()), ("dup_method", pa.string()), ("dup_score", pa.float64())]


def _signatures(texts: list[str], dedup_cfg) -> np.ndarray:
    from distill.curate.dedup import minhash_signatures

    return minhash_signatures(texts, dedup_cfg)


def run(cfg: RunConfig, run_dir: Path):
    import time

    import ray

    dc = cfg.curate.dedup
    start = time.monotonic()
    schema = input_schema(run_dir / "filter")
    store = open_derived(run_dir, "dedup", "filter", output_fields(dc), schema, rejected_schema_for(schema, DUP_COLUMNS))
    groups = group_by_question(read_records(run_dir / "filter"))
    order = {r["id"]: i for i, r in enumerate(read_records(run_dir / "source", ["id"]))}
    ids = sorted(groups, key=lambda q: (order.get(q, len(order)), q))
    texts = [groups[q][0]["problem"] for q in ids]

    signatures = None
    if dc.near and ids:
        chunk = max(1, cfg.curate.shard_size * 4)
        task = ray.remote(_signatures)
        refs = [task.remote(texts[i:i + chunk], dc) for i in range(0, len(texts), chunk)]
        signatures = np.concatenate(ray.get(refs))

    from distill.curate.dedup import dedup_questions

    result = dedup_questions(ids, texts, dc, signatures=signatures)
    done = done_question_ids(store)
    index = store.next_index()
    batch_ids = [q for q in ids if q not in done]
    for lo in range(0, len(batch_ids), cfg.curate.shard_size):
        kept, rejected = [], []
        for q in batch_ids[lo:lo + cfg.curate.shard_size]:
            if q in result.dropped:
                d = result.dropped[q]
                reason = f"duplicate: {d.method} copy of question {d.kept_id} (jaccard {d.score:.2f})"
                rejected += [{**r, "reason": reason, "dup_of": d.kept_id, "dup_method": d.method,
                              "dup_score": float(d.score)} for r in groups[q]]
            else:
                kept += groups[q]
        store.commit(index, kept, rejected)
        index += 1
    return finish_stage(store, "dedup", time.monotonic() - start,
                        {"questions": len(ids), "duplicate_questions": len(result.dropped)})
