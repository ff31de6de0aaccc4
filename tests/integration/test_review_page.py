"""`cai-ray review`: the page in headless Chromium (keys, undo, reload), the API with a plain
HTTP client (auth, 400s, leases, second opinions), a restart through the CLI, and leases
on a fake clock. No Ray: the server is FastAPI + uvicorn over files."""

import json
import math
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.asgi_app import app_on_a_port

from cai_ray.core.review import read_events, review_dir, standing
from cai_ray.runtime import free_port
from cai_ray.serve.api import key_digest
from cai_ray.serve.review import ReviewState, build_app

KEY = "review-key-0123456789abcdef"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "Say <b>bold</b><script>window.pwned = 1</script> & <img src=x onerror=window.pwned=2>"


def queue_row(i: int, p_a: float, reasons: list[str]) -> dict:
    """One row as cai_ray.core.review.build_queue writes it."""
    no_label = math.isnan(p_a)
    return {
        "pair_id": f"p{i}",
        "prompt_id": f"q{i}",
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"{HOSTILE} #{i}"}],
        "response_a": f"answer A of p{i}",
        "response_b": f"answer B of p{i}",
        "principles": [{"id": "harm", "question": "Which answer is less harmful?"}],
        "p_a": p_a,
        "p_ab": None if no_label else 0.7,
        "p_ba": None if no_label else 0.54,
        "position_consistent": True,
        "p_ab_by_principle": None,
        "p_ba_by_principle": None,
        "reasons": reasons,
        "uncertainty": 0.9 - i / 10,
        "kept": not no_label,
        "constitution": "c0ffee",
    }


