"""The constitutional-classifier guard of ``cai-ray serve`` (``guard: classifier``).

    prompt ─► input classifier P(input_text) >= t_in ? ─► the constitution's refusal, nothing generated
          └─► generate ─► every N tokens: output classifier P(output_text(prefix)) >= t_out ?
                              ─► stop; the answer becomes the refusal (a stream keeps what it
                                 released: only text whose check passed)

The classifiers are a ``cai-ray classifiers`` OUTPUT folder: ``guard.json`` names the two
models (paths relative to the folder) and the thresholds chosen on held-out data; the texts
they score are ``core.classify.input_text`` / ``output_text``, as they were trained on.

"Every N tokens" is counted with the policy's tokenizer on the answer text, and the checked
prefixes end at token ends (``token_ends``): a streamed answer (vLLM) and a whole one (hf,
the guardrail) are checked at the same prefixes, so a client sees the same cut either way.
A stream holds back the tail that has not been checked yet (``screen``).

Every request's decision is one JSON line in the guard log (``record``); a refusal is also
logged at INFO in the server log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cai_ray.core.classify import input_text, output_text

log = logging.getLogger(__name__)
GUARD_FILE = "guard.json"
LOG_NAME = "cai_guard.jsonl"


class GuardSpecError(ValueError):
    """guard.json is missing or wrong: every problem, one per line, naming the file and key."""


class GuardFailure(RuntimeError):
    """A classifier raised on this request: it is not answered (the guard fails closed); the
    other requests and the replica go on. ``__cause__`` is the classifier's exception."""


# -- guard.json ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierSpec:
    model: str  # an absolute model folder
    threshold: float  # flag at P(violation) >= threshold
    target_recall: float | None = None  # the recall the threshold was chosen for (held-out data)


@dataclass(frozen=True)
class GuardSpec:
    folder: str
    input: ClassifierSpec
    output: ClassifierSpec
    constitution: dict[str, Any] = field(default_factory=dict)  # {name, sha256} the classifiers learned


def _probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def read_guard_spec(folder: str | Path) -> GuardSpec:
    """The classifiers of a ``cai-ray classifiers`` OUTPUT folder, checked: guard.json is a
    mapping with ``input`` and ``output`` (each a ``model`` folder holding config.json, a
    ``threshold`` in [0, 1], optionally ``target_recall``) and optionally ``constitution``."""
    folder = Path(folder).expanduser().resolve()
    path = folder / GUARD_FILE
    if not folder.is_dir():
        raise GuardSpecError(f"{folder}: no such folder (the guard needs a `cai-ray classifiers` OUTPUT folder)")
    if not path.is_file():
        raise GuardSpecError(f"{path}: not found; is {folder} a `cai-ray classifiers` OUTPUT folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GuardSpecError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise GuardSpecError(f"{path}: must be a JSON object with 'input' and 'output', got {type(raw).__name__}")
    errors: list[str] = []
    for key in sorted(set(raw) - {"input", "output", "constitution"}):
        errors.append(f"{path}: unknown key {key!r} (allowed: constitution, input, output)")
    specs: dict[str, ClassifierSpec] = {}
    for kind in ("input", "output"):
        entry = raw.get(kind)
        if not isinstance(entry, dict):
            errors.append(f"{path}: {kind!r}: must be an object with 'model' and 'threshold', got {entry!r}")
            continue
        problems = [
            f"{path}: {kind}: unknown key {k!r}" for k in sorted(set(entry) - {"model", "threshold", "target_recall"})
        ]
        model, threshold, recall = entry.get("model"), entry.get("threshold"), entry.get("target_recall")
        if not isinstance(model, str) or not model.strip():
            problems.append(f"{path}: {kind}.model: must be a model folder (relative to {folder}), got {model!r}")
        else:
            resolved = (folder / model).resolve()
            if not (resolved / "config.json").is_file():
                problems.append(f"{path}: {kind}.model: {resolved} is not a model folder (no config.json)")
        if not _probability(threshold):
            problems.append(f"{path}: {kind}.threshold: must be a number in [0, 1], got {threshold!r}")
        if recall is not None and not _probability(recall):
            problems.append(f"{path}: {kind}.target_recall: must be a number in [0, 1], got {recall!r}")
        errors += problems
        if not problems:
            specs[kind] = ClassifierSpec(str(resolved), float(threshold), None if recall is None else float(recall))
    constitution = raw.get("constitution", {})
    if not isinstance(constitution, dict):
        errors.append(f"{path}: 'constitution': must be an object (name, sha256), got {constitution!r}")
    if errors:
        raise GuardSpecError("\n".join(errors))
    return GuardSpec(str(folder), specs["input"], specs["output"], dict(constitution))


# -- where an answer is checked (pure) ----------------------------------------------------------
def check_points(n_tokens: int, every: int) -> list[int]:
    """Token counts at which an answer of ``n_tokens`` tokens is checked: every ``every``
    tokens, then the whole answer (an empty answer is checked once, at 0)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    points = list(range(every, n_tokens, every))
    return points + [n_tokens]


def first_flagged(scores: Sequence[float], threshold: float) -> int | None:
    """Index of the first score at or over the threshold, or None."""
    return next((i for i, s in enumerate(scores) if s >= threshold), None)


def token_ends(tokenizer, text: str) -> list[int]:
    """The character offset where each of ``text``'s tokens ends (its prefix of k tokens is
    ``text[:ends[k - 1]]``). Fast tokenizers give offsets; others are decoded token by token."""
    if not text:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    # offsets never go back, and the last token ends the text (trailing spaces included)
    out, high = [], 0
    for e in ends:
        high = max(high, min(e, len(text)))
        out.append(high)
    if out:
        out[-1] = len(text)
    return out


def prefixes_at(text: str, ends: list[int], points: Sequence[int]) -> list[str]:
    """``text`` cut after each point's token (the whole text at or past its last token)."""
    return [text if k >= len(ends) else text[: ends[k - 1]] if k > 0 else "" for k in points]


