"""The student's shape, read once from its config, and every check of a train config against it.

One reader (`shape_from_hf_config`) turns a `transformers` config into a `ModelShape`; the dry
run's memory estimate, the MFU's attention FLOPs and the Megatron model spec all start from it.
One checker (`shape_problems`) holds every check that needs only the shape: train.seq_len vs the
context and the sliding window, the Megatron degrees vs heads, key/value heads, MLP width and
layers, and the DeepSpeed sequence-parallel degree vs heads and key/value heads. The launcher's
preflight and `--dry-run` both call it, for a student read from its config or one known only
from the dry run's table of public shapes. (Whether Megatron can build the family at all needs
the config itself: `megatron.model_problems`.)

Pure: no torch unless a parameter count is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the estimates and checks need of a decoder-only transformer (Llama / Qwen2 layout)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    qkv_bias: bool = False
    n_params: int | None = None
    """Exact count when known (counted from the HF config); else `params()` computes it."""
    head_dim: int | None = None
    """Per-head width when the config sets it apart from hidden / heads (None: hidden / heads)."""
    sliding_window: int | None = None
    """The attention window when the model uses one (None: full attention)."""

    @property
    def attn_dim(self) -> int:
        """Attention heads x head width: the width of Q (and of the attention output)."""
        return self.n_heads * (self.head_dim or self.hidden // self.n_heads)

    def params(self) -> int:
        """Parameter count of a Llama/Qwen2-style decoder: embeddings, per layer attention (GQA,
        optional q/k/v bias), a gated MLP (three matrices) and two RMSNorms, a final norm, and an
        LM head unless tied to the embeddings."""
        if self.n_params is not None:
            return self.n_params
        h, kv = self.hidden, self.hidden // self.n_heads * self.n_kv_heads
        attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * self.intermediate + 2 * h
        embed = self.vocab * h
        return embed + self.n_layers * layer + h + (0 if self.tied_embeddings else embed)


def shape_from_hf_config(config, *, count: bool = False) -> ModelShape:
    """A `transformers` config -> ModelShape; with `count`, the exact parameter count of the
    model built on the meta device (no memory, ~0.1 s), whatever its architecture."""
    n_params = None
    if count:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
    heads = config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):  # Qwen2 configs carry a window they do not use
        window = None
    return ModelShape(
        n_layers=config.num_hidden_layers, hidden=config.hidden_size, n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), n_params=n_params,
        head_dim=getattr(config, "head_dim", None), sliding_window=window,
    )


def split_problems(*, heads: int, kv_heads: int, ffn: int, layers: int, tp: int, pp: int,
                   key: str = "train.megatron") -> list[str]:
    """What stops a model from splitting tp x pp ways (tensor parallelism splits heads, key/value
    heads and the MLP width; pipeline stages take equal runs of layers), each naming the setting."""
    out = []
    if heads % tp:
        out.append(f"{key}.tensor_parallel={tp}: the model's {heads} attention heads do not divide by it; "
                   "use a divisor of the head count")
    if kv_heads % tp:
        out.append(f"{key}.tensor_parallel={tp}: the model's {kv_heads} key/value heads do not divide by it; "
                   "use a divisor of the key/value head count")
    if ffn % tp:
        out.append(f"{key}.tensor_parallel={tp}: the MLP width {ffn} does not divide by it")
    if layers % pp:
        out.append(f"{key}.pipeline_parallel={pp}: the model's {layers} layers do not split evenly; "
                   "use a divisor of the layer count")
    return out


def shape_problems(cfg, shape: ModelShape) -> list[str]:
    """Every check of a train config (`TrainConfig`) against the student's shape."""
    model = cfg.student.model
    problems = []
    if cfg.seq_len > shape.max_positions:
        problems.append(f"train.seq_len={cfg.seq_len} exceeds the context of train.student.model={model!r} "
                        f"(max_position_embeddings={shape.max_positions}): lower train.seq_len")
    # Both backends train with the packed attention, which has no sliding window: a row longer
    # than the window would let a sample see further back than the model was trained to.
    if shape.sliding_window is not None and shape.sliding_window < cfg.seq_len:
        problems.append(f"train.seq_len={cfg.seq_len} exceeds the sliding window of train.student.model="
                        f"{model!r} ({shape.sliding_window} tokens), which the packed attention does not "
                        f"implement: lower train.seq_len to {shape.sliding_window} or less")
    sp = cfg.deepspeed.sequence_parallel
    if cfg.backend == "deepspeed" and sp > 1:
        # Ulysses hands each rank of the group heads / degree query heads and the kv heads they
        # read (distill.train.seqpar): both counts must split evenly.
        for what, n in (("attention heads", shape.n_heads), ("key/value heads", shape.n_kv_heads)):
            if n % sp:
                problems.append(f"train.deepspeed.sequence_parallel={sp}: the model's {n} {what} do not divide by "
                                "it; use a divisor of the head count and the key/value head count")
    if cfg.backend == "megatron":
        m = cfg.megatron
        problems += split_problems(heads=shape.n_heads, kv_heads=shape.n_kv_heads, ffn=shape.intermediate,
                                   layers=shape.n_layers, tp=m.tensor_parallel, pp=m.pipeline_parallel)
    return problems
