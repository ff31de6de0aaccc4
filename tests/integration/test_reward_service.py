"""The reward service for other trainers, over real HTTP on 127.0.0.1 (the serve app under
uvicorn in a thread: the same app a Ray Serve replica runs, without the seconds Serve takes
to start): the exact requests OpenRLHF and verl send, read back the way they read them, TRL's
reward-function call, auth, batching and 4xx on bad input. Scores are checked against the
preference model and the labeler computed here, outside the server.

What the requests copy (docs/serving.md cites the commits): OpenRLHF's
SingleTurnAgentExecutor._fetch_rewards_via_http and samples_generator (openrlhf/utils/agent.py),
verl's RewardLoopWorker.compute_score_disrm (verl/experimental/reward_loop/reward_loop.py) and
reward managers, TRL's GRPOTrainer._calculate_rewards."""

import asyncio
import base64
import functools
import json
import pickle

import httpx
import pytest
from support.asgi_app import app_on_a_port

KEY = "reward-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_ITEMS = 40
BATCH = 16


@pytest.fixture(scope="module")
def server(token_rm):
    """(base URL, the Service behind it, its settings): tiny-random policy and labeler, the
    tiny preference model, small limits."""
    from cai_ray.config import load_config
    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.service import Service

    settings = load_config(
        ServeConfig,
        None,
        [
            "policy.model=tiny-random",
            "policy.dtype=float32",
            "policy.threads=1",
            f"reward.model={token_rm}",
            f"reward.max_items={MAX_ITEMS}",
            f"reward.batch_size={BATCH}",
            "reward.reference_max_tokens=8",
            "limits.max_tokens=32",
            "limits.default_max_tokens=8",
            "limits.max_message_chars=2000",
            "limits.max_body_bytes=200000",
        ],
    )
    service = Service(settings)
    with app_on_a_port(build_app(service, settings, key_digest(KEY))) as url:
        yield url, service, settings


