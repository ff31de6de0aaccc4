"""The reward routes' scoring, without HTTP: many items per request, scored in batches.

(conversation, response[, reference]) or raw text ─► Rewards ─► one float per item (+ why not scored)
    model    the preference model's r(prompt + response): the chat template over the
             conversation and the answer, as `train rm` trained it and PPO's `reward.kind:
             model` scores it; raw text (OpenRLHF's query, vLLM's /classify input) as sent
    labeler  d-RLAIF, as PPO's `reward.kind: labeler`: the labeler's probability that the
             response is better than a reference answer (both orders, the method's
             principles); the item's reference, else the served policy's greedy answer.
             A comparison longer than the labeler's context is not scored: 0.5 (no
             preference, as PPO gives it), with the reason in ``invalid``
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

from cai_ray.core.context import context_overflow
from cai_ray.engine import Sampling, preference_text
from cai_ray.serve.config import ServeReward
from cai_ray.serve.service import RequestError, pair_key

NO_PREFERENCE = 0.5  # a comparison the labeler could not score: the answer neither gains nor loses
REFERENCE_CACHE = 4096  # reference answers kept (one per prompt conversation), oldest dropped first


@dataclass
class RewardItem:
    """One response to score: its prompt ``messages`` (ending with a user turn), the
    ``response`` text, and an optional ``reference`` answer (labeler scorer only)."""

    messages: list[dict]
    response: str
    reference: str | None = None


class PreferenceModel:
    """A `cai-ray train rm` folder (AutoModelForSequenceClassification, one output), float32,
    on the replica's GPU when it has one, else the CPU. Not thread-safe: callers hold ``lock``."""

    def __init__(self, name: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from cai_ray.models import resolve_model

        path = resolve_model(name)
        self.name = name
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.requires_grad_(False).to(self.device).eval()
        self.context_length = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.label = (getattr(model.config, "id2label", None) or {}).get(0, "LABEL_0")
        self.lock = threading.Lock()

    def text(self, messages: list[dict], response: str) -> str:
        """prompt + response as PPO's model reward scores it (``engine.preference_text``)."""
        return preference_text(self.tokenizer, messages, response)

    def token_counts(self, texts: list[str], add_special_tokens: bool) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [len(ids) for ids in enc]

    def score(self, texts: list[str], add_special_tokens: bool) -> list[float]:
        """r(text) for one batch: the head's output at each text's last token."""
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, 0]
        return logits.float().tolist()