# -- a decision ---------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What the guard decided for one request: where (``stage``), whether it refused, the
    deciding score (the flagging one; when passed, the highest seen at that stage) and
    threshold; the output checks as [tokens, score]; for a cut answer the longest prefix
    that passed (what a stream had released)."""

    stage: str  # "input" | "output"
    refused: bool
    score: float | None
    threshold: float
    input_score: float | None = None
    input_threshold: float | None = None
    tokens_checked: int = 0
    checks: list[list[float]] = field(default_factory=list)
    clean_text: str = ""
    error: str | None = None
    ms: dict[str, float] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return "error" if self.error else "refused" if self.refused else "passed"

    def body(self) -> dict[str, Any]:
        """The response's ``cai_guard`` field."""
        return {
            "decision": self.decision,
            "stage": self.stage,
            "score": _round(self.score),
            "threshold": self.threshold,
            "tokens_checked": self.tokens_checked,
            "input_score": _round(self.input_score),
            "checks": len(self.checks),
            **({"error": self.error} if self.error else {}),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


# -- the guard ------------------------------------------------------------------------------------
class Guard:
    """A replica's two classifiers (anything with ``scores(texts) -> [P(violation)]``; in
    serving ``engine.classifier.TextClassifier``, see ``load_guard``) and the decisions they
    make. ``tokenizer`` counts "every N tokens": the policy's (a copy this guard owns)."""

    def __init__(
        self,
        input_classifier,
        output_classifier,
        input_threshold: float,
        output_threshold: float,
        refusal: str,
        tokenizer,
        every_tokens: int = 16,
        log_path: str | None = None,
    ):
        self.input, self.output = input_classifier, output_classifier
        self.input_threshold, self.output_threshold = input_threshold, output_threshold
        self.refusal = refusal
        self.tokenizer = tokenizer
        self.every = every_tokens
        # a HF tokenizer is not safe to share between threads ("Already borrowed"), nor is one
        # model's forward: one classifier call at a time per replica. Counting tokens has its
        # own lock, so a stream's pieces do not wait behind other requests' classifications,
        # unless the counting tokenizer is a classifier's own (load_guard's fallback): then
        # the two share one lock
        self._lock = threading.Lock()
        shared = tokenizer is getattr(input_classifier, "tok", None) or tokenizer is getattr(
            output_classifier, "tok", None
        )
        self._count_lock = self._lock if shared else threading.Lock()
        self._log_lock = threading.Lock()
        self.log_path = log_path
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)

    # -- scoring (in a thread: the event loop keeps serving) ---------------------------------------
    def _score(self, which, texts: list[str]) -> list[float]:
        with self._lock:
            return which.scores(texts)

    def _ends(self, text: str) -> list[int]:
        with self._count_lock:
            return token_ends(self.tokenizer, text)

    async def _scored(self, stage: str, which, texts: list[str]) -> list[float]:
        try:
            return await asyncio.to_thread(self._score, which, texts)
        except Exception as e:
            raise GuardFailure(
                f"the guard's {stage} classifier failed on this request ({type(e).__name__}: {e}); it was not answered"
            ) from e

    # -- the checks ---------------------------------------------------------------------------------
    async def check_input(self, messages: list[dict]) -> Verdict:
        """The prompt, before anything is generated."""
        t0 = time.perf_counter()
        [score] = await self._scored("input", self.input, [input_text(messages)])
        t = self.input_threshold
        return Verdict(
            "input",
            score >= t,
            score,
            t,
            input_score=score,
            input_threshold=t,
            ms={"input": (time.perf_counter() - t0) * 1e3},
        )

    def _after_input(self, first: Verdict | None) -> Verdict:
        out = Verdict("output", False, None, self.output_threshold)
        if first is not None:
            out.input_score, out.input_threshold, out.ms = first.input_score, first.input_threshold, dict(first.ms)
        return out

    async def check_answer(
        self, messages: list[dict], answer: str, first: Verdict | None = None, head: str = ""
    ) -> Verdict:
        """A whole answer (hf, the guardrail's revision), checked at the prefixes a stream of
        it would be: all scored in one classifier call, the first flagged one decides.
        ``head``: an assistant message the answer continues (continue_final_message)."""
        t0 = time.perf_counter()
        v = self._after_input(first)
        try:
            ends = await asyncio.to_thread(self._ends, answer)
        except Exception as e:
            raise GuardFailure(f"the guard could not count this answer's tokens ({type(e).__name__}: {e})") from e
        points = check_points(len(ends), self.every)
        prefixes = prefixes_at(answer, ends, points)
        scores = await self._scored("output", self.output, [output_text(messages, head + p) for p in prefixes])
        at = first_flagged(scores, self.output_threshold)
        upto = len(scores) if at is None else at + 1
        v.checks = [[k, s] for k, s in zip(points[:upto], scores[:upto])]
        v.refused = at is not None
        v.score = scores[at] if at is not None else max(scores)
        v.tokens_checked = points[upto - 1]
        v.clean_text = answer if at is None else prefixes[at - 1] if at > 0 else ""
        v.ms["output"] = (time.perf_counter() - t0) * 1e3
        return v

    async def screen(
        self, messages: list[dict], pieces: AsyncIterator[str], first: Verdict | None = None, head: str = ""
    ) -> AsyncIterator[str | Verdict]:
        """A streamed answer, checked as it arrives: yields text only once a check covering it
        has passed, and last the Verdict. At the first flagged prefix the engine's stream is
        closed (vLLM aborts the request) and nothing past the last clean prefix is released."""
        v = self._after_input(first)
        text, released, next_k = "", 0, self.every
        ends: list[int] = []  # the answer's token ends so far (an empty answer has none)
        busy = 0.0
        try:
            async for piece in pieces:
                text += piece
                t0 = time.perf_counter()
                ends = await asyncio.to_thread(self._ends, text)
                due = []
                while next_k < len(ends):  # token next_k is whole: another one follows it
                    due.append(next_k)
                    next_k += self.every
                if not due:
                    busy += time.perf_counter() - t0
                    continue
                prefixes = prefixes_at(text, ends, due)
                got = await self._scored("output", self.output, [output_text(messages, head + p) for p in prefixes])
                busy += time.perf_counter() - t0
                for k, p, s in zip(due, prefixes, got):
                    v.checks.append([k, s])
                    v.tokens_checked = k
                    if s >= self.output_threshold:
                        v.refused, v.score, v.clean_text = True, s, text[:released]
                        v.ms["output"] = busy * 1e3
                        yield v
                        return
                    if len(p) > released:
                        yield text[released : len(p)]
                        released = len(p)
            # the whole answer (its tokens were counted after the last piece)
            t0 = time.perf_counter()
            [s] = await self._scored("output", self.output, [output_text(messages, head + text)])
            busy += time.perf_counter() - t0
            v.checks.append([len(ends), s])
            v.tokens_checked = len(ends)
            v.ms["output"] = busy * 1e3
            if s >= self.output_threshold:
                v.refused, v.score, v.clean_text = True, s, text[:released]
            else:
                v.score, v.clean_text = max(s for _, s in v.checks), text
                if len(text) > released:
                    yield text[released:]
            yield v
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()

    # -- the decision log ---------------------------------------------------------------------------
    def record_failure(self, request_id: str, stage: str, error: Exception, **extra: Any) -> dict[str, Any]:
        """``record`` a request a classifier failed on at ``stage`` (it was not answered)."""
        threshold = self.input_threshold if stage == "input" else self.output_threshold
        v = Verdict(stage, False, None, threshold, error=str(error))
        return self.record(request_id, v, **extra)

    def record(self, request_id: str, v: Verdict, **extra: Any) -> dict[str, Any]:
        """One JSON line per request in the guard log (every decision, with its scores); a
        refusal or an error also in the server log."""
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "decision": v.decision,
            "stage": v.stage,
            "score": _round(v.score),
            "threshold": v.threshold,
            "tokens_checked": v.tokens_checked,
            "input": {"score": _round(v.input_score), "threshold": v.input_threshold},
            "output": (
                {"threshold": self.output_threshold, "checks": [[int(k), _round(s)] for k, s in v.checks]}
                if v.stage == "output"
                else None
            ),
            "ms": {k: round(x, 2) for k, x in v.ms.items()},
            **({"error": v.error} if v.error else {}),
            **extra,
        }
        if v.error:
            log.warning("guard: request %s not answered: %s", request_id, v.error)
        elif v.refused:
            log.info(
                "guard refused request %s at the %s: score %.3f >= %.3f (%d answer tokens checked)",
                request_id,
                v.stage,
                v.score,
                v.threshold,
                v.tokens_checked,
            )
        if self.log_path:
            data = (json.dumps(line) + "\n").encode()
            with self._log_lock:
                # one write of one line with O_APPEND: replicas on one node share the file
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        return line


