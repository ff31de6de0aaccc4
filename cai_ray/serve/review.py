"""`cai-ray review OUTPUT`: a page where people label the pairs the AI labeler is least sure of.

    cai-ray review out/label                       # http://127.0.0.1:8900/, key from $CAI_RAY_API_KEY

Reads OUTPUT/review/queue.jsonl (written by `cai-ray label`), appends every decision to
OUTPUT/review/labels.jsonl (core/review.py's LabelLog: flushed and fsynced before the reply, so a
browser or server that stops loses nothing; a restarted server reads the file back) and logs
to OUTPUT/review/server.log.

Auth, as `cai-ray serve` has it: every route but `/` (the page) and `/healthz` needs the key,
as ``Authorization: Bearer KEY`` or HTTP Basic with the key as the password. The reviewer is
the Basic user name — a browser asks for both when the page's first API call is answered
401 with a Basic challenge — or, for Bearer clients, the ``reviewer`` query or JSON field.

    GET  /api/next?reviewer=R[&second=1]   the queue row R should label next, or {"done": true}
    POST /api/label {pair_id, label}      label a|b|tie|skip; 400 on a bad label or pair_id
    POST /api/undo                        withdraw R's latest standing label; returns that pair
    GET  /api/progress?reviewer=R         {labelled (by anyone), total, mine, skipped, second}

Leases: a pair handed to R is R's for ``lease_minutes`` (renewed each time R asks again), so
two reviewers never get the same unlabelled pair at once. Held in memory: a restart frees them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from cai_ray.core.review import LABELS, LabelLog, read_events, read_queue, review_dir, standing
from cai_ray.serve.api import UNAUTHORISED, RequestGuard, error, key_digest, key_ok, read_api_key

log = logging.getLogger("cai_ray.serve.review")

OPEN_PATHS = frozenset({"/", "/healthz"})
# Basic, not Bearer: a browser answers this challenge with a sign-in dialog, and then sends the
# credentials itself on every later call to this origin — the page never holds the key.
CHALLENGE = [(b"www-authenticate", b'Basic realm="cai-ray review", charset="UTF-8"')]
WHO = "who is reviewing? give your name as the Basic user name, or a reviewer field with a Bearer key"
MAX_BODY_BYTES = 64 * 1024
MAX_NAME = 64


class ReviewError(ValueError):
    """A request the reviewer can fix (a 400 naming the problem)."""


class ReviewState:
    """The queue, the label events and the leases of one OUTPUT; every method is safe to call
    from the server's worker threads at once.

    A pair is *labelled* when some reviewer's standing label of it is a, b or tie (a skip only
    takes it off that reviewer's list). ``next`` hands out, in queue order (most unsure first):
    the pair R already holds if it still fits, else the first pair that fits and is not leased
    to someone else; *fits* = R has no standing label of it, and nobody has labelled it (or,
    with ``second``, somebody else has: a second opinion)."""

    def __init__(self, output: str | Path, lease_minutes: float = 10.0, clock=time.monotonic):
        self.output, self.lease_s, self.clock = Path(output), lease_minutes * 60, clock
        self.queue_path = review_dir(output) / "queue.jsonl"
        self.lock = threading.Lock()
        self.log = LabelLog(output)
        self.events = read_events(output)  # labels.jsonl as written; appended to as we write it
        self.leases: dict[str, tuple[str, float]] = {}  # pair_id -> (reviewer, expiry on clock)
        self.rows: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.queue_mtime = None
        self._reload_queue()

    def _reload_queue(self) -> None:
        """`cai-ray label` rewrites the queue on a re-run: pick it up without a restart."""
        mtime = self.queue_path.stat().st_mtime_ns if self.queue_path.exists() else None
        if mtime != self.queue_mtime:
            self.rows, self.queue_mtime = read_queue(self.output), mtime
            self.by_id = {r["pair_id"]: r for r in self.rows}
            log.info("queue: %d pairs from %s", len(self.rows), self.queue_path)

    def _sets(self, reviewer: str) -> tuple[set[str], set[str], set[str], set[str]]:
        """(labelled by anyone, labelled by others, R's labels, R's skips) as pair_id sets."""
        labelled, others, mine, skipped = set(), set(), set(), set()
        for (pair, who), e in standing(self.events).items():
            if who == reviewer:
                (skipped if e["label"] == "skip" else mine).add(pair)
            if e["label"] != "skip":
                labelled.add(pair)
                if who != reviewer:
                    others.add(pair)
        return labelled, others, mine, skipped

    def _lease(self, pair_id: str, reviewer: str) -> None:
        """One lease per reviewer: taking a pair lets go of the one R held before."""
        for p in [p for p, (who, _) in self.leases.items() if who == reviewer]:
            del self.leases[p]
        self.leases[pair_id] = (reviewer, self.clock() + self.lease_s)

    def _release(self, pair_id: str, reviewer: str) -> None:
        if self.leases.get(pair_id, ("",))[0] == reviewer:
            del self.leases[pair_id]

    def next(self, reviewer: str, second: bool = False) -> dict[str, Any] | None:
        with self.lock:
            self._reload_queue()
            labelled, others, mine, skipped = self._sets(reviewer)
            now = self.clock()

            def fits(pair: str) -> bool:
                if pair in mine or pair in skipped:
                    return False
                return pair in others if second else pair not in labelled

            def free(pair: str) -> bool:
                who, until = self.leases.get(pair, (reviewer, 0.0))
                return who == reviewer or until <= now

            held = [p for p, (who, _) in self.leases.items() if who == reviewer and p in self.by_id]
            pick = next((p for p in held if fits(p)), None)
            pick = pick or next((r["pair_id"] for r in self.rows if fits(r["pair_id"]) and free(r["pair_id"])), None)
            if pick is None:
                for p in held:
                    self._release(p, reviewer)
                return None
            self._lease(pick, reviewer)
            return self.by_id[pick]

    def label(self, reviewer: str, pair_id: str, label: str) -> dict[str, Any]:
        if label not in LABELS:
            raise ReviewError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        with self.lock:
            self._reload_queue()
            if pair_id not in self.by_id:
                raise ReviewError(f"unknown pair_id {pair_id!r}: not in {self.queue_path}")
            event = self.log.append("label", pair_id, reviewer, label)
            self.events.append(event)
            self._release(pair_id, reviewer)
        log.info("label %s on %s by %s", label, pair_id, reviewer)
        return event

    def undo(self, reviewer: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Withdraw R's latest standing label; returns (the label withdrawn, the undo event).
        The pair is leased to R again, so R's next page shows it."""
        with self.lock:
            mine = [e for (_, who), e in standing(self.events).items() if who == reviewer]
            if not mine:
                raise ReviewError(f"{reviewer} has no standing label to undo")
            last = max(mine, key=lambda e: (e.get("seq", 0), e.get("time", 0)))
            event = self.log.append("undo", last["pair_id"], reviewer)
            self.events.append(event)
            self._lease(last["pair_id"], reviewer)
        log.info("undo %s on %s by %s", last["label"], last["pair_id"], reviewer)
        return last, event

    def progress(self, reviewer: str) -> dict[str, Any]:
        with self.lock:
            self._reload_queue()
            labelled, others, mine, skipped = self._sets(reviewer)
            ids = set(self.by_id)
            return {
                "reviewer": reviewer,
                "labelled": len(labelled & ids),
                "total": len(ids),
                "mine": len(mine & ids),
                "skipped": len(skipped & ids),
                "second": len((others - mine - skipped) & ids),  # pairs R could give a second opinion on
            }


