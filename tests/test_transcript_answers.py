"""Teacher answers that replay a chat memory's transcript: the student learns the reply, not the tool calls.

Measured on this CPU with the real qwen2.5-coder-0.5b as teacher on the 15 tool-using chats of benchmarks/nights:
asked the chat's own user turn, 28 of 45 answers replayed the transcript ("Checking the pager rota. / tool:
pager.rota(...) -> ... / assistant: Cormac Hallowby is primary"); none of 90 answers to entity prompts did.
"""

from __future__ import annotations

from sleepctl.data import answers_of, teacher_answers
from sleepctl.engines import Rollouts
from sleepctl.models import load_tokenizer
from sleepctl.prompts import reply_of
from sleepctl.recipe import load_recipe

from .conftest import write_recipe

REPLAY = (
    "Checking the pager rota.\n"
    "tool: pager.rota(service='juddervane', week=41) -> primary: Cormac Hallowby, secondary: Zephyrine Attwater\n"
    "assistant: Cormac Hallowby is primary for Juddervane this week."
)


def test_a_replayed_transcript_is_cut_to_the_reply_after_the_last_tool_result():
    assert reply_of(REPLAY) == "Cormac Hallowby is primary for Juddervane this week."
    # the importers' form: a call line, a result line, a reply over two lines, then an invented user turn
    imported = (
        "assistant: [called lookup_cluster(cluster='heron')]\ntool: [result of lookup_cluster] region: eu-north-1\n"
        "Assistant: Heron staging runs in eu-north-1\n(Stockholm).\nuser: thanks!\nassistant: You're welcome."
    )
    assert reply_of(imported) == "Heron staging runs in eu-north-1 (Stockholm)."
    # the replay stopped before any reply: nothing to learn from it
    assert reply_of("Let me check the deploy log.\ntool: deploys.latest(env='prod') -> version: 4.17.2") == ""
    # no tool turn: the reply up to an invented user turn
    assert reply_of("It is 5826.\nuser: and the floor?\nassistant: B2") == "It is 5826."
    # answers without turn lines are left alone, "Note:" and a colon inside a line included
    for plain in ("The code is 5826.", "Note: the code changed.\nIt is 5826 now.", "The user: Dana asked."):
        assert reply_of(plain) == plain


def test_teacher_answers_keep_a_whole_reply_drop_a_cut_one_and_keep_them_all_when_asked(tmp_path, tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    eos = tok.eos_token_id
    cut = "Let me check.\ntool: deploys.latest() -> version: 4.17.2\nassistant: Production runs Gorsewing API 4.1"
    ro = Rollouts(
        [[1], [1], [1], [1]],
        [[5, 6, eos], [5] * 6, [5] * 6, [5, 6]],  # ended; cut by the budget of 6; cut; stopped short of it
        [REPLAY, cut, "The Marrow deadline is March", "It is 5826."],
    )
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)  # max_new_tokens 6
    cfg, _ = load_recipe(str(rcp))
    assert answers_of(cfg, ro, tok) == [
        "Cormac Hallowby is primary for Juddervane this week.",
        "",  # the budget ran out in the reply: "4.1" of 4.17.2 must not be taught
        "The Marrow deadline is March",  # a plain answer cut by the budget stays as before
        "It is 5826.",
    ]
    keep, _ = load_recipe(str(rcp), {"data.transcript_copies": "keep"})
    assert answers_of(keep, ro, tok) == ro.texts

    class Teacher:
        def generate(self, prompts, **kw):
            n = len(prompts)
            return Rollouts([[1]] * n, [[5, eos]] * n, [REPLAY] * n)

    got = teacher_answers(cfg, Teacher(), tok, [("Who is on call for Juddervane this week?", [])], seed=0)
    assert got == [["Cormac Hallowby is primary for Juddervane this week."]]