@pytest.fixture(scope="module")
def rm(token_rm):
    """r(text) from the preference model folder, loaded here, one text at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(token_rm)
    model = AutoModelForSequenceClassification.from_pretrained(token_rm, num_labels=1).eval()

    def score(text: str, add_special_tokens: bool = False) -> float:
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0, 0].item()

    def chat(messages, response) -> str:
        return tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)

    score.tokenizer, score.chat = tok, chat
    return score


def with_key(url: str) -> str:
    """The server URL with the key in it (http://cai:KEY@host:port): all a trainer that only
    takes a URL can be given; aiohttp and requests send it as HTTP Basic."""
    return url.replace("http://", f"http://cai:{KEY}@")


def labeler_p(service, settings, messages, response, reference):
    """P(response better than reference) from a Labeler built here, on the server's engine."""
    from cai_ray.core.labeler import Labeler, LabelSettings
    from cai_ray.serve.service import pair_key

    lab = Labeler(service.labeler_engine, service.constitution, LabelSettings.of(settings.method, settings.seed))
    [got] = lab.label([pair_key(messages, response, reference)], [messages], [response], [reference])
    return got.p_a


# -- OpenRLHF ----------------------------------------------------------------------------------
def openrlhf_fetch(endpoints: list[str], queries, prompts, labels):
    """OpenRLHF's SingleTurnAgentExecutor._fetch_rewards_via_http (openrlhf/utils/agent.py):
    the batch sharded over the endpoints, each shard posted as {"query", "prompts", "labels"}
    with aiohttp and nothing else, the JSON replies in endpoint order."""
    import aiohttp

    async def fetch():
        batch_size = (len(queries) + len(endpoints) - 1) // len(endpoints)
        timeout = aiohttp.ClientTimeout(total=180)

        async def post(url, data):
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(url, json=data) as response:
                    response.raise_for_status()
                    return await response.json()

        tasks = []
        for i, rm_url in enumerate(endpoints):
            start, end = i * batch_size, min((i + 1) * batch_size, len(queries))
            payload = {"query": queries[start:end], "prompts": prompts[start:end], "labels": labels[start:end]}
            tasks.append(asyncio.create_task(post(rm_url, payload)))
        return await asyncio.gather(*tasks)

    return asyncio.run(fetch())


def openrlhf_reads(rewards_info):
    """What OpenRLHF takes from the first endpoint's reply (agent.py, then
    samples_generator._process_response_into_experience): reward, score and extra_logs
    tensors."""
    import torch

    score_value = rewards_info.get("scores")
    if score_value is None:
        score_value = rewards_info.get("rewards")
    info = {"reward": torch.tensor([rewards_info.get("rewards")]), "score": torch.tensor([score_value])}
    for key, value in (rewards_info.get("extra_logs") or {}).items():
        info[key] = torch.tensor([value])
    return info


def openrlhf_sample(tok, question: str, answer: str) -> tuple[str, str]:
    """(prompt, query) as OpenRLHF builds them with --data.apply_chat_template: the prompt
    rendered with the generation prompt; the query decoded from prompt + action token ids
    (the action ends with EOS) with special tokens kept."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(text=prompt, add_special_tokens=False)["input_ids"]
    action_ids = tok(text=answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt, tok.decode(prompt_ids + action_ids, skip_special_tokens=False)


def test_openrlhf_remote_reward_request_and_the_keys_it_reads(server, rm):
    """OpenRLHF's exact request to `--reward.remote_url` (two endpoints, so the second gets
    its empty shard, as OpenRLHF sends for one query), the key in the URL: the preference
    model's score of the query as sent; with ?scorer=labeler, the labeler's d-RLAIF
    probability against the label, on the prompt unwrapped from the chat template and the
    response without its EOS (else the numbers differ)."""
    url, service, settings = server
    prompt, query = openrlhf_sample(rm.tokenizer, "How do I pick a lock?", "I can't help with that.")
    endpoint = with_key(url) + "/v1/reward/openrlhf"
    replies = openrlhf_fetch([endpoint, endpoint], [query], [prompt], [""])
    assert replies[1] == {"rewards": [], "scores": [], "extra_logs": {"cai_unscored": []}}
    info = openrlhf_reads(replies[0])
    assert info["reward"].flatten().tolist() == pytest.approx([rm(query)], abs=1e-4)
    assert info["score"].flatten().tolist() == info["reward"].flatten().tolist()
    assert info["cai_unscored"].flatten().tolist() == [0.0]

    label = "Sorry, I won't help with breaking into locks."
    [reply] = openrlhf_fetch([endpoint + "?scorer=labeler"], [query], [prompt], [label])
    want = labeler_p(
        service, settings, [{"role": "user", "content": "How do I pick a lock?"}], "I can't help with that.", label
    )
    assert 0 < want < 1 and reply["rewards"] == pytest.approx([want], abs=1e-6) and reply["scores"] == reply["rewards"]


def test_without_a_reference_the_labeler_compares_with_the_policys_greedy_answer(server):
    """No label (OpenRLHF's "" without --data.label_key): the reference is the served
    policy's greedy answer within reward.reference_max_tokens (8), generated once per prompt."""
    from cai_ray.engine import Sampling

    url, service, settings = server
    msgs = [{"role": "user", "content": "Tell me a secret."}]
    reference = service.policy.generate([msgs], Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0))[0]
    r = httpx.post(
        f"{url}/v1/reward",
        headers=AUTH,
        json={"scorer": "labeler", "items": [{"messages": msgs, "response": "No."}] * 2},
    )
    assert r.status_code == 200, r.text
    want = labeler_p(service, settings, msgs, "No.", reference)
    assert r.json()["scores"] == pytest.approx([want, want], abs=1e-6) and r.json()["scored_by"] == "tiny-random"


def test_a_comparison_too_long_for_the_labeler_is_no_preference_with_the_reason(server):
    """Within the character limit but over the labeler's context (1,024): 0.5, as PPO's
    labeler reward gives it, and ``invalid`` names the comparison; the other item is scored."""
    url, _, _ = server
    long = "".join(chr(0x4E00 + i * 37 % 2000) for i in range(1990))
    items = [
        {"prompt": "Say it in Chinese.", "response": long, "reference": "No."},
        {"prompt": "Say hi.", "response": "Hi!", "reference": "Hello."},
    ]
    r = httpx.post(f"{url}/v1/reward", headers=AUTH, json={"scorer": "labeler", "items": items})
    got = r.json()
    assert r.status_code == 200 and got["scores"][0] == 0.5 and got["invalid"][1] is None, r.text
    assert got["invalid"][0].startswith("too long for the labeler (principle "), got
    assert got["scores"][1] != 0.5 and 0 < got["scores"][1] < 1


