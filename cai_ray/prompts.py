"""Pure functions that build chat messages for the stages. No model, no tokenizer.

The SL-CAI exchange is the paper's dialogue written as chat turns:

    user: <prompt>                 assistant: <response>
    user: <critique request>       assistant: <critique>
    user: <revision request>       assistant: <revision>

Few-shot examples are whole exchanges of that shape placed before the real one. Each
round is rebuilt from (prompt, latest response), so the context does not grow with the
number of revisions.
"""

from __future__ import annotations

from typing import Sequence

from cai_ray.constitution import Constitution, CritiqueExample, Principle
from cai_ray.engine import Message

# Appended to a revision request when there is no critique (direct revision mode).
DIRECT_REVISION_NOTE = "Reply with the rewritten response only."


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def answer_messages(prompt: list[Message]) -> list[Message]:
    """The red-team conversation itself; the model answers its last user turn."""
    return list(prompt)


def _example_turns(
    ex: CritiqueExample, constitution: Constitution, with_critique: bool
) -> list[Message]:
    p = constitution.principle(ex.principle)
    turns = [user(ex.prompt), assistant(ex.response)]
    if with_critique:
        turns += [user(p.critique_request), assistant(ex.critique), user(p.revision_request)]
    else:
        turns += [user(f"{p.revision_request} {DIRECT_REVISION_NOTE}")]
    turns.append(assistant(ex.revision))
    return turns


def few_shot_turns(
    constitution: Constitution, n: int | None, with_critique: bool = True
) -> list[Message]:
    """The first ``n`` critique/revision examples (all when ``n`` is None) as chat turns."""
    examples: Sequence[CritiqueExample] = constitution.critique_examples
    if n is not None:
        examples = examples[:n]
    turns: list[Message] = []
    for ex in examples:
        turns += _example_turns(ex, constitution, with_critique)
    return turns


def _split_system(prompt: list[Message]) -> tuple[list[Message], list[Message]]:
    """Leading system messages stay first, ahead of the few-shot turns."""
    i = 0
    while i < len(prompt) and prompt[i]["role"] == "system":
        i += 1
    return prompt[:i], prompt[i:]


def critique_messages(
    shots: list[Message], prompt: list[Message], response: str, principle: Principle
) -> list[Message]:
    system, rest = _split_system(prompt)
    return [*system, *shots, *rest, assistant(response), user(principle.critique_request)]


def revision_messages(
    shots: list[Message],
    prompt: list[Message],
    response: str,
    principle: Principle,
    critique: str | None,
) -> list[Message]:
    """Ask for a revision; with ``critique=None`` this is direct revision (no critique)."""
    system, rest = _split_system(prompt)
    if critique is None:
        return [
            *system,
            *shots,
            *rest,
            assistant(response),
            user(f"{principle.revision_request} {DIRECT_REVISION_NOTE}"),
        ]
    return [
        *system,
        *shots,
        *rest,
        assistant(response),
        user(principle.critique_request),
        assistant(critique),
        user(principle.revision_request),
    ]