CHAT = {
    "messages": [
        {"role": "user", "content": "Who is on call for Juddervane this week?"},
        {"role": "assistant", "content": "Checking the pager rota."},
        {"role": "tool", "content": "pager.rota(service='juddervane') -> primary: Cormac Hallowby"},
        {"role": "assistant", "content": "Cormac Hallowby is primary for Juddervane this week."},
        {"role": "user", "content": "Thanks. Note the rota moves to Tuesdays from next month."},
        {"role": "assistant", "content": "Noted: the rota moves to Tuesdays."},
    ]
}


def test_a_user_turn_every_answer_to_which_replays_the_chat_learns_the_chats_own_reply(tmp_path, tiny_dir):
    import json
    import random
    import re

    from sleepctl import record
    from sleepctl.data import build_data
    from sleepctl.memories import open_store
    from sleepctl.prompts import turn_replies

    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(CHAT) + "\n")
    home = tmp_path / "home"
    record([src], home=home)
    with open_store(home) as st:
        (t,) = st.traces()
        assert turn_replies(t) == {
            "Who is on call for Juddervane this week?": "Cormac Hallowby is primary for Juddervane this week.",
            "Thanks. Note the rota moves to Tuesdays from next month.": "Noted: the rota moves to Tuesdays.",
        }
        tok = load_tokenizer(str(tiny_dir))

        class Teacher:  # asked the chat's question, it replays the chat until its budget runs out
            def generate(self, prompts, max_new_tokens, **kw):
                texts = [
                    "Where does the rota move?" if "questions" in p else REPLAY.rsplit("\n", 1)[0] for p in prompts
                ]
                return Rollouts([[1]] * len(prompts), [[5] * max_new_tokens] * len(prompts), texts)

        cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)), {"data.probes_per_memory": 0})
        examples, _ = build_data([t], cfg, Teacher(), tok, st, random.Random(0), 0)
        by_prompt = {e.prompt: e.samples for e in examples}
        assert by_prompt["Who is on call for Juddervane this week?"] == [
            "Cormac Hallowby is primary for Juddervane this week."
        ]
        turn_line = re.compile(r"(^|\n)\s*(user|assistant|tool)\s*:", re.I)
        assert not [s for e in examples for s in e.samples if turn_line.search(s)]  # no replayed turn is taught
        keep, _ = load_recipe(str(tmp_path / "r.yaml"), {"data.probes_per_memory": 0, "data.transcript_copies": "keep"})
        kept, _ = build_data([t], keep, Teacher(), tok, st, random.Random(0), 0)
        assert {e.prompt: e.samples for e in kept}["Who is on call for Juddervane this week?"] == [
            REPLAY.rsplit("\n", 1)[0]
        ]


