"""Training metrics: JSONL (RUN/train/metrics.jsonl), TensorBoard, optional W&B / MLflow, and a
progress line. Only rank 0 logs; other ranks get a logger that does nothing.

W&B and MLflow are imported only when configured (and `check_sinks` fails before training when
a configured one is not installed), so neither is a dependency.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from distill.train.config import MetricsSection


def mfu(n_params: int, tokens: int, seconds: float, peak_flops: float | None, world_size: int,
        attention_flops: float = 0.0) -> float | None:
    """Model FLOP utilisation: (6 * params * tokens + attention_flops) / seconds over the peak of
    all workers, as torchtitan and Megatron count it: 6 FLOPs per parameter per token for the
    forward and backward matmuls (`flop_params`), plus attention's two matmuls, which have no
    parameters (`attention_flops`). None without a configured peak. Pure."""
    if peak_flops is None or seconds <= 0:
        return None
    return (6.0 * n_params * tokens + attention_flops) / seconds / (peak_flops * world_size)


def attention_flops(sample_lengths, n_layers: int, attn_dim: int) -> float:
    """Forward + backward FLOPs of causal attention's score and value matmuls (Q K^T and P V)
    over packed samples of these lengths: per layer and sample of L tokens, 2 matmuls x 2 FLOPs
    x L^2 x attn_dim forward for full attention, halved for causal (the convention of Megatron's
    and torchtitan's causal counts: L^2 / 2 pairs), times 3 for forward + backward:
    6 * n_layers * attn_dim * sum(L^2). Samples of one row never attend to each other, so each
    counts alone (a row of 8 samples of 512 tokens costs 1/8 of one 4096-token sample).
    attn_dim = attention heads x head dim. Pure."""
    return 6.0 * n_layers * attn_dim * float(sum(int(n) ** 2 for n in sample_lengths))


def attention_shape(config) -> tuple[int, int]:
    """(layers, attention heads x head dim) of a transformers decoder config."""
    from distill.train.shape import shape_from_hf_config

    shape = shape_from_hf_config(config)
    return shape.n_layers, shape.attn_dim


def flop_params(model) -> int:
    """Parameters that cost 6 FLOPs per token: all of them, less an input embedding that is not
    tied to the output head (a lookup, no matmul). A tied embedding counts once, as the head."""
    n = sum(p.numel() for p in model.parameters())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        n -= inp.weight.numel()
    return n


def check_sinks(cfg: MetricsSection) -> list[str]:
    """Problems with the configured optional sinks (missing packages), before any work starts."""
    problems = []
    for key, value, module in (("wandb_project", cfg.wandb_project, "wandb"),
                               ("mlflow_experiment", cfg.mlflow_experiment, "mlflow")):
        if value and importlib.util.find_spec(module) is None:
            problems.append(f"train.metrics.{key}={value!r} needs `pip install {module}` (or unset it)")
    return problems


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop lines of steps after `after_step`: a resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= after_step]
    path.write_text("".join(ln + "\n" for ln in keep))


class MetricsLogger:
    def __init__(self, out_dir: Path, cfg: MetricsSection, *, enabled: bool, run_name: str, config: dict,
                 resume_step: int = 0):
        self.enabled, self.cfg = enabled, cfg
        self.jsonl = self.tb = self.wandb = self.mlflow = None
        self.started = time.monotonic()
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self.jsonl = out_dir / "metrics.jsonl"
            truncate_jsonl(self.jsonl, resume_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=config, resume="allow")
        if cfg.mlflow_experiment:
            import mlflow

            mlflow.set_experiment(cfg.mlflow_experiment)
            self.mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: v for k, v in _flatten(config).items()})

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics(scalars, step=step)

    def progress(self, step: int, total: int, values: dict) -> None:
        if not (self.enabled and self.cfg.progress):
            return
        elapsed = time.monotonic() - self.started
        parts = [f"train: step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}",
                 f"grad_norm {values['grad_norm']:.3f}", f"{values['target_tokens_per_s']:.0f} target tok/s",
                 f"packing {values['packing_efficiency']:.1%}"]
        if values.get("mfu") is not None:
            parts.append(f"MFU {values['mfu']:.1%}")
        parts.append(f"{elapsed:.0f}s")
        print(", ".join(parts), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
