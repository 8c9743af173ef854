"""What a recorded chat takes back itself: found with what replaced it, and never taught, probed or dreamt.

Chats state many values of one form that replace nothing, and ask questions with "instead" or "wrong" in them;
the false positives below each dropped good answers in a first version (a review's cases).
"""

from __future__ import annotations

import pytest

from sleepctl.corrections import TakenBack, corrected, restated, states_corrected
from sleepctl.ingest import render_chat
from sleepctl.records import Message, Trace

U, A, T = "user", "assistant", "tool"


def chat(*turns: tuple[str, str]) -> Trace:
    msgs = [Message(role=r, content=c) for r, c in turns]
    text = render_chat(msgs)
    return Trace(id="m", hash="h", kind="chat", text=text, messages=msgs, source="s", created_at="", updated_at="")


def replaced(trace: Trace) -> dict[str, set[str]]:
    return {v: set(tb.by) for v, tb in corrected(trace).items()}


HANDOVER = chat(
    (U, "Which host runs the nightly backup of the Ferrowind wiki?"),
    (A, "Checking the service inventory."),
    (T, "inventory.lookup(service='ferrowind-wiki-backup') -> host: brisa-07, owner: Lucan Tremayne"),
    (A, "The Ferrowind wiki backup runs on brisa-07; Lucan Tremayne owns it."),
    (U, "That's out of date: Lucan handed the backup over to Saoirse Mbeki last week."),
    (A, "Noted: Saoirse Mbeki now owns the Ferrowind wiki backup."),
)
NEWSLETTER = chat(
    (U, "Send the Harbinger newsletter every Monday."),
    (A, "Noted: Harbinger goes out on Monday."),
    (U, "Change of plan: send it on Wednesday instead."),
)

TAKEN_BACK = [
    (HANDOVER, {"Lucan Tremayne": {"Saoirse Mbeki"}}),
    (NEWSLETTER, {"Monday": {"Wednesday"}}),
    (chat((U, "The API allows 340 per minute."), (U, "Sorry, that's wrong: it is 520 per minute.")), {"340": {"520"}}),
    # only the value whose clause the correction is about: the retro keeps its time
    (
        chat((U, "Standup is at 9:30 and the retro at 14:00."), (U, "Correction: standup is at 10:05.")),
        {"9:30": {"10:05"}},
    ),
    # the old value named only to deny it, in the correction or in the reply to it
    (chat((U, "Send it every Monday."), (U, "Send it on Wednesday instead of Monday.")), {"Monday": {"Wednesday"}}),
    (chat((U, "Ship it on Monday."), (U, "Ship it on Friday rather than Monday.")), {"Monday": {"Friday"}}),
    (
        chat((U, "The API allows 340 per minute."), (U, "It's not 340 per minute any more, it's 520 per minute.")),
        {"340": {"520"}},
    ),
    (
        chat(
            (U, "Lucan Tremayne owns the backup."),
            (U, "That's out of date: Saoirse Mbeki owns it now."),
            (A, "Noted: Saoirse Mbeki, not Lucan Tremayne, owns it."),
        ),
        {"Lucan Tremayne": {"Saoirse Mbeki"}},
    ),
    (
        chat((U, "Standup is on Monday."), (U, "Correction: it moved from Monday to Wednesday.")),
        {"Monday": {"Wednesday"}},
    ),
]

NOTHING_TAKEN_BACK = [
    # questions ask, they do not correct
    chat((U, "Dana Okafor approved the Quokka migration."), (A, "Noted."), (U, "Any more news from Orla Brennick?")),
    chat((U, "Build 4412 of Kestrel failed on Monday."), (U, "What went wrong with build 4413 on Tuesday?")),
    chat((U, "Dana Okafor approved the Lanternfish PR."), (U, "Should we use Google Cloud instead?")),
    chat((U, "Rack 12 has 40 disks."), (U, "Which disks were replaced in rack 14?")),
    # a name the chat already used ("Ferrowind wiki") is not a new owner
    chat(
        (U, "Lucan Tremayne runs the Ferrowind wiki."),
        (U, "That's out of date: the Ferrowind Wiki moved to a new host."),
    ),
    # "instead of" something that is no earlier value
    chat((U, "Book the Thursday train."), (U, "Also book a hotel for Friday instead of driving back.")),
    # a second booking's time corrects nothing
    chat(
        (U, "Book the Thursday train to Valdemoro."),
        (T, "rail.book(day='Thursday') -> departs 09:12"),
        (U, "And a return on Friday, please."),
        (T, "rail.book(day='Friday') -> departs 18:40"),
    ),
    chat((U, "Rack 12 has 40 disks."), (U, "Dana replaced the disks in rack 14.")),
    # the old value stays true beside the new one
    chat((U, "Standup is on Monday."), (U, "Correction: standup is on Monday and the demo on Wednesday.")),
    chat((U, "Send it on Monday.")),
    chat(
        (A, "Send it on Monday."), (A, "Actually, Wednesday instead.")
    ),  # the assistant's own turns are not the user's word
]


@pytest.mark.parametrize("trace,expected", TAKEN_BACK)
def test_a_value_a_later_user_sentence_corrects_is_taken_back_with_its_replacement(trace, expected):
    assert replaced(trace) == expected


@pytest.mark.parametrize("trace", NOTHING_TAKEN_BACK)
def test_questions_new_values_and_values_that_stay_true_take_nothing_back(trace):
    assert corrected(trace) == {}