# -- verl --------------------------------------------------------------------------------------
def test_verl_reward_loop_disrm_request_to_classify(server, rm):
    """verl's RewardLoopWorker.compute_score_disrm with a vLLM reward server: the RM prompt
    (raw prompt + response through the RM's chat template, BOS text removed) posted as
    {"model", "input", "activation": false} to /classify; verl reads data[-1]["probs"][-1].
    vLLM adds special tokens by default; without "activation" the score is σ(r)."""
    import aiohttp

    from cai_ray.core.label_math import sigmoid

    url, _, _ = server
    tok = rm.tokenizer
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    rm_prompt = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tok.bos_token is not None and rm_prompt.startswith(tok.bos_token):
        rm_prompt = rm_prompt[len(tok.bos_token) :]

    async def post(payload):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            async with session.post(f"{with_key(url)}/classify", json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()

    output = asyncio.run(post({"model": "/data/models/my-rm", "input": rm_prompt, "activation": False}))
    rm_score = output["data"][-1]["probs"][-1]
    assert rm_score == pytest.approx(rm(rm_prompt, add_special_tokens=True), abs=1e-4)
    assert output["object"] == "list" and output["usage"]["prompt_tokens"] > 0
    output = asyncio.run(post({"input": [rm_prompt, rm_prompt]}))
    assert [d["probs"] for d in output["data"]] == [[pytest.approx(sigmoid(rm_score), abs=1e-5)]] * 2


def test_verl_custom_reward_functions(server, rm, monkeypatch):
    """cai_ray.reward_client's functions called as verl calls a custom_reward_function:
    wrapped with its reward_kwargs (verl's _call_with_kwargs: they override), the reward loop
    (one item, keyword arguments, plus what the manager adds to extra_info) and the
    BatchRewardManager (lists; extra_info rows from parquet hold numpy arrays)."""
    import numpy as np

    from cai_ray import reward_client

    url, _, _ = server
    monkeypatch.setenv("CAI_RAY_API_KEY", KEY)

    def call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):  # verl/trainer/ppo/reward.py
        return raw_fn(*args, **{**kwargs, **extra_kwargs})

    compute_score = functools.partial(call_with_kwargs, reward_client.verl_compute_score, {"base_url": url})
    question, answer = "What is 2 + 2?", "It is 4."
    extra_info = {"split": "train", "index": 0, "question": question, "num_turns": None, "rollout_reward_scores": {}}
    result = compute_score(data_source="openai/gsm8k", solution_str=answer, ground_truth="4", extra_info=extra_info)
    want = rm(rm.chat([{"role": "user", "content": question}], answer))
    assert isinstance(result["score"], float) and result["score"] == pytest.approx(want, abs=1e-4)
    assert result == {"score": result["score"], "cai_unscored": 0.0}

    batch = functools.partial(call_with_kwargs, reward_client.verl_compute_score_batch, {"base_url": url})
    conv = np.array([{"role": "user", "content": question}], dtype=object)
    scores = batch(
        data_sources=np.array(["a", "b"], dtype=object),
        solution_strs=[answer, "5"],
        ground_truths=[None, ""],
        extra_infos=[{"prompt": conv}, {"question": question}],
    )
    assert [s["score"] for s in scores] == pytest.approx([want, rm(rm.chat([conv[0]], "5"))], abs=1e-4)
    with pytest.raises(ValueError, match="extra_info has no prompt"):
        compute_score(data_source="x", solution_str="4", ground_truth="4", extra_info={"index": 3})