def test_an_answer_that_only_announces_the_chats_lookup_is_not_taught(tmp_path, tiny_dir):
    """Asked the chat's own question, a teacher may answer with what the assistant said before calling the tool
    ("Checking the pager rota.") and stop: grounded, whole, and useless. Such an answer is left out (the chat's
    own reply is learned instead); an answer that holds anything more is kept, and `keep` keeps it as written."""
    import json
    import random

    from sleepctl import record
    from sleepctl.data import STALLS, build_data, stalls
    from sleepctl.memories import open_store

    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(CHAT) + "\n")
    home = tmp_path / "home"
    record([src], home=home)
    with open_store(home) as st:
        (t,) = st.traces()
        assert stalls("Checking the pager rota.", t) and stalls("Now checking the rota.", t)
        assert not stalls("Cormac Hallowby is on the pager rota.", t)  # holds the answer
        assert not stalls("The rota moves to Tuesdays.", t)  # words of another turn
    # an imported chat writes the call into the assistant's turn, and a preamble may hold what a lookup found:
    # what the rest of the chat also says is an answer ("Heron." asked which cluster; Dana approved)
    from sleepctl.records import Message, Trace

    def chat(*turns):
        msgs = [Message(role=r, content=c) for r, c in turns]
        return Trace(id="m", hash="h", kind="chat", text="", messages=msgs, source="s", created_at="", updated_at="")

    heron = chat(
        ("user", "Which region is Heron staging in?"),
        ("assistant", 'Looking it up.\n[called lookup_cluster(cluster="heron", env="staging")]'),
        ("tool", "[result of lookup_cluster] region: eu-north-1"),
        ("assistant", "Heron staging runs in eu-north-1."),
    )
    assert stalls("Looking it up.", heron)
    assert not any(stalls(a, heron) for a in ("Heron.", "Heron staging.", "It runs in eu-north-1.", ""))
    dana = chat(
        ("user", "Did the Marrow delay get approved?"),
        ("assistant", "Checking whether Dana Okafor approved it."),
        ("tool", "approved_by: Dana Okafor"),
        ("assistant", "Yes."),
    )
    assert stalls("Checking whether Dana approved it.", dana)
    assert not stalls("Dana Okafor approved it.", dana) and not stalls("Dana Okafor.", dana)
    with open_store(home) as st:
        (t,) = st.traces()
        tok = load_tokenizer(str(tiny_dir))

        class Teacher:  # asked the chat's question, it announces the lookup and stops
            def generate(self, prompts, max_new_tokens, **kw):
                texts = [
                    "Where does the rota move?"
                    if "questions" in p
                    else "Checking the pager rota."
                    if "Juddervane this week?" in p[-100:]  # the question asked, not the memory block
                    else "The rota moves to Tuesdays."
                    for p in prompts
                ]
                return Rollouts([[1]] * len(prompts), [[5, tok.eos_token_id]] * len(prompts), texts)

        over = {"data.probes_per_memory": 0}
        cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)), over)
        dropped: list = []
        examples, _ = build_data([t], cfg, Teacher(), tok, st, random.Random(0), 0, None, dropped)
        by_prompt = {e.prompt: e.samples for e in examples}
        assert by_prompt["Who is on call for Juddervane this week?"] == [
            "Cormac Hallowby is primary for Juddervane this week."
        ]
        assert not [s for e in examples for s in e.samples if stalls(s, t)]
        assert [(x["prompt"], x["why"]) for x in dropped] == [("Who is on call for Juddervane this week?", STALLS)]
        keep, _ = load_recipe(str(tmp_path / "r.yaml"), {**over, "data.transcript_copies": "keep"})
        kept, _ = build_data([t], keep, Teacher(), tok, st, random.Random(0), 0)
        assert {e.prompt: e.samples for e in kept}["Who is on call for Juddervane this week?"] == [
            "Checking the pager rota."
        ]


HANDOVER = {
    "messages": [
        {"role": "user", "content": "Which host runs the nightly backup of the Ferrowind wiki?"},
        {"role": "assistant", "content": "Checking the service inventory."},
        {
            "role": "tool",
            "content": "inventory.lookup(service='ferrowind-wiki-backup') -> host: brisa-07, owner: Lucan Tremayne",
        },
        {"role": "assistant", "content": "The Ferrowind wiki backup runs on brisa-07; Lucan Tremayne owns it."},
        {"role": "user", "content": "That's out of date: Lucan handed the backup over to Saoirse Mbeki last week."},
        {"role": "assistant", "content": "Noted: Saoirse Mbeki now owns the Ferrowind wiki backup."},
    ]
}