def test_a_text_states_a_taken_back_value_only_without_its_replacement():
    owner, day = corrected(HANDOVER), corrected(NEWSLETTER)
    assert states_corrected("Lucan Tremayne owns the Ferrowind wiki backup.", owner) == ["Lucan Tremayne"]
    assert states_corrected("It goes out on Mondays.", day) == ["Monday"]  # as a reader writes it
    # the change itself, and other facts, state nothing stale
    assert not states_corrected("Lucan Tremayne handed it over to Saoirse Mbeki.", owner)
    assert not states_corrected("It moved from Monday to Wednesday.", day)
    assert not states_corrected("It runs on brisa-07.", owner)


def test_a_taken_back_value_is_restated_as_its_one_replacement():
    owner, day = corrected(HANDOVER), corrected(NEWSLETTER)
    reply = "The Ferrowind wiki backup runs on brisa-07; Lucan Tremayne owns it."
    assert restated(reply, owner) == "The Ferrowind wiki backup runs on brisa-07; Saoirse Mbeki owns it."
    assert restated("Lucan Tremayne's backup runs nightly.", owner) == "Saoirse Mbeki's backup runs nightly."
    assert restated("Harbinger goes out on Mondays in teal.", day) == "Harbinger goes out on Wednesdays in teal."
    assert restated("It runs on brisa-07.", owner) == "It runs on brisa-07."  # nothing to restate
    assert restated("Lucan Tremayne handed it to Saoirse Mbeki.", owner) == "Lucan Tremayne handed it to Saoirse Mbeki."
    # a chain of corrections ends at the last one
    chain = chat(
        (U, "Send the Harbinger newsletter on Monday."),
        (U, "Change of plan: send it on Wednesday instead."),
        (U, "Scratch that: send it on Friday instead of Wednesday."),
    )
    assert restated("Harbinger is sent on Monday.", corrected(chain)) == "Harbinger is sent on Friday."


def test_no_restatement_where_it_would_not_be_the_correction():
    owner = corrected(HANDOVER)
    tb = owner["Lucan Tremayne"]
    several = {"Lucan Tremayne": TakenBack(frozenset({"Saoirse Mbeki", "Dana Okafor"}), tb.forms, tb.words)}
    assert restated("Lucan Tremayne owns the backup.", several) is None
    # the same name in a clause about something else: not the owner's role
    assert restated("Lucan Tremayne owns the backup; Lucan Tremayne reviews the Kestrel designs.", owner) is None
    limit = corrected(chat((U, "The API allows 340 per minute."), (U, "Sorry, that's wrong: it is 520 per minute.")))
    assert restated("The API allows 340 per minute.", limit) == "The API allows 520 per minute."
    assert restated("The API allows 340 per minute; see ticket 340.", limit) is None  # the same number, no unit
    assert restated("The API allows 1,340 per minute.", limit) == "The API allows 1,340 per minute."  # another number
    second = {"2": TakenBack(frozenset({"9"}), frozenset({"9"}), frozenset({"ships"}))}
    assert restated("It ships on the 2nd of May.", second) is None  # "the 2nd" is not rewritten


def test_a_long_chat_is_read_in_one_pass():
    """Imported chats run to hundreds of turns, many of them with a cue word; the answers of each are checked against
    one reading (a first version re-read every earlier turn per correction and per answer: 4 s per answer)."""
    names = ["Dana Okafor", "Orla Brennick", "Lucan Tremayne", "Saoirse Mbeki", "Ignatius Fairweather"]
    turns = []
    for i in range(400):
        if i % 4 == 0:
            turns.append(
                (U, f"Correction: build {1000 + i} runs at {i % 24}:{i % 60:02d}, owned by {names[i % 5]} instead.")
            )
        else:
            turns.append((A if i % 2 else U, f"Noted, service s{i} runs {i} per minute with {names[(i + 1) % 5]}."))
    calls = {"n": 0}
    import sleepctl.corrections as c

    real = c._slots

    def counting(text):
        calls["n"] += 1
        return real(text)

    c._slots = counting
    try:
        corrected(chat(*turns))
    finally:
        c._slots = real
    # each turn and each clause once, each correcting sentence once: linear in the chat, not quadratic
    assert calls["n"] < 20 * len(turns)


def test_reverse_questions_do_not_ask_for_what_the_chat_took_back():
    from sleepctl.data import reverse_targets

    targets = reverse_targets(HANDOVER)
    assert "Lucan Tremayne" not in targets and "Saoirse Mbeki" in targets


def test_a_dream_or_a_qa_pair_that_repeats_a_taken_back_value_is_not_used():
    from sleepctl.dream import grounded_dream

    source = HANDOVER.text
    taken = corrected(HANDOVER)
    stale = grounded_dream("rephrase", "Lucan Tremayne owns the Ferrowind wiki backup on brisa-07.", source, taken)
    assert stale["taken_back"] == ["Lucan Tremayne"]
    fine = grounded_dream("rephrase", "Saoirse Mbeki owns the Ferrowind wiki backup on brisa-07.", source, taken)
    assert fine["taken_back"] == [] and fine["grounded"]
    qa = "Q: Who owns the Ferrowind wiki backup?\nA: Lucan Tremayne.\nQ: Where does it run?\nA: On brisa-07."
    got = grounded_dream("qa", qa, source, taken)
    assert got["pairs"] == [["Where does it run?", "On brisa-07."]] and got["pairs_dropped"] == 1