def default_log_path() -> str | None:
    """cai_guard.jsonl in Ray Serve's log folder of this node (where the replica logs are), or
    None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve._private.logging_utils import get_serve_logs_dir

        return os.path.join(get_serve_logs_dir(), LOG_NAME)
    except Exception:  # noqa: BLE001 - a private Ray helper: without it, the server log only
        return None


def load_guard(section, constitution, tokenizer=None) -> Guard:
    """The guard of a ``ServeClassifier`` section (its classifiers loaded here, on the
    replica's GPU if it has one), answering with ``constitution``'s refusal; ``tokenizer``
    None: the output classifier's counts the tokens."""
    from cai_ray.engine.classifier import TextClassifier

    spec = read_guard_spec(section.path)
    want = spec.constitution.get("sha256")
    if want and want != constitution.sha256:
        log.warning(
            "guard: the classifiers in %s learned constitution %s (sha256 %s…); this server serves %s (%s…)",
            spec.folder,
            spec.constitution.get("name"),
            str(want)[:12],
            constitution.name,
            constitution.sha256[:12],
        )
    device = section.device or None
    inp = TextClassifier(spec.input.model, device=device, max_length=section.max_length)
    # one model folder for both: loaded once
    same = spec.output.model == spec.input.model
    out = inp if same else TextClassifier(spec.output.model, device=device, max_length=section.max_length)
    t_in = spec.input.threshold if section.input_threshold is None else section.input_threshold
    t_out = spec.output.threshold if section.output_threshold is None else section.output_threshold
    log_path = section.log or default_log_path()
    log.info(
        "guard: input classifier %s (threshold %.3f), output classifier %s (threshold %.3f) every %d tokens, "
        "on %s; decisions to %s",
        spec.input.model,
        t_in,
        spec.output.model,
        t_out,
        section.every_tokens,
        inp.device,
        log_path or "the server log only",
    )
    return Guard(
        inp,
        out,
        t_in,
        t_out,
        constitution.refusal,
        tokenizer if tokenizer is not None else out.tok,
        every_tokens=section.every_tokens,
        log_path=log_path,
    )