def finite(obj: Any) -> Any:
    """NaN/inf -> None (JSON has neither; the queue writes p_a NaN for a pair with no AI label)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def basic_user(header: str) -> str | None:
    """The user name of ``Basic base64(user:password)``; None for any other header."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(token.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None


class KeyCheck:
    """Outermost (pure ASGI) middleware: the key on every path but the page and /healthz,
    before a byte of the body is read; 401 with a Basic challenge (see CHALLENGE) otherwise."""

    def __init__(self, app, key_sha256: str | None):
        self.app, self.key_sha256 = app, key_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key_sha256 is not None and scope["path"] not in OPEN_PATHS:
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"), "")
            if not key_ok(auth, self.key_sha256):
                resp = error(401, f"{UNAUTHORISED}; the Basic user name is your reviewer name", "authentication_error")
                resp.headers["www-authenticate"] = CHALLENGE[0][1].decode()
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


class LabelBody(BaseModel):
    pair_id: str
    label: str  # checked by ReviewState.label, whose message names the allowed labels
    reviewer: str | None = None


class UndoBody(BaseModel):
    reviewer: str | None = None


def build_app(state: ReviewState, key_sha256: str | None) -> FastAPI:
    """The page and the API over ``state``. ``key_sha256`` None = no key (--no-auth): the
    reviewer still has to name themself."""
    app = FastAPI(title="cai-ray review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, key_sha256=None, max_bytes=MAX_BODY_BYTES)  # body cap only
    app.add_middleware(KeyCheck, key_sha256=key_sha256)

    def reviewer_of(request: Request, given: str | None) -> str:
        name = (basic_user(request.headers.get("authorization", "")) or given or "").strip()
        if not name:
            raise HTTPException(401, WHO, headers={"WWW-Authenticate": CHALLENGE[0][1].decode()})
        if len(name) > MAX_NAME or not name.isprintable():
            raise HTTPException(400, f"reviewer name must be 1-{MAX_NAME} printable characters")
        return name

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        resp = error(exc.status_code, str(exc.detail), kind)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        why = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(400, why)

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, exc: ReviewError):
        return error(400, str(exc))

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/api/next")
    def next_pair(request: Request, reviewer: str | None = None, second: bool = False):
        row = state.next(reviewer_of(request, reviewer), second)
        return {"done": True} if row is None else finite(row)

    @app.post("/api/label")
    def label(request: Request, body: LabelBody):
        return state.label(reviewer_of(request, body.reviewer), body.pair_id, body.label)

    @app.post("/api/undo")
    def undo(request: Request, body: UndoBody | None = None):
        last, event = state.undo(reviewer_of(request, body and body.reviewer))
        pair = state.by_id.get(last["pair_id"])
        return {"pair_id": last["pair_id"], "undone": last, "event": event, "pair": finite(pair) if pair else None}

    @app.get("/api/progress")
    def progress(request: Request, reviewer: str | None = None):
        return state.progress(reviewer_of(request, reviewer))

    return app


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_to_file(path: Path) -> None:
    """This module's and uvicorn's records go to ``path`` only, not the terminal."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("cai_ray.serve.review", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)


def run(
    output: str | Path,
    host: str = "127.0.0.1",
    port: int = 8900,
    api_key_file: str | None = None,
    lease_minutes: float = 10.0,
    auth: bool = True,
) -> int:
    """Serve until Ctrl-C; 2 (with the reason on stderr) when it cannot start."""
    import uvicorn

    queue = review_dir(output) / "queue.jsonl"
    try:
        if not queue.exists():
            raise ValueError(f"no review queue at {queue}: `cai-ray label` writes it (review.fraction > 0)")
        if lease_minutes <= 0:
            raise ValueError(f"--lease-minutes must be > 0, got {lease_minutes}")
        if not auth and not loopback(host):
            raise ValueError(f"--no-auth on {host} would let anyone on the network label: use a key")
        key = read_api_key(api_key_file, "--no-auth") if auth else None
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bound here, so a taken port is an error on stderr, not in the log
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log_path = review_dir(output) / "server.log"
    log_to_file(log_path)
    state = ReviewState(output, lease_minutes)
    app = build_app(state, key_digest(key) if key else None)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    shown = f"[{host}]" if ":" in host else host
    print(
        f"review page: http://{shown}:{port}/  ({len(state.rows)} pairs; sign in with your name and "
        f"{'the key' if key else 'any password'}; labels -> {review_dir(output) / 'labels.jsonl'}; "
        f"log -> {log_path}; Ctrl-C stops)",
        flush=True,
    )
    log.info("serving %s on %s:%d (auth %s)", queue, host, port, "on" if key else "OFF")
    server.run(sockets=[sock])
    return 0


CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"

# One self-contained page. Every piece of data goes in with textContent, never innerHTML.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cai-ray review</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.5 system-ui, sans-serif; margin: 0; color: #1d1d1d; background: #f5f5f2; }
  header { display: flex; gap: 1.2em; align-items: baseline; flex-wrap: wrap;
           padding: .6em 1.2em; background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 1.05em; margin: 0; }
  #progress { margin-left: auto; font-weight: 600; }
  main { max-width: 1250px; margin: 0 auto; padding: .8em 1.2em 2em; }
  h2 { font-size: .95em; text-transform: uppercase; letter-spacing: .04em; color: #555; margin: 1.1em 0 .4em; }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; margin: .3em 0; }
  .role { font-size: .8em; color: #666; display: block; }
  #principles { margin: .2em 0; padding-left: 1.3em; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
  .answer { background: #fff; border: 1px solid #bbb; border-radius: 6px; padding: .6em .9em; }
  .answer h3 { margin: 0 0 .3em; font-size: 1.1em; }
  .buttons { display: flex; flex-wrap: wrap; gap: .5em; margin: 1em 0; }
  button { font: inherit; padding: .45em .9em; border: 1px solid #888; border-radius: 5px;
           background: #fff; cursor: pointer; }
  button:hover { background: #eef3ff; }
  kbd { font-size: .8em; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; color: #555; }
  #ai { background: #fffbe8; border: 1px solid #e6d9a0; border-radius: 6px; padding: .5em .9em; }
  #lean { font-weight: 600; }
  #reasons { margin: .3em 0 0; padding-left: 1.3em; }
  #notice { min-height: 1.5em; margin: 0; color: #2d5a2d; }
  #notice.bad { color: #a00; }
  .meta { color: #666; font-size: .85em; }
  footer { color: #666; font-size: .85em; margin-top: 1.5em; }
  @media (max-width: 800px) { .answers { grid-template-columns: 1fr; } }
</style>
</head>
<body data-state="loading">
<header>
  <h1>cai-ray review</h1>
  <span id="mode">Pairs the AI labeler is unsure of</span>
  <span id="who"></span>
  <span id="progress"></span>
</header>
<main>
  <p id="notice" role="status"></p>
  <section id="pair" hidden>
    <div class="meta">pair <code id="pair-id"></code></div>
    <h2>Prompt</h2>
    <div id="prompt"></div>
    <h2>Which answer is better?</h2>
    <ul id="principles"></ul>
    <div class="answers">
      <article class="answer"><h3>A</h3><div id="answer-a" class="text"></div></article>
      <article class="answer"><h3>B</h3><div id="answer-b" class="text"></div></article>
    </div>
    <div class="buttons">
      <button data-label="a">A is better <kbd>a</kbd> <kbd>1</kbd></button>
      <button data-label="b">B is better <kbd>b</kbd> <kbd>2</kbd></button>
      <button data-label="tie">Tie <kbd>t</kbd> <kbd>3</kbd></button>
      <button data-label="skip">Skip <kbd>s</kbd></button>
      <button id="undo">Undo my last label <kbd>u</kbd> <kbd>Backspace</kbd></button>
    </div>
    <div id="ai"><div id="lean"></div><ul id="reasons"></ul></div>
  </section>
  <section id="done" hidden>
    <p id="done-text"></p>
    <button id="to-second" hidden></button>
    <button id="to-first" hidden>Back to unlabelled pairs</button>
    <button id="undo-done">Undo my last label <kbd>u</kbd></button>
  </section>
  <footer>Keys: <kbd>a</kbd>/<kbd>1</kbd> A better, <kbd>b</kbd>/<kbd>2</kbd> B better,
    <kbd>t</kbd>/<kbd>3</kbd> tie, <kbd>s</kbd> skip, <kbd>u</kbd>/<kbd>Backspace</kbd> undo.
    Every label is saved on the server the moment you give it.</footer>
</main>
<script>
"use strict";
const KEYS = { a: "a", "1": "a", b: "b", "2": "b", t: "tie", "3": "tie", s: "skip" };
const SAID = { a: '"A is better"', b: '"B is better"', tie: '"tie"', skip: '"skip"' };
const second = new URLSearchParams(location.search).get("second") === "1";
const $ = (id) => document.getElementById(id);
let current = null;
let busy = false;

function setText(el, value) { el.textContent = value == null ? "" : String(value); }
function el(tag, cls, value) { const e = document.createElement(tag); if (cls) e.className = cls; setText(e, value); return e; }
function notice(msg, bad) { setText($("notice"), msg); $("notice").className = bad ? "bad" : ""; }

async function api(path, body) {
  // location.origin, never the page's own URL: fetch refuses a URL with user:key@ in it
  const init = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(new URL(path, location.origin), init);
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    const why = data && data.error ? data.error.message : r.status + " " + r.statusText;
    throw new Error(r.status === 401
      ? "Not signed in (" + why + "). Reload and sign in: user name = your name, password = the review key."
      : why);
  }
  return data;
}

function lean(p) {
  if (p == null) return "AI: no label";
  return p >= 0.5 ? "AI: " + Math.round(p * 100) + "% A" : "AI: " + Math.round((1 - p) * 100) + "% B";
}

function show(row) {
  current = row;
  $("pair").hidden = false;
  $("done").hidden = true;
  setText($("pair-id"), row.pair_id);
  const prompt = $("prompt");
  prompt.replaceChildren();
  const messages = typeof row.prompt === "string" ? [{ role: "user", content: row.prompt }] : row.prompt || [];
  for (const m of messages) {
    const box = el("div", "msg");
    box.append(el("span", "role", m.role), el("div", "text", m.content));
    prompt.append(box);
  }
  setText($("answer-a"), row.response_a);
  setText($("answer-b"), row.response_b);
  $("principles").replaceChildren(...(row.principles || []).map((p) => el("li", "", p.question || p.id)));
  let sides = "";
  if (row.p_ab != null && row.p_ba != null) {
    sides = " (P(A better): " + row.p_ab.toFixed(2) + " with A shown first, " + row.p_ba.toFixed(2) + " with A second)";
  }
  setText($("lean"), lean(row.p_a) + sides);
  $("reasons").replaceChildren(...(row.reasons || []).map((r) => el("li", "", r)));
  window.scrollTo(0, 0);
}

function showDone(prog) {
  current = null;
  $("pair").hidden = true;
  $("done").hidden = false;
  setText($("done-text"), second
    ? "No more second opinions for you: every pair someone else labelled has your label too (or your skip)."
    : "Nothing left for you: every pair has a label, or you skipped it.");
  $("to-second").hidden = second || !prog.second;
  setText($("to-second"), "Give second opinions on " + prog.second + " pairs others labelled");
  $("to-first").hidden = !second;
}

function showProgress(prog) {
  setText($("who"), "reviewer: " + prog.reviewer);
  setText($("progress"), prog.labelled + " / " + prog.total + " labelled (" + prog.mine + " by you" +
    (prog.skipped ? ", " + prog.skipped + " skipped" : "") + ")");
}

async function refresh() {
  // one after the other: the first call of a page load is the one the browser asks the sign-in for
  const prog = await api("/api/progress");
  const row = await api("/api/next" + (second ? "?second=1" : ""));
  showProgress(prog);
  if (row.done) showDone(prog); else show(row);
}

// one request at a time: a key pressed while the page is saving must not label the next pair unseen
async function step(fn) {
  if (busy) return;
  busy = true;
  document.body.dataset.state = "busy";
  try {
    await fn();
    document.body.dataset.state = current ? "ready" : "done";
  } catch (e) {
    notice(e.message, true);
    document.body.dataset.state = "error";
  } finally {
    busy = false;
  }
}

function label(value) {
  if (!current) return;
  const pair = current.pair_id;
  step(async () => {
    await api("/api/label", { pair_id: pair, label: value });
    notice("Saved: " + SAID[value] + " on " + pair + ".");
    await refresh();
  });
}

function undo() {
  step(async () => {
    const r = await api("/api/undo", {});
    notice("Undone: your " + SAID[r.undone.label] + " on " + r.pair_id + ". Label it again.");
    if (r.pair) {
      show(r.pair);
      showProgress(await api("/api/progress"));
    } else {
      await refresh();
    }
  });
}

for (const b of document.querySelectorAll("button[data-label]")) b.addEventListener("click", () => label(b.dataset.label));
$("undo").addEventListener("click", undo);
$("undo-done").addEventListener("click", undo);
$("to-second").addEventListener("click", () => { location.search = "?second=1"; });
$("to-first").addEventListener("click", () => { location.search = ""; });
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const k = e.key.toLowerCase();
  if (KEYS[k]) { e.preventDefault(); label(KEYS[k]); }
  else if (k === "u" || k === "backspace") { e.preventDefault(); undo(); }
});
if (second) setText($("mode"), "Second opinions: pairs someone else labelled (their labels are hidden)");
step(refresh);
</script>
</body>
</html>
"""
