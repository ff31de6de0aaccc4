from cai_ray import prompts


def test_critique_and_revision_messages(general_constitution):
    c = general_constitution
    p = c.principle("privacy")
    shots = prompts.few_shot_turns(c, None)
    # each example is six turns: prompt, response, critique request, critique, revision request, revision
    assert len(shots) == 6 * len(c.critique_examples)
    ex = c.critique_examples[0]
    assert shots[0] == {"role": "user", "content": ex.prompt}
    assert shots[2]["content"] == c.principle(ex.principle).critique_request
    assert shots[5] == {"role": "assistant", "content": ex.revision}

    convo = [{"role": "user", "content": "Where does Ann live?"}]
    crit = prompts.critique_messages(shots, convo, "At 5 Elm St.", p)
    assert crit[: len(shots)] == shots
    assert crit[len(shots) :] == [
        {"role": "user", "content": "Where does Ann live?"},
        {"role": "assistant", "content": "At 5 Elm St."},
        {"role": "user", "content": p.critique_request},
    ]
    rev = prompts.revision_messages(shots, convo, "At 5 Elm St.", p, "It leaks an address.")
    assert rev[-3:] == [
        {"role": "user", "content": p.critique_request},
        {"role": "assistant", "content": "It leaks an address."},
        {"role": "user", "content": p.revision_request},
    ]
    assert rev[-1]["role"] == "user"


def test_direct_revision_has_no_critique(general_constitution):
    c = general_constitution
    shots = prompts.few_shot_turns(c, 1, with_critique=False)
    assert len(shots) == 4
    p = c.principle("honesty")
    rev = prompts.revision_messages(shots, [{"role": "user", "content": "q"}], "a", p, None)
    assert p.critique_request not in [m["content"] for m in rev]
    assert rev[-1]["content"].startswith(p.revision_request)


def test_few_shot_count(general_constitution):
    assert prompts.few_shot_turns(general_constitution, 0) == []


def test_multi_turn_prompts_are_kept(general_constitution):
    p = general_constitution.principle("honesty")
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "who are you?"},
    ]
    crit = prompts.critique_messages([], convo, "I am a human.", p)
    assert crit[:4] == convo and crit[4]["content"] == "I am a human."
