"""The engine: chat messages in, text out. One small interface, several backends.

Stages never touch tokenizers: every backend applies the model's own chat template. A
conversation whose last message is from the assistant is *continued* (prefill), which is
how the labeler scores "The answer is: (" → "A" / "B".

Backends are looked up lazily from ``BACKENDS`` (module:Class), so vLLM is imported only
when it is chosen.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Protocol

from cai_ray.core.types import GREEDY_BELOW, Message, Sampling, Unscored  # noqa: F401 (the engine's types)


class Engine(Protocol):
    #: tokens the model can attend to (prompt + generated)
    context_length: int
    #: what produced the text, for manifests and rows
    model_name: str

    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]: ...

    def choice_logprobs(self, convs: list[list[Message]], choices: Sequence[str]) -> list[list[float] | Unscored]:
        """Log-probabilities of each choice continuing each conversation, normalised over
        the choices (``logsumexp == 0`` per row); ``Unscored`` for a row that cannot be."""
        ...

    def token_counts(self, convs: list[list[Message]]) -> list[int]:
        """Prompt length in tokens of each conversation, after the chat template."""
        ...


class EngineUnavailable(RuntimeError):
    """A backend that cannot run here (e.g. vLLM not installed)."""


BACKENDS = {
    "hf": "cai_ray.engine.hf:HFEngine",
    "vllm": "cai_ray.engine.vllm:VLLMEngine",
    # Any OpenAI-compatible endpoint (vLLM, a hosted API, `cai-ray serve`).
    "openai": "cai_ray.engine.openai_api:OpenAIEngine",
    # Benchmark-only: returns canned text instantly so orchestration can be timed alone.
    "noop": "cai_ray.engine.noop:NoopEngine",
}


def engine_class(backend: str):
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def load_engine(backend: str, **kwargs) -> Engine:
    return engine_class(backend)(**kwargs)


def engine_from_section(section, **overrides) -> Engine:
    """The engine an ``engine``-style config section describes: an ``EngineConfig``, or its
    plain values (as Ray Data actors and Serve replicas receive them)."""
    from cai_ray.config import EngineConfig

    if isinstance(section, dict):
        section = EngineConfig(**section)
    return load_engine(section.backend, **{**section.engine_kwargs(), **overrides})


WORD_JOINER = "\u2060"  # invisible, and no tokenizer's special token contains it


def special_token_pattern(tokenizer) -> re.Pattern:
    """A regex matching any of the tokenizer's special tokens (longest first); its pattern
    is empty when there is none to guard against."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(getattr(tok, "content", tok)))
    names = sorted((n for n in names if len(n) > 1), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names)))


def neutralise(text: str, tokenizer) -> str:
    """``text`` with every special token of ``tokenizer`` (``<|im_end|>``, ``<end_of_turn>``,
    ``<file_sep>``...) broken by a word joiner after its first character, so data can never
    become turn markup: a chat template's text is tokenised with special-token parsing, and
    a prompt or answer holding ``<|im_end|><|im_start|>`` would otherwise forge turns. Use
    the tokenizer that will tokenise the text (a reward model's may differ from the policy's)."""
    return _break_special(text, special_token_pattern(tokenizer))


def neutralise_messages(messages: list[Message], tokenizer) -> list[Message]:
    """Copies of ``messages`` with each content ``neutralise``d for ``tokenizer``."""
    special = special_token_pattern(tokenizer)
    return [{**m, "content": _break_special(m["content"], special)} for m in messages]


def preference_text(tokenizer, prompt: list[Message], response: str) -> str:
    """A preference model's input: prompt + response through its chat template, every
    content neutralised for its tokenizer. A policy can spell ``<|im_end|>`` out of ordinary
    tokens; decoded and re-tokenised with special-token parsing it would become the real token
    and end the answer where the policy chose (a reward hack). PPO's model reward and the
    server's reward routes score the same text."""
    conv = neutralise_messages(prompt + [{"role": "assistant", "content": response}], tokenizer)
    return tokenizer.apply_chat_template(conv, tokenize=False)