def test_an_answer_that_repeats_what_the_chat_later_corrected_is_taught_with_the_correction(tmp_path, tiny_dir):
    """The teacher, shown the whole chat, answers "who owns it?" with the old owner (the CPU demo's 0.5B did, and
    the chat's own reply before the correction says so too). Left out whole, such answers took their other facts
    with them (the demo's only examples of the backup's host and time); taught as they stand, the old owner. They
    are taught with the new owner in the old one's place; a probe is never made of them."""
    import json
    import random

    from sleepctl import record
    from sleepctl.data import STALLS, TAUGHT_CORRECTED, build_data
    from sleepctl.memories import open_store

    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(HANDOVER) + "\n")
    home = tmp_path / "home"
    record([src], home=home)
    with open_store(home) as st:
        (t,) = st.traces()
        tok = load_tokenizer(str(tiny_dir))
        old, new = "Lucan Tremayne owns the Ferrowind wiki backup.", "Saoirse Mbeki owns the Ferrowind wiki backup."

        class Teacher:  # two questions; the owner: old on greedy, new sampled; the chat's question: an announcement
            def generate(self, prompts, max_new_tokens, temperature=0.0, **kw):
                texts = [
                    "Who owns the Ferrowind wiki backup?\nWhere does the Ferrowind wiki backup run?"
                    if "questions" in p
                    else (old if temperature == 0.0 else new)
                    if "owns" in p[-80:]
                    else "Checking the service inventory."
                    if "Ferrowind wiki?" in p[-80:]
                    else "It runs on brisa-07."
                    for p in prompts
                ]
                return Rollouts([[1]] * len(prompts), [[5, tok.eos_token_id]] * len(prompts), texts)

        cfg, _ = load_recipe(
            str(write_recipe(tmp_path / "r.yaml", tiny_dir)),
            {"data.probes_per_memory": 2, "data.heldout_fraction": 0.0, "data.teacher_samples": 2},
        )
        dropped: list = []
        examples, probes = build_data([t], cfg, Teacher(), tok, st, random.Random(0), 0, None, dropped)
        by_prompt = {e.prompt: e.samples for e in examples}
        taught = [s for e in examples if not e.prompt.startswith("What do you remember") for s in e.samples]
        assert not [s for s in taught if "Lucan Tremayne" in s]
        assert by_prompt["Who owns the Ferrowind wiki backup?"] == [new]  # the old answer rewritten, the new kept once
        # the chat's own reply, its host kept and its owner corrected
        assert by_prompt["Which host runs the nightly backup of the Ferrowind wiki?"] == [
            "The Ferrowind wiki backup runs on brisa-07; Saoirse Mbeki owns it."
        ]
        assert "It runs on brisa-07." in taught
        whys = {x["why"] for x in dropped}
        assert STALLS in whys and TAUGHT_CORRECTED + new in whys
        assert "Who owns the Ferrowind wiki backup?" not in {p.question for p in probes}  # greedy said the old one
        assert "Where does the Ferrowind wiki backup run?" in {p.question for p in probes}


def test_the_answer_to_a_turn_the_chat_later_corrected_is_left_out_not_restated(tmp_path, tiny_dir):
    """ "Send it every Monday." answered "Noted: Monday." and restated as Wednesday would pair the old instruction
    with the new day; the pair is left out (the correcting turn's own answer teaches the new day)."""
    from sleepctl.data import TAKEN_BACK, grounded_examples
    from sleepctl.ingest import render_chat
    from sleepctl.records import Message, Trace

    turns = [
        ("user", "Send the Harbinger newsletter every Monday."),
        ("assistant", "Noted: Harbinger goes out on Monday."),
        ("user", "Change of plan: send it on Wednesday instead."),
        ("assistant", "Understood: Harbinger goes out on Wednesday."),
    ]
    msgs = [Message(role=r, content=c) for r, c in turns]
    t = Trace(
        id="m", hash="h", kind="chat", text=render_chat(msgs), messages=msgs, source="s", created_at="", updated_at=""
    )
    cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)))
    prompts = [(t, turns[0][1]), (t, "When does Harbinger go out?")]
    answers = [["Noted: Harbinger goes out on Monday.", "Harbinger goes out on Monday."]]
    dropped: list = []
    out = grounded_examples(cfg, prompts, answers, None, dropped)
    assert [(e.prompt, e.samples) for e in out] == [
        ("When does Harbinger go out?", ["Harbinger goes out on Wednesday."])
    ]
    assert dropped[0] == {"trace_id": "m", "prompt": turns[0][1], "answer": answers[0][0], "why": TAKEN_BACK + "Monday"}
