"""A client of `cai-ray serve`'s reward route (POST /v1/reward), for trainers in other
frameworks. Needs only httpx; imports nothing else of cai_ray, so a trainer's image needs this
one file.

TRL (GRPOTrainer, RLOOTrainer ``reward_funcs``)::

    from cai_ray.reward_client import RewardClient
    reward = RewardClient("http://127.0.0.1:8000")            # key from $CAI_RAY_API_KEY
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], ...)

    reward(prompts, completions, **kwargs) -> list[float]: prompts and completions as TRL passes
    them, plain strings or conversations (lists of {"role", "content"}); a dataset column named
    ``reference`` (TRL passes every column as a keyword) is each item's reference answer for
    the labeler scorer.

verl (``custom_reward_function``; docs/serving.md)::

    custom_reward_function.path=$(python -c 'import cai_ray.reward_client as m; print(m.__file__)')
    custom_reward_function.name=verl_compute_score            # the reward loop: one item per call
    +custom_reward_function.reward_kwargs.base_url=http://HOST:8000

Errors: a 4xx is the request's fault and raises ``RewardServiceError`` with the server's reason
at once; connection errors, 408, 429, 502, 503 and 504 are retried with backoff (a 503's
Retry-After is honoured), ``retries`` times.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import httpx

RETRIED = frozenset({408, 429, 502, 503, 504})
MAX_WAIT_S = 30.0


class RewardServiceError(RuntimeError):
    """The reward server refused a request (its reason in the message) or could not be reached."""


class RewardClient:
    """Scores (prompt, completion) pairs on a `cai-ray serve` server, ``batch_size`` items per
    request. Callable as a TRL reward function; TRL logs it under ``__name__``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        api_key_env: str = "CAI_RAY_API_KEY",
        scorer: str | None = None,
        batch_size: int = 64,
        timeout_s: float = 300.0,
        retries: int = 3,
        reference_column: str = "reference",
        name: str | None = None,
    ):
        """``api_key``: default ``$api_key_env`` (None: no Authorization header). ``scorer``:
        model | labeler | None (the server's default). ``batch_size``: items per request (the
        server's ``reward.max_items`` is the most it takes)."""
        if batch_size < 1 or retries < 0:
            raise ValueError("batch_size must be >= 1 and retries >= 0")
        if scorer not in (None, "model", "labeler"):
            raise ValueError(f"scorer: model, labeler or None (the server's default), got {scorer!r}")
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/reward"
        self.api_key = api_key if api_key is not None else (os.environ.get(api_key_env) or None)
        self.scorer = scorer
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.retries = retries
        self.reference_column = reference_column
        self.__name__ = name or f"cai_ray_{scorer or 'reward'}"
        self._http: httpx.Client | None = None

    # TRL may pickle reward functions (e.g. to other processes): the connection pool stays behind
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_http": None}

    def __repr__(self) -> str:
        return f"RewardClient({self.url!r}, scorer={self.scorer!r}, batch_size={self.batch_size})"

    # -- TRL ---------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        """TRL's reward function: one float per completion. Also takes ``completion_ids``,
        ``trainer_state`` and the dataset's other columns (ignored, but ``reference_column``);
        reports the share of comparisons the labeler could not score through TRL's
        ``log_metric`` when it is given."""
        references = kwargs.get(self.reference_column)
        scores, invalid = self.score(prompts, [completion_text(c) for c in completions], references)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and scores:
            log_metric(f"{self.__name__}/unscored", sum(x is not None for x in invalid) / len(scores))
        return scores

    # -- the route ---------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence,
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> tuple[list[float], list[str | None]]:
        """(scores, invalid) for the items, in order: ``prompts`` strings or conversations,
        ``responses`` strings, ``references`` optional answers to beat (labeler scorer).
        ``invalid[i]`` says why item i got the labeler's no-preference 0.5 instead of a score."""
        if len(prompts) != len(responses) or (references is not None and len(references) != len(responses)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses)} responses"
                + (f", {len(references)} references" if references is not None else "")
                + ": give one of each per item"
            )
        items = [
            reward_item(p, r, references[i] if references is not None else None)
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        scores: list[float] = []
        invalid: list[str | None] = []
        for start in range(0, len(items), self.batch_size):
            body: dict[str, Any] = {"items": items[start : start + self.batch_size]}
            if self.scorer:
                body["scorer"] = self.scorer
            got = self._post(body)
            scores += [float(s) for s in got["scores"]]
            invalid += got["invalid"]
        return scores, invalid

    def _post(self, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._client().post(self.url, json=body, headers=headers)
            except httpx.TransportError as e:
                if last:
                    raise RewardServiceError(f"{self.url}: {type(e).__name__}: {e}") from e
                time.sleep(min(2.0**attempt, MAX_WAIT_S))
                continue
            if r.status_code == 200:
                return r.json()
            reason = _reason(r)
            if r.status_code not in RETRIED or last:
                raise RewardServiceError(f"{self.url}: HTTP {r.status_code}: {reason}")
            wait = r.headers.get("retry-after", "")
            time.sleep(min(float(wait) if wait.isdigit() else 2.0**attempt, MAX_WAIT_S))
        raise AssertionError("unreachable")

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout_s)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def _reason(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


def text_of(content: Any) -> str:
    """A message's content as text: a string, None (a tool call: no text), or a list of parts
    (TRL's multimodal form) whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


def completion_text(completion: Any) -> str:
    """TRL's completion as the response text: a string as it is; a conversation (TRL's
    ``[{"role": "assistant", "content": ...}]``, with tools several messages) as its assistant
    messages' text."""
    if isinstance(completion, str):
        return completion
    return "".join(text_of(m.get("content")) for m in completion if m.get("role") == "assistant")


def reward_item(prompt: Any, response: str, reference: str | None = None) -> dict:
    """One /v1/reward item: a string prompt is the user's turn; a conversation is sent as
    ``messages`` (system, user and assistant turns; the server refuses others with the reason)."""
    item: dict[str, Any] = {"response": response}
    if isinstance(prompt, str):
        item["prompt"] = prompt
    else:
        item["messages"] = [{"role": str(m["role"]), "content": text_of(m.get("content"))} for m in prompt]
    if reference:
        item["reference"] = str(reference)
    return item


# -- verl ------------------------------------------------------------------------------------
_CLIENTS: dict[tuple, RewardClient] = {}


def _verl_client(base_url: str | None, scorer: str | None, api_key_env: str, timeout_s: float) -> RewardClient:
    """One client per process and setting (verl calls the function once per item)."""
    url = base_url or os.environ.get("CAI_RAY_REWARD_URL")
    if not url:
        raise ValueError("give reward_kwargs.base_url (or set CAI_RAY_REWARD_URL): the cai-ray server's address")
    key = (url, scorer, api_key_env, timeout_s)
    if key not in _CLIENTS:
        _CLIENTS[key] = RewardClient(url, api_key_env=api_key_env, scorer=scorer, timeout_s=timeout_s)
    return _CLIENTS[key]


def _verl_prompt(extra_info: Any, prompt_key: str | None) -> Any:
    """The prompt of a verl row: verl hands a reward function the response, the ground truth
    and ``extra_info``, not the prompt; a dataset puts it in ``extra_info`` ("prompt": text or
    messages; gsm8k's preprocessing already stores "question")."""
    keys = [prompt_key] if prompt_key else ["prompt", "question"]
    for k in keys:
        value = (extra_info or {}).get(k)
        if value is not None and len(value):
            return value if isinstance(value, str) else [dict(m) for m in value]  # parquet: numpy arrays
    raise ValueError(f"extra_info has no prompt (looked for {keys}): put the row's prompt there in preprocessing")


def verl_compute_score_batch(
    data_sources: Sequence,
    solution_strs: Sequence[str],
    ground_truths: Sequence,
    extra_infos: Sequence,
    *,
    base_url: str | None = None,
    scorer: str | None = None,
    api_key_env: str = "CAI_RAY_API_KEY",
    prompt_key: str | None = None,
    timeout_s: float = 300.0,
    **_: Any,
) -> list[dict]:
    """verl's BatchRewardManager function (``reward_model.reward_manager=batch``): one
    ``{"score", "cai_unscored"}`` per response (verl logs every key). A non-empty string
    ground truth is the labeler's reference answer; otherwise the server's policy answers."""
    client = _verl_client(base_url, scorer, api_key_env, timeout_s)
    prompts = [_verl_prompt(e, prompt_key) for e in extra_infos]
    refs = [g if isinstance(g, str) and g else None for g in ground_truths]
    scores, invalid = client.score(prompts, list(solution_strs), refs)
    return [{"score": s, "cai_unscored": float(x is not None)} for s, x in zip(scores, invalid)]


def verl_compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict:
    """verl's reward-loop function (one item per call; ``reward_router_address`` and
    ``reward_model_tokenizer``, passed when verl runs its own reward model, are ignored)."""
    [out] = verl_compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)
    return out