def _break_special(text: str, special: re.Pattern) -> str:
    if not special.pattern:
        return text
    return special.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


class ChatTemplate:
    """Chat template → token ids, shared by the backends that hold a HF tokenizer.

    A conversation ending with an assistant message is continued (prefill), any other
    gets the generation prompt. The template already has the special tokens."""

    tokenizer: object

    def neutralise(self, text: str) -> str:
        """``neutralise(text, self.tokenizer)``, the pattern built once per engine: every
        engine prompt goes through it (critique and revision prompts, the labeler's
        comparisons, the guardrail)."""
        pattern = getattr(self, "_special_pattern", None)
        if pattern is None:
            pattern = self._special_pattern = special_token_pattern(self.tokenizer)
        return _break_special(text, pattern)

    def _text(self, conv: list[Message]) -> str:
        if not conv:
            raise ValueError("empty conversation")
        conv = [{**m, "content": self.neutralise(m["content"])} for m in conv]
        continue_final = conv[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            list(conv),
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, conv: list[Message]) -> list[int]:
        return self._tokenize(self._text(conv))

    def choice_continuations(self, conv: list[Message], choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """(context ids, each choice's ids after them): the choices as this tokenizer
        continues ``conv``'s templated text, ids(text + choice) past ids(text).

        A choice is never tokenised alone: SentencePiece (Llama-2, Mistral, Gemma) makes "A"
        alone ``▁A``, while after "The answer is: (" the model writes a bare ``A``; scoring
        ``▁A`` would read a token the model never continues with. When a tokenizer merges the
        text's end with a choice ("(" + "A" → "(A"), the context is cut back to the ids every
        choice's tokenization shares, and each choice is scored with the re-tokenized tail:
        P(tail + choice | context), comparable across choices because the context is one.
        The whole text, not its last message alone: only in context is a tokenization sure
        (one more tokenization per choice: +1.6 ms on a 544-token comparison, SmolLM2's)."""
        if len(choices) < 2:
            raise ValueError("choice_logprobs needs at least two choices")
        text = self._text(conv)
        prompt = self._tokenize(text)
        full = [self._tokenize(text + c) for c in choices]
        shared = len(prompt)
        for ids in full:
            shared = next((i for i, (a, b) in enumerate(zip(prompt[:shared], ids)) if a != b), min(shared, len(ids)))
        conts = [ids[shared:] for ids in full]
        if any(not ids for ids in conts):
            raise ValueError(f"a choice tokenizes to nothing: {choices!r}")
        if len({tuple(ids) for ids in conts}) < len(conts):
            raise ValueError(f"two choices tokenize the same: {choices!r}")
        if not shared:
            raise ValueError(f"the choices {choices!r} re-tokenize the whole prompt: nothing to score them after")
        return prompt[:shared], conts

    def token_counts(self, convs: list[list[Message]]) -> list[int]:
        return [len(self._encode(c)) for c in convs]

    def counter(self) -> TokenCounter:
        """Token counting on its own tokenizer copy, so a server can count requests while
        the engine generates on another thread (HF tokenizers are not shared safely)."""
        import copy

        return TokenCounter(copy.deepcopy(self.tokenizer))


class TokenCounter(ChatTemplate):
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def normalise_logprobs(row: Sequence[float]) -> list[float] | Unscored:
    """Log-softmax over a row of unnormalised log-probabilities; Unscored (with the reason)
    when they carry no distribution: a NaN or +inf, or every choice at probability 0. A
    non-finite number never becomes a label."""
    import math

    if any(math.isnan(x) or x == math.inf for x in row):
        return Unscored(f"non-finite choice log-probabilities {[round(x, 4) for x in row]}")
    top = max(row)
    if top == -math.inf:
        return Unscored("every choice has probability 0")
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]