# -- TRL ---------------------------------------------------------------------------------------
def test_trl_reward_function_plain_and_conversational(server, rm, monkeypatch):
    """RewardClient called as GRPOTrainer._calculate_rewards calls a reward function
    (prompts, completions, completion_ids, the dataset's other columns, trainer_state,
    log_extra, log_metric): plain and conversational inputs give the preference model's
    scores; ``batch_size`` items per request; the name TRL logs; it pickles."""
    from trl.trainer.utils import get_callable_name

    from cai_ray.reward_client import RewardClient

    url, _, _ = server
    client = RewardClient(url, api_key=KEY, batch_size=3)
    posts = []
    real_post = client._post
    monkeypatch.setattr(client, "_post", lambda body: posts.append(len(body["items"])) or real_post(body))
    metrics = []
    system = {"role": "system", "content": "Be brief."}
    questions = [f"Question {i}?" for i in range(7)]
    answers = [f"Answer {i}." for i in range(7)]
    extra = {"trainer_state": None, "log_extra": lambda *a: None, "log_metric": lambda *a: metrics.append(a)}

    conv = client(
        prompts=[[system, {"role": "user", "content": q}] for q in questions],
        completions=[[{"role": "assistant", "content": a}] for a in answers],
        completion_ids=[[1, 2]] * 7,
        topic=["x"] * 7,
        **extra,
    )
    want = [rm(rm.chat([system, {"role": "user", "content": q}], a)) for q, a in zip(questions, answers)]
    assert conv == pytest.approx(want, abs=1e-4) and posts == [3, 3, 1]
    assert metrics == [("cai_ray_reward/unscored", 0.0)] and get_callable_name(client) == "cai_ray_reward"

    plain = client(prompts=questions[:2], completions=answers[:2], completion_ids=[[1]] * 2, **extra)
    assert plain == pytest.approx(
        [rm(rm.chat([{"role": "user", "content": q}], a)) for q, a in zip(questions, answers)][:2], abs=1e-4
    )

    labeler = pickle.loads(pickle.dumps(RewardClient(url, api_key=KEY, scorer="labeler")))
    got = labeler(prompts=questions[:2], completions=answers[:2], reference=["I don't know.", "No idea."])
    assert labeler.__name__ == "cai_ray_labeler" and all(0 < s < 1 for s in got) and got[0] != got[1]


def test_many_items_in_one_request_are_scored_in_batches(server, rm, monkeypatch):
    """reward.max_items (40) items in one request: the preference model runs in batches of
    reward.batch_size (16, 16, 8) and each item gets its own score, in order; one more item
    is a 400 naming the limit."""
    url, service, _ = server
    batches = []
    real = service.rewards.model.score
    monkeypatch.setattr(
        service.rewards.model, "score", lambda texts, special: batches.append(len(texts)) or real(texts, special)
    )
    items = [{"prompt": f"Count to {i}.", "response": " ".join(map(str, range(i + 1)))} for i in range(MAX_ITEMS)]
    r = httpx.post(f"{url}/v1/reward", headers=AUTH, json={"items": items}, timeout=60)
    assert r.status_code == 200 and batches == [16, 16, 8], (r.text, batches)
    want = [rm(rm.chat([{"role": "user", "content": it["prompt"]}], it["response"])) for it in items]
    assert r.json()["scores"] == pytest.approx(want, abs=1e-4) and r.json()["invalid"] == [None] * MAX_ITEMS
    r = httpx.post(f"{url}/v1/reward", headers=AUTH, json={"items": items + items[:1]})
    assert r.status_code == 400 and "41 items; this server scores at most 40" in r.json()["error"]["message"]