class Rewards:
    """Scores for the reward routes, on ``service``'s engines (its labeler, its policy for
    reference answers) and the preference model of ``settings.model`` (loaded here)."""

    def __init__(self, service, settings: ServeReward):
        self.service = service
        self.settings = settings
        self.model = PreferenceModel(settings.model) if settings.model else None
        self._references: dict[str, str] = {}
        tokenizer = getattr(service.policy, "tokenizer", None)
        self._policy_tokenizer = tokenizer
        self._shell = _user_turn_shell(tokenizer)

    def scored_by(self, scorer: str) -> str:
        return self.model.name if scorer == "model" else self.service.labeler_name

    # -- the preference model --------------------------------------------------------------
    async def by_model(self, texts: list[str], add_special_tokens: bool = False) -> tuple[list[float], list[int]]:
        """r(text) for every text, in batches of ``batch_size``, and each text's token count.
        A text longer than the preference model's context is the request's 400, naming it."""
        pm = self.model
        if not texts:
            return [], []

        def run() -> tuple[list[float], list[int]]:
            with pm.lock:
                counts = pm.token_counts(texts, add_special_tokens)
                for i, n in enumerate(counts):
                    why = context_overflow("the preference model", n, 0, pm.context_length)
                    if why:
                        raise RequestError(f"item {i}: {why}")
                scores: list[float] = []
                for start in range(0, len(texts), self.settings.batch_size):
                    scores += pm.score(texts[start : start + self.settings.batch_size], add_special_tokens)
                return scores, counts

        try:
            return await asyncio.to_thread(run)
        except RequestError:
            raise
        except Exception as e:
            raise await self.service.failure(e) from e

    def model_text(self, item: RewardItem) -> str:
        return self.model.text(item.messages, item.response)

    # -- the labeler (d-RLAIF) -------------------------------------------------------------
    async def by_labeler(self, items: list[RewardItem]) -> tuple[list[float], list[str | None]]:
        """P(response better than its reference) per item; ``invalid[i]`` says why item i got
        NO_PREFERENCE instead (its comparison does not fit the labeler's context)."""
        svc = self.service
        if not items:
            return [], []
        refs = await self.references(items)
        pair_ids = [pair_key(it.messages, it.response, ref) for it, ref in zip(items, refs)]
        invalid = [
            await svc.label_overflow(pid, it.messages, it.response, ref, None)
            for pid, it, ref in zip(pair_ids, items, refs)
        ]
        scores = [NO_PREFERENCE] * len(items)
        todo = [i for i, why in enumerate(invalid) if why is None]
        step = self.settings.batch_size
        for start in range(0, len(todo), step):
            idx = todo[start : start + step]
            try:
                labels = await svc._run(
                    svc.labeler.label,
                    [pair_ids[i] for i in idx],
                    [items[i].messages for i in idx],
                    [items[i].response for i in idx],
                    [refs[i] for i in idx],
                )
            except Exception as e:
                raise await svc.failure(e) from e
            for i, lab in zip(idx, labels):
                if lab.p_a is None:
                    invalid[i] = lab.invalid or "the labeler could not score this comparison"
                else:
                    scores[i] = lab.p_a
        return scores, invalid

    async def references(self, items: list[RewardItem]) -> list[str]:
        """Each item's reference answer: its own, else the served policy's greedy answer to its
        prompt (``reference_max_tokens``, at most ``limits.max_tokens``), generated once per prompt
        and kept."""
        keys = [json.dumps(it.messages, sort_keys=True) for it in items]
        missing = {k: it.messages for k, it in zip(keys, items) if not it.reference and k not in self._references}
        if missing:
            svc = self.service
            budget = min(self.settings.reference_max_tokens, svc.settings.limits.max_tokens)
            convs = list(missing.values())
            counts = await svc.count_tokens(convs)
            for conv, n in zip(convs, counts):
                why = context_overflow(
                    "the policy (a reference answer for the labeler)", n, budget, svc.policy.context_length
                )
                if why:
                    i = keys.index(json.dumps(conv, sort_keys=True))
                    raise RequestError(f"item {i}: {why}; or give the item a reference answer")
            greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=budget, seed=svc.settings.seed)
            texts = await asyncio.gather(*(svc.generate(conv, greedy) for conv in convs))
            for k, text in zip(missing, texts):
                while len(self._references) >= REFERENCE_CACHE:
                    del self._references[next(iter(self._references))]
                self._references[k] = text
        return [it.reference or self._references[k] for it, k in zip(items, keys)]

    # -- OpenRLHF's strings ----------------------------------------------------------------
    def openrlhf_item(self, prompt: str, response: str, label: str | None) -> RewardItem:
        """OpenRLHF's prompt string and the rest of its query as a conversation and an answer.
        With ``--data.apply_chat_template`` the prompt is one user turn in the policy's chat
        template plus the generation prompt: when the served policy has the same template,
        the user's text is what lies inside it; otherwise the whole string is the user's
        turn. The query was decoded with special tokens: a trailing end-of-turn token goes."""
        head, tail = self._shell or ("", "")
        if self._shell and prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head + tail):
            prompt = prompt[len(head) : len(prompt) - len(tail)]
        end = getattr(self._policy_tokenizer, "eos_token", None)
        response = response.rstrip()
        while end and response.endswith(end):
            response = response[: -len(end)].rstrip()
        return RewardItem([{"role": "user", "content": prompt}], response, label or None)


def _user_turn_shell(tokenizer) -> tuple[str, str] | None:
    """(what the chat template puts before a lone user message, what after it, generation
    prompt included), or None without a tokenizer or template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00cai-ray-user-turn\x00"
    try:
        shell = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn: no unwrapping
        return None
    head, found, tail = shell.partition(marker)
    return (head, tail) if found else None
