"""The student model: loading it for packed training, its loss on a packed batch, and tiny
random-weight models of the same families for fast tests.

The model is an unmodified transformers model; packing reaches it only through the registered
attention implementation (`distill.train.attention`) and the position ids / cu_seqlens passed
to its forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.train.packing import PackedBatch

DTYPES = ("float32", "bfloat16", "float16")
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _attn_implementation(packed: bool) -> str:
    from distill.train.attention import register_packed_attention

    return register_packed_attention() if packed else "sdpa"


def load_student(name_or_path: str, *, dtype: str = "float32", packed: bool = True,
                 gradient_checkpointing: bool = False):
    """Accepts the packaged name `smollm2-135m-instruct` (resolved with
    distill.teachers.models.resolve_model) or a directory or a Hub id.

    packed=True runs the "distill_packed" attention (training on packed rows); packed=False
    the stock SDPA (generation, evaluation). Gradient checkpointing trades ~30% more compute
    for activations of one layer instead of all."""
    from transformers import AutoModelForCausalLM

    from distill.teachers.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=_torch_dtype(dtype),
                                                 attn_implementation=_attn_implementation(packed))
    if gradient_checkpointing:
        # Non-reentrant: works with inputs that need no grad and with ZeRO-3's parameter hooks.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def forward_loss(model, batch: "PackedBatch", *, loss_chunk: int = 0) -> tuple["torch.Tensor", int]:  # noqa: F821
    """(loss_sum, n_target_tokens) of a packed batch: summed fp32 cross-entropy over targets.

    The output projection runs on target positions only: prompts and padding never reach the
    [tokens, vocab] logits, which are the largest activation of a small model with a large
    vocabulary (8192 x 49152 fp32 = 1.6 GB per row). loss_chunk > 0 (train.loss_chunk) goes
    further: `loss.chunked_token_loss_sum` projects that many targets at a time, so the logits
    of all targets never exist; 0 projects them all at once."""
    from distill.train.loss import IGNORE_INDEX, chunked_token_loss_sum, token_loss_sum

    out = model.base_model(
        input_ids=batch.input_ids, position_ids=batch.position_ids,
        cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen, use_cache=False,
    )
    keep = batch.labels != IGNORE_INDEX
    hidden, labels = out.last_hidden_state[keep], batch.labels[keep]
    head = model.get_output_embeddings()
    # Gemma-2-style models squash logits; transformers applies this in the head's caller,
    # which this function replaces.
    cap = getattr(model.config, "final_logit_softcapping", None)
    if loss_chunk > 0:
        if head.bias is not None:
            raise ValueError("train.loss_chunk > 0: the student's output projection has a bias, which the chunked "
                             "loss does not add; set train.loss_chunk=0")
        return _as_forward_of(head, chunked_token_loss_sum, hidden, head.weight, labels, loss_chunk, cap), \
            batch.n_target_tokens
    logits = head(hidden)
    if cap:
        import torch

        logits = torch.tanh(logits / cap) * cap
    loss, _ = token_loss_sum(logits, labels)
    return loss, batch.n_target_tokens


def _as_forward_of(module, fn, *args):
    """fn(*args) run as `module`'s forward, inside the hooks wrapping the module's call.

    The chunked loss reads the output projection's weight instead of calling the module, and
    sharding wrappers gather a module's weight in its forward hooks (and again in the backward
    hook they attach to its outputs). DeepSpeed ZeRO-3 would also gather a weight read anywhere
    inside the engine's forward (it registers it as an "external parameter" of the running
    module, checked: same losses at 2 ranks), FSDP-style wrappers would not. An instance
    attribute shadows the class's forward for this one call; without hooks it is a plain call."""
    module.forward = fn
    try:
        return module(*args)
    finally:
        del module.forward


def tiny_student(tokenizer_dir: str, *, arch: str = "llama", seed: int = 0, **overrides):
    """A small random-weight model of the family with the real tokenizer's vocab, for fast tests
    (2 layers, hidden 64, 4 heads, 2 kv heads unless overridden). `attn_implementation` may be
    overridden too (default: the packed attention). Same (arch, seed, overrides): same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.teachers.models import resolve_model

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(TINY_ARCHS)}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_dir))
    attn = overrides.pop("attn_implementation", None) or _attn_implementation(True)
    dtype = _torch_dtype(overrides.pop("dtype", "float32"))
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    config = AutoConfig.for_model(arch, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model
