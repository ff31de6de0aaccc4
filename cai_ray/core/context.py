"""Does a prompt fit the model's context? One rule and one reason for every step and route
(generate, label, eval, serve): the prompt's tokens and every token still to be generated
after it must fit in the engine's context, so a prompt of exactly context length minus
budget fits and one token more does not."""

from __future__ import annotations


def context_overflow(who: str, prompt_tokens: int, budget: int, context_length: int | None) -> str | None:
    """None when ``prompt_tokens`` + ``budget`` (the tokens to generate after the prompt) <=
    ``context_length``, else the reason, naming ``who`` ("the model", "the labeler (principle
    'honesty', order AB)"). A context length of None or 0 is unknown: everything fits."""
    if context_length and prompt_tokens + budget > context_length:
        return (
            f"too long for {who}: {prompt_tokens} prompt tokens + {budget} to generate "
            f"> context length {context_length}"
        )
    return None
