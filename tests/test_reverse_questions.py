"""Reverse questions: a memory's facts also asked from the answer's side ("who moved the Kestrel server?" beside
"where did Orla Brennick move it?"), with the guards that keep them useful and keep held-out probes unseen."""

from __future__ import annotations

import json
import random
import re

import pytest

from sleepctl import record
from sleepctl.data import build_data, reverse_targets
from sleepctl.engines import Rollouts
from sleepctl.errors import SleepError
from sleepctl.memories import open_store
from sleepctl.models import load_tokenizer
from sleepctl.recipe import load_recipe

from .conftest import write_recipe

NOTE = {
    "text": "Orla Brennick moved the Kestrel build server from Dublin to the Tallinn data centre on day 14.",
    "probes": [{"question": "Who moved the Kestrel build server?", "answer": "Orla Brennick"}],
}
TARGET = re.compile(r'whose answer is "([^"]+)"')
SUBJECT_SIDE = "Where did Orla Brennick move the Kestrel build server?"
# per target: a question from the answer's side, and the teacher's answer to it (the Tallinn one misses it)
REVERSE = {
    "Orla Brennick": ("Which engineer relocated the Kestrel machine?", "Orla Brennick did."),
    "Kestrel": ("Which build server did Orla Brennick relocate?", "The Kestrel build server."),
    "Dublin": ("Where was the Kestrel machine hosted before?", "In Dublin."),
    "Tallinn": ("In which city is the Kestrel machine hosted now?", "It is in Dublin."),
    "14": ("On what day did the Kestrel move happen?", "On day 14."),
}


WHOLE = "Orla Brennick moved it from Dublin to Tallinn on day 14."  # holds every target
NEAR_SUBJECT = "Where did Orla Brennick move the Kestrel build server to?"  # token F1 0.95 with SUBJECT_SIDE
NEAR_PROBE = "Who moved the Kestrel build server, then?"  # token F1 0.92 with the user's held-out probe


class Teacher:
    """Scripted: a subject-side question; per target, a question that names its answer, the held-out probe's own
    words, a near-copy of the subject-side question, a near-copy of the probe, and one new question from the
    answer's side. Every answer holds every target but the Tallinn question's: only the guards drop the copies."""

    def __init__(self):
        self.reverse_asks: list[str] = []

    def generate(self, prompts, max_new_tokens, **kw):
        texts = []
        for p in prompts:
            m = TARGET.search(p)
            if m:
                v = m.group(1)
                self.reverse_asks.append(v)
                texts.append(
                    f"Is the answer {v}?\nWho moved the Kestrel build server?\n{NEAR_SUBJECT}\n{NEAR_PROBE}\n"
                    f"{REVERSE[v][0]}"
                )
            elif "Write" in p and "questions" in p:
                texts.append(SUBJECT_SIDE)
            else:
                hit = [a for q, a in REVERSE.values() if q in p]
                texts.append(hit[0] if hit else WHOLE)
        n = len(prompts)
        return Rollouts([[1]] * n, [[5]] * n, texts)


def _build(tmp_path, tiny_dir, notes=(NOTE,), **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "note.jsonl"
    src.write_text("".join(json.dumps(n) + "\n" for n in notes))
    home = tmp_path / "home"
    record([src], home=home)
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    over = {"data.probes_per_memory": 0, **{f"data.{k}": v for k, v in data.items()}}
    cfg, _ = load_recipe(str(rcp), over)
    tok = load_tokenizer(str(tiny_dir))
    teacher = Teacher()
    with open_store(home) as st:
        t = st.traces()[0]
        examples, probes = build_data([t], cfg, teacher, tok, st, random.Random(0), 0)
    return t, examples, teacher, probes


def test_reverse_questions_ask_for_each_name_and_value_and_keep_answers_that_hold_it(tmp_path, tiny_dir):
    t, examples, teacher, _ = _build(tmp_path, tiny_dir, reverse_questions=6)
    targets = reverse_targets(t)
    assert targets == ["Orla Brennick", "Kestrel", "Dublin", "Tallinn", "14"]
    assert teacher.reverse_asks == targets  # one request per name and value
    by_prompt = {e.prompt: e.samples for e in examples}
    for v in ("Orla Brennick", "Kestrel", "Dublin", "14"):
        q, a = REVERSE[v]
        assert by_prompt[q] == [a]
    # an answer that does not hold the name it was asked for teaches nothing
    assert REVERSE["Tallinn"][0] not in by_prompt
    # a question that states its own answer asks nothing
    assert not [p for p in by_prompt if p.startswith("Is the answer")]
    # the user's held-out probe never trains, in its own words or nearly
    assert "Who moved the Kestrel build server?" not in by_prompt
    assert NEAR_PROBE not in by_prompt
    # a near-copy of a prompt already kept adds no phrasing
    assert NEAR_SUBJECT not in by_prompt
    assert by_prompt[SUBJECT_SIDE] == [WHOLE]


def test_the_overlap_guard_is_what_drops_near_copies(tmp_path, tiny_dir):
    _, loose, _, _ = _build(tmp_path, tiny_dir, reverse_questions=6, max_prompt_overlap=1.0)
    prompts = {e.prompt for e in loose}
    assert {NEAR_SUBJECT, NEAR_PROBE} <= prompts  # only exact copies go at 1.0
    assert "Who moved the Kestrel build server?" not in prompts


def test_a_held_out_teacher_probe_is_guarded_like_a_users(tmp_path, tiny_dir):
    # the subject-side question becomes a held-out teacher probe: it and its near-copy never train
    _, examples, _, probes = _build(tmp_path, tiny_dir, reverse_questions=6, probes_per_memory=1, heldout_fraction=1.0)
    assert [(p.question, p.split) for p in probes] == [(SUBJECT_SIDE, "heldout")]
    prompts = {e.prompt for e in examples}
    assert SUBJECT_SIDE not in prompts and NEAR_SUBJECT not in prompts
    assert REVERSE["Orla Brennick"][0] in prompts


def test_a_value_a_newer_memory_replaced_is_not_asked_for(tmp_path, tiny_dir):
    newer = {"text": "Correction: the Kestrel server move happened on day 21, not earlier."}
    src = tmp_path / "two.jsonl"
    src.write_text(json.dumps(NOTE) + "\n" + json.dumps(newer) + "\n")
    record([src], home=tmp_path / "home")
    with open_store(tmp_path / "home") as st:
        old, new = sorted(st.traces(), key=lambda x: (x.created_at, x.id))
    assert "14" in reverse_targets(old)
    assert "14" not in reverse_targets(old, [new])  # the teacher, seeing day 21, would rightly not say 14
    assert "Orla Brennick" in reverse_targets(old, [new])


def test_zero_reverse_questions_asks_for_none(tmp_path, tiny_dir):
    _, none, teacher, _ = _build(tmp_path, tiny_dir, reverse_questions=0)
    assert teacher.reverse_asks == []
    assert not {q for q, _ in REVERSE.values()} & {e.prompt for e in none}


@pytest.mark.parametrize(
    "key,value", [("data.reverse_questions", -1), ("data.reverse_questions", 9), ("data.max_prompt_overlap", 0)]
)
def test_bad_reverse_settings_are_refused_when_the_recipe_is_read(tmp_path, tiny_dir, key, value):
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    with pytest.raises(SleepError, match=key.split(".")[1]):
        load_recipe(str(rcp), {key: value})
