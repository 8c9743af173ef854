"""Reverse questions: a memory's facts also asked from the answer's side ("who moved the Kestrel server?" beside
"where did Orla Brennick move it?"), with the guards that keep them useful and keep held-out probes unseen."""

from __future__ import annotations

import json
import random
import re

import pytest

from sleepctl import record
from sleepctl.data import build_data, reverse_questions, reverse_targets
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


class Teacher:
    """Scripted: a subject-side question; per target, a question that names its answer, a copy of the held-out
    probe, a near-copy of the subject-side question, and one new question from the answer's side."""

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
                    f"Is the answer {v}?\nWho moved the Kestrel build server?\n"
                    f"Where did Orla Brennick move the Kestrel build server to?\n{REVERSE[v][0]}"
                )
            elif "Write" in p and "questions" in p:
                texts.append(SUBJECT_SIDE)
            else:
                hit = [a for q, a in REVERSE.values() if q in p]
                texts.append(hit[0] if hit else "Orla Brennick moved it to Tallinn.")
        n = len(prompts)
        return Rollouts([[1]] * n, [[5]] * n, texts)


def _build(tmp_path, tiny_dir, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "note.jsonl"
    src.write_text(json.dumps(NOTE) + "\n")
    home = tmp_path / "home"
    record([src], home=home)
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    cfg, _ = load_recipe(str(rcp), {"data.probes_per_memory": 0, **{f"data.{k}": v for k, v in data.items()}})
    tok = load_tokenizer(str(tiny_dir))
    teacher = Teacher()
    with open_store(home) as st:
        (t,) = st.traces()
        examples, _ = build_data([t], cfg, teacher, tok, st, random.Random(0), 0)
    return t, examples, teacher


def test_reverse_questions_ask_for_each_name_and_value_and_keep_answers_that_hold_it(tmp_path, tiny_dir):
    t, examples, teacher = _build(tmp_path, tiny_dir, reverse_questions=4)
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
    # a copy of a held-out probe would train that probe: the user's held-out question never trains
    assert "Who moved the Kestrel build server?" not in by_prompt
    # a near-copy of a prompt already kept adds no phrasing (token F1 0.95 against the subject-side question)
    assert "Where did Orla Brennick move the Kestrel build server to?" not in by_prompt
    assert SUBJECT_SIDE in by_prompt


def test_zero_reverse_questions_asks_for_none_and_a_loose_guard_lets_near_copies_in(tmp_path, tiny_dir):
    _, none, teacher = _build(tmp_path / "a", tiny_dir, reverse_questions=0)
    assert teacher.reverse_asks == []
    assert not {q for q, _ in REVERSE.values()} & {e.prompt for e in none}
    # only exact copies are dropped at 1.0: the near-copy is asked (for the first target it does not name), the
    # held-out probe's own words still are not
    t, _, _ = _build(tmp_path / "b", tiny_dir)
    cfg, _ = load_recipe(
        str(write_recipe(tmp_path / "r.yaml", tiny_dir)),
        {"data.reverse_questions": 4, "data.max_prompt_overlap": 1.0},
    )
    asked = reverse_questions(
        [t],
        [(t, SUBJECT_SIDE)],
        {"Who moved the Kestrel build server?"},
        cfg,
        Teacher(),
        load_tokenizer(str(tiny_dir)),
        0,
    )
    pairs = asked[t.id]
    assert ("Where did Orla Brennick move the Kestrel build server to?", "Dublin") in pairs
    assert not [q for q, _ in pairs if q == "Who moved the Kestrel build server?"]


@pytest.mark.parametrize(
    "key,value", [("data.reverse_questions", -1), ("data.reverse_questions", 9), ("data.max_prompt_overlap", 0)]
)
def test_bad_reverse_settings_are_refused_when_the_recipe_is_read(tmp_path, tiny_dir, key, value):
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    with pytest.raises(SleepError, match=key.split(".")[1]):
        load_recipe(str(rcp), {key: value})