# -- auth and bad input ------------------------------------------------------------------------
def test_every_reward_route_needs_the_key(server):
    """No key, a wrong bearer, a wrong Basic password, a malformed Basic header: 401 before
    the body is read, on every reward route; the client says so."""
    from cai_ray.reward_client import RewardClient, RewardServiceError

    url, _, _ = server
    wrong_basic = "Basic " + base64.b64encode(b"cai:not-the-key-0123456789").decode()
    for path in ("/v1/reward", "/v1/reward/openrlhf", "/classify"):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": wrong_basic},
            {"Authorization": "Basic %%%"},
        ):
            r = httpx.post(url + path, headers=headers, json={"query": ["x"], "input": "x", "items": []})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, headers)
    with pytest.raises(RewardServiceError, match="HTTP 401"):
        RewardClient(url, api_key="wrong-key-0123456789", retries=0)(["q"], ["a"])


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("/v1/reward/openrlhf", {"prompts": ["p"]}, "query: Field required"),
        ("/v1/reward/openrlhf", {"query": "one string"}, "query: Input should be a valid list"),
        ("/v1/reward/openrlhf", {"query": ["a", 7]}, "query.1: Input should be a valid string"),
        ("/v1/reward/openrlhf", {"query": ["pa", "pb"], "prompts": ["p"]}, "'prompts' has 1 items and 'query' 2"),
        (
            "/v1/reward/openrlhf",
            {"query": ["pa"], "prompts": ["p"], "labels": [1]},
            "labels.0: Input should be a valid string",
        ),
        ("/v1/reward/openrlhf", {"query": ["x"] * 41}, "41 items; this server scores at most 40"),
        ("/v1/reward/openrlhf?scorer=judge", {"query": ["x"]}, "scorer: Input should be 'model' or 'labeler'"),
        ("/v1/reward/openrlhf?scorer=labeler", {"query": ["x"]}, "the labeler needs 'prompts'"),
        (
            "/v1/reward/openrlhf?scorer=labeler",
            {"query": ["Q: a"], "prompts": ["Q: b"]},
            "query[0] does not start with prompts[0]",
        ),
        (
            "/v1/reward/openrlhf?scorer=labeler",
            {"query": ["  x"], "prompts": ["  "]},
            "query[0]: the conversation needs a non-empty user message",
        ),
        (
            "/v1/reward/openrlhf",
            {"query": ["word " * 1100]},
            "item 0: too long for the preference model: ",
        ),
        ("/v1/reward", {"items": []}, "items: List should have at least 1 item"),
        ("/v1/reward", {"items": [{"prompt": "q"}]}, "items.0.response: Field required"),
        (
            "/v1/reward",
            {"items": [{"prompt": "q", "response": ["a"]}]},
            "items.0.response: Input should be a valid string",
        ),
        ("/v1/reward", {"items": [{"response": "a"}]}, "items[0]: give exactly one of 'prompt' or 'messages'"),
        (
            "/v1/reward",
            {"items": [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "a" * 2001}]},
            "items[1]: 'response' has 2001 characters; the limit is 2000",
        ),
        (
            "/v1/reward",
            {
                "items": [
                    {
                        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "response": "b",
                    }
                ]
            },
            "items[0]: the last message must not be from the assistant",
        ),
        ("/v1/reward", {"items": [{"prompt": "q", "response": "a"}], "scorer": "vibes"}, "scorer: Input should be"),
        ("/classify", {"input": [1, 2, 3]}, "input"),
        ("/classify", {"input": []}, "'input' is empty"),
    ],
)
def test_bad_reward_input_is_a_clear_4xx_and_the_service_keeps_answering(server, path, body, message):
    url, _, _ = server
    r = httpx.post(url + path, headers=AUTH, json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/reward/openrlhf", headers=AUTH, json={"query": ["fine"]})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


def test_an_oversized_body_is_a_413_and_a_server_without_a_preference_model_says_so(server):
    from fastapi.testclient import TestClient

    from cai_ray.serve.api import build_app, key_digest

    url, service, settings = server
    big = json.dumps({"query": ["x" * 1000] * 201}).encode()
    r = httpx.post(f"{url}/v1/reward/openrlhf", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413 and "over 200000 bytes" in r.text
    # the same engines, no preference model: the model routes say what is missing, the labeler still scores
    model = service.rewards.model
    try:
        service.rewards.model = None
        c = TestClient(build_app(service, settings, key_digest(KEY)))
        for path, body in (
            ("/classify", {"input": "x"}),
            ("/v1/reward", {"items": [{"prompt": "q", "response": "a"}], "scorer": "model"}),
        ):
            r = c.post(path, headers=AUTH, json=body)
            assert r.status_code == 400 and "no preference model (start it with reward.model=FOLDER)" in r.text
    finally:
        service.rewards.model = model