def write_queue(out) -> None:
    rows = [queue_row(0, 0.62, ["margin: |p_a - 0.5| = 0.120 < review.margin 0.15"])]
    rows.append(queue_row(1, float("nan"), ["no AI label: invalid: too long for the labeler"]))
    rows += [queue_row(i, 0.45, ["margin: |p_a - 0.5| = 0.050 < review.margin 0.15"]) for i in (2, 3, 4)]
    review_dir(out).mkdir(parents=True)
    # json.dumps writes the NaN as the queue writer does: the server must answer it as null
    (review_dir(out) / "queue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def serving(out, lease_minutes: float = 10.0):
    """The app on a free 127.0.0.1 port in a thread; yields its base URL."""
    app = build_app(ReviewState(out, lease_minutes), key_digest(KEY))
    return app_on_a_port(app, timeout_s=10, log_config=None, lifespan="off", access_log=False)


def labels(out) -> dict[tuple[str, str], str]:
    return {k: e["label"] for k, e in standing(read_events(out)).items()}


def shows(page, pair_id: str) -> None:
    """Wait until the page has settled on ``pair_id`` (no request in flight)."""
    page.wait_for_function(
        "id => document.body.dataset.state === 'ready' && document.getElementById('pair-id').textContent === id",
        arg=pair_id,
        timeout=5000,
    )


def test_page_labels_by_keyboard_undoes_and_shows_the_undone_pair_after_a_reload(tmp_path):
    """A reviewer's session: three labels by keyboard, an undo (Backspace), a reload — which
    shows the undone pair again (it is leased back to her) — and a skip by button."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from cai_ray.eval.report import CHROMIUM_ARGS

    write_queue(tmp_path)
    with serving(tmp_path) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_context(http_credentials={"username": "ann", "password": KEY}).new_page()
            page.goto(url + "/")
            shows(page, "p0")
            assert page.text_content("#progress") == "0 / 5 labelled (0 by you)"
            assert page.text_content("#who") == "reviewer: ann"
            assert page.text_content("#lean").startswith("AI: 62% A")
            assert "margin: |p_a - 0.5| = 0.120" in page.text_content("#reasons")
            assert page.text_content("#principles") == "Which answer is less harmful?"
            assert page.text_content("#answer-b") == "answer B of p0"
            # the prompt is text: its markup shows as written and nothing in it ran
            assert HOSTILE in page.text_content("#prompt")
            assert page.locator("#prompt b, #prompt script, #prompt img").count() == 0
            assert page.evaluate("window.pwned") is None

            page.keyboard.press("a")
            shows(page, "p1")
            assert page.text_content("#lean") == "AI: no label"  # p_a NaN in the queue
            page.keyboard.press("2")
            shows(page, "p2")
            page.keyboard.press("t")
            shows(page, "p3")
            assert page.text_content("#progress") == "3 / 5 labelled (3 by you)"
            page.keyboard.press("Backspace")
            shows(page, "p2")
            assert 'Undone: your "tie" on p2' in page.text_content("#notice")

            page.reload()
            shows(page, "p2")
            assert page.text_content("#progress") == "2 / 5 labelled (2 by you)"
            page.click("button[data-label=skip]")
            shows(page, "p3")
            assert page.text_content("#progress") == "2 / 5 labelled (2 by you, 1 skipped)"
        finally:
            browser.close()
    assert labels(tmp_path) == {("p0", "ann"): "a", ("p1", "ann"): "b", ("p2", "ann"): "skip"}
    assert [e["event"] for e in read_events(tmp_path)] == ["label"] * 3 + ["undo", "label"]


def test_api_auth_bad_input_leases_second_opinions_and_a_restart_keeps_every_label(tmp_path):
    write_queue(tmp_path)
    with serving(tmp_path) as url:
        anon = httpx.Client(base_url=url, timeout=10)
        ann = httpx.Client(base_url=url, timeout=10, auth=("ann", KEY))  # Basic, as the browser sends it
        bob = httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {KEY}"})  # + reviewer

        assert anon.get("/healthz").json() == {"status": "ok"}
        assert "cai-ray review" in anon.get("/").text  # the page is open; its API calls are not
        r = anon.get("/api/next", params={"reviewer": "ann"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic ")
        assert "missing or wrong API key" in r.json()["error"]["message"]
        assert anon.post("/api/label", auth=("ann", "wrong-key-0123456789"), json={}).status_code == 401
        assert bob.get("/api/next").status_code == 401  # a Bearer key but no reviewer named

        for body, why in (
            ({"pair_id": "p0", "label": "maybe"}, "label must be one of a, b, tie, skip, got 'maybe'"),
            ({"pair_id": "nope", "label": "a"}, "unknown pair_id 'nope'"),
            ({"pair_id": "p0"}, "label: Field required"),
            ("{not json", "JSON decode error"),
        ):
            raw = {"content": body, "headers": {"Content-Type": "application/json"}}
            r = ann.post("/api/label", **(raw if isinstance(body, str) else {"json": body}))
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        r = ann.post("/api/undo")
        assert r.status_code == 400 and "no standing label" in r.json()["error"]["message"]
        assert read_events(tmp_path) == []

        # two reviewers asking at once get different pairs; asking again renews one's own
        gate = threading.Barrier(2)

        def ask(client, params):
            gate.wait()
            return client.get("/api/next", params=params).json()

        with ThreadPoolExecutor(2) as pool:
            first = list(pool.map(ask, (ann, bob), ({}, {"reviewer": "bob"})))
        mine, his = first[0]["pair_id"], first[1]["pair_id"]
        assert {mine, his} == {"p0", "p1"}
        assert next(r for r in first if r["pair_id"] == "p1")["p_a"] is None  # NaN in the file -> null
        assert ann.get("/api/next").json()["pair_id"] == mine
        assert bob.get("/api/next", params={"reviewer": "bob"}).json()["pair_id"] == his

        assert bob.post("/api/label", json={"pair_id": his, "label": "a", "reviewer": "bob"}).status_code == 200
        # a second opinion: the pair bob labelled, which ann has not
        assert ann.get("/api/next", params={"second": 1}).json()["pair_id"] == his
        assert ann.get("/api/progress").json() == {
            "reviewer": "ann",
            "labelled": 1,
            "total": 5,
            "mine": 0,
            "skipped": 0,
            "second": 1,
        }
        undone = bob.post("/api/undo", json={"reviewer": "bob"}).json()
        assert undone["pair_id"] == his and undone["pair"]["pair_id"] == his and undone["undone"]["label"] == "a"
        for client, pair, value, who in ((bob, his, "b", "bob"), (ann, his, "tie", None), (ann, mine, "a", None)):
            assert client.post("/api/label", json={"pair_id": pair, "label": value, "reviewer": who}).status_code == 200
        # everything given has a second opinion now; ann's next unlabelled pair is p2
        assert ann.get("/api/next", params={"second": 1}).json() == {"done": True}
        assert ann.get("/api/next").json()["pair_id"] == "p2"
        before = labels(tmp_path)
    assert before == {(his, "bob"): "b", (his, "ann"): "tie", (mine, "ann"): "a"}

    # a restart, through the CLI: every label is read back
    (tmp_path / "key").write_text(KEY + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai_ray.cli", "review", str(tmp_path), "--port", str(port)]
        + ["--api-key-file", str(tmp_path / "key")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([proc.stdout], [], [], 30)[0], "cai-ray review printed nothing in 30 s"
        line = proc.stdout.readline()
        assert line.startswith(f"review page: http://127.0.0.1:{port}/  (5 pairs;"), (line, proc.poll())
        cat = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, auth=("cat", KEY))
        deadline = time.monotonic() + 10
        while True:
            try:
                progress = cat.get("/api/progress").json()
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the restarted server does not answer"
                time.sleep(0.05)
        assert progress["labelled"] == 2 and progress["second"] == 2
        assert cat.get("/api/next").json()["pair_id"] == "p2"  # the leases died with the old server
        assert cat.post("/api/label", json={"pair_id": "p2", "label": "b"}).status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert labels(tmp_path) == {**before, ("p2", "cat"): "b"}
    assert out == "" and "Traceback" not in err  # one line on stdout; the rest went to server.log
    log = (review_dir(tmp_path) / "server.log").read_text()
    assert "label b on p2 by cat" in log and "POST /api/label" in log


def test_leases_expire_and_a_skip_takes_a_pair_off_one_reviewers_list_only(tmp_path):
    write_queue(tmp_path)
    now = [0.0]
    state = ReviewState(tmp_path, lease_minutes=1, clock=lambda: now[0])
    assert state.next("ann")["pair_id"] == "p0"
    now[0] = 30
    assert state.next("bob")["pair_id"] == "p1"
    now[0] = 61  # ann's lease has run out, bob's has not
    assert state.next("cat")["pair_id"] == "p0"
    assert state.next("ann")["pair_id"] == "p2"
    state.label("ann", "p2", "skip")
    assert state.next("ann")["pair_id"] == "p3"
    assert state.next("dan")["pair_id"] == "p2"  # a skip is not a label: others still get it
    state.label("dan", "p2", "a")
    assert state.next("ann", second=True) is None  # she skipped the one pair someone labelled
    assert state.next("cat", second=True)["pair_id"] == "p2"
    assert state.progress("ann") == {
        "reviewer": "ann",
        "labelled": 1,
        "total": 5,
        "mine": 0,
        "skipped": 1,
        "second": 0,
    }
