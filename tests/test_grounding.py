"""Teacher answers that state a name or value their memory lacks are not trained (data.grounded_only)."""

from __future__ import annotations

from sleepctl.data import grounded_examples
from sleepctl.recipe import load_recipe
from sleepctl.records import Trace

from .conftest import write_recipe

BERYL = (
    "The Beryl Falls hackathon was won by team Paper Lantern with an offline translation tool. "
    "The prize was a trip to the Zerlina robotics lab."
)
HALBERD = (
    "user: Our on-call rotation for the Halberd payments API changed: Tomasz Verhoeven takes weekdays and Imani "
    "Castellano takes weekends.\nassistant: Got it: Tomasz Verhoeven is on call for Halberd on weekdays, Imani "
    "Castellano on weekends."
)


def _trace(i: str, text: str) -> Trace:
    w = "2026-11-01T09:00:00"
    return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=w, updated_at=w)


def test_answers_with_a_made_up_year_or_place_are_dropped_faithful_ones_kept(tmp_path, tiny_dir):
    """Answers the 1.5B (self teacher) and the 0.5B wrote on an H200 for examples/ memories: each of the made-up
    ones passes the content-word check (most of its words are the memory's) and is dropped by the name check."""
    beryl, halberd = _trace("a", BERYL), _trace("b", HALBERD)
    prompts = [
        (beryl, "When was the Beryl Falls hackathon held?"),
        (beryl, "What do you know about Paper Lantern?"),
        (halberd, "Who is on call for Halberd on weekends?"),
    ]
    answers = [  # teacher_samples 2: answers[k][i] is sample k of prompt i
        [
            "The Beryl Falls hackathon was held in 2019.",
            "Paper Lantern is a team that won the Beryl Falls hackathon with an offline translation tool.",
            "According to memory 2, Imani Castellano is on call for Halberd on weekends.",
        ],
        [
            "The Beryl Falls hackathon was won by team Paper Lantern in Fort Worth, Texas.",
            "Paper Lantern won the Beryl Falls hackathon in 2018 with an offline translation tool.",
            "Imani Castellano takes the Halberd weekends.",
        ],
    ]
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    on, _ = load_recipe(str(rcp), {"data.grounded_only": True})
    kept = {e.prompt: e.samples for e in grounded_examples(on, prompts, answers)}
    assert "When was the Beryl Falls hackathon held?" not in kept  # both of its answers made up a year or place
    assert kept["What do you know about Paper Lantern?"] == [answers[0][1]]
    # "According to memory 2, " cites a memory block the student will not have: the citation goes, the fact stays
    assert kept["Who is on call for Halberd on weekends?"] == [
        "Imani Castellano is on call for Halberd on weekends.",
        "Imani Castellano takes the Halberd weekends.",
    ]

    # what the teacher saw beside the memory counts as its source: a newer memory's value is no invention
    seen = {beryl.id: BERYL + "\nThe next Beryl Falls hackathon is in 2019."}
    kept = {e.prompt: e.samples for e in grounded_examples(on, prompts[:1], [a[:1] for a in answers], seen)}
    assert kept["When was the Beryl Falls hackathon held?"] == [answers[0][0]]

    off, _ = load_recipe(str(rcp), {"data.grounded_only": False})
    assert sum(len(e.samples) for e in grounded_examples(off, prompts, answers)) == 6


def test_a_known_name_in_its_plural_or_singular_is_no_invention():
    from sleepctl.grounding import invented

    assert invented("Ilse starts violin lessons on Saturdays.", "Ilse has lessons on Saturday mornings.") == []
    assert invented("No deploys on a Friday after 4 pm.", "No production deploys after 4 pm on Fridays.") == []
    made_up = invented("Ilse starts lessons with Edmund Pemberton.", "Ilse has lessons on Saturday mornings.")
    assert made_up == ["Edmund Pemberton"]


def test_the_reviewers_rewritings_of_a_memorys_names_and_values_are_not_inventions():
    """How a faithful answer restates a memory: none of these is a made-up name or value."""
    from sleepctl.grounding import invented

    faithful = [
        ("Your Halberd payments API is covered by Tomasz.", "Tomasz covers the Halberd payments API."),
        ("Call Imani Castellano on weekends.", "Imani Castellano takes weekends."),
        ("Yes, I'm sure it is Tomasz.", "Tomasz takes weekdays."),
        ("It runs on a Tallinn-based server.", "The server moved to Tallinn."),
        ("The release is due March 14, 2026.", "Release date: 2026-03-14."),
        ("There are 3 engineers on the team.", "three engineers joined the team"),
        ("Production runs version 4.18.0.", "Production runs v4.18.0 now."),
        ("The pipeline runs at 2:30 PM.", "The pipeline runs at 14:30."),
        ("The standup is at 9 AM.", "Standup moved to 9:00."),
        ("The booking reference is QX-5530.", "reference QX-5530, coach 6"),  # a code the memory holds, whole
        ("Room G-41 is free.", "The spectrometer moved out of room G-41 (ticket INC-778)."),
        ("The booking is QX-5530.", "rail.book() -> ref:QX-5530"),
        ("The booking is QX-5530.", "booking eu-qx-5530 confirmed"),
    ]
    assert [t for t, s in faithful if invented(t, s)] == []
    made_up = [
        ("The hackathon was held in 2019.", "The Beryl Falls hackathon was won by Paper Lantern.", ["2019"]),
        ("Stormpetrel is based in Germany.", "The Stormpetrel robot arm failed calibration.", ["Germany"]),
        ("According to memory 2, Tomasz is on call.", "Tomasz is on call.", ["2"]),
        ("The pipeline runs at 3:30 PM.", "The pipeline runs at 14:30.", ["3:30"]),
        ("The booking reference is QX-5531.", "reference QX-5530, coach 6", ["QX-5531"]),
        ("It is in room GX-41.", "The spectrometer is in room G-41.", ["GX-41"]),
    ]
    assert [invented(t, s) for t, s, _ in made_up] == [want for _, _, want in made_up]


def test_seed_data_checks_an_answer_against_every_memory_the_teacher_saw(tmp_path, tiny_dir):
    """An earlier memory is answered with a newer related one in view: the newer value is no invention and is
    kept; a value neither memory holds is dropped."""
    import random

    from sleepctl import record
    from sleepctl.data import build_data
    from sleepctl.engines import Rollouts
    from sleepctl.memories import open_store
    from sleepctl.models import load_tokenizer

    src = tmp_path / "m.jsonl"
    src.write_text(
        '{"text": "The Quillmere standup is at 9:30 in room Umberlight."}\n'
        '{"text": "The Quillmere standup moved to 10:05."}\n'
    )
    home = tmp_path / "home"
    record([src], home=home)

    class Teacher:
        def generate(self, prompts, max_new_tokens, temperature, seed, **kw):
            if "questions" in prompts[0]:
                texts = ["When is the Quillmere standup?"] * len(prompts)
            elif temperature == 0.0:
                texts = ["The Quillmere standup is now at 10:05 in room Umberlight."] * len(prompts)
            else:
                texts = ["The Quillmere standup is at 11:45 in room Umberlight."] * len(prompts)
            return Rollouts([[1]] * len(prompts), [[5]] * len(prompts), texts)

    cfg, _ = load_recipe(
        str(write_recipe(tmp_path / "r.yaml", tiny_dir)),
        {"data.grounded_only": True, "data.teacher_samples": 2, "data.probes_per_memory": 0},
    )
    with open_store(home) as st:
        traces = st.traces()
        old = next(t for t in traces if "9:30" in t.text)
        new = next(t for t in traces if "10:05" in t.text)
        assert "9:30" in old.text and "10:05" in new.text
        dropped: list[dict] = []
        examples, _ = build_data(
            [old], cfg, Teacher(), load_tokenizer(str(tiny_dir)), st, random.Random(0), 0, {old.id: [new]}, dropped
        )
    asked = {e.prompt: e.samples for e in examples}["When is the Quillmere standup?"]
    assert asked == ["The Quillmere standup is now at 10:05 in room Umberlight."]
    # what was left out, and why, for a reader of the run's data.json
    assert {
        "trace_id": old.id,
        "prompt": "When is the Quillmere standup?",
        "answer": "The Quillmere standup is at 11:45 in room Umberlight.",
        "why": "states 11:45",
    } in dropped


PENDLEWICK = "Team Pendlewick's Friday standup is at 9:30 in room Quinceford."
MOVED = "Pernille Vashtenko moved Team Pendlewick's Friday standup to 10:05, same room."


def test_answers_citing_the_memory_block_lose_the_citation_or_are_dropped(tmp_path, tiny_dir):
    """Answers the 1.5B self teacher wrote on an H200 with two dated memories in view; trained as they were, the
    student told a user "According to the most recent memory, ..." closed-book after five nights."""
    from sleepctl.prompts import uncited

    t = _trace("a", PENDLEWICK)
    seen = {t.id: PENDLEWICK + "\n2026-11-29 11:38 " + MOVED}
    q = "What time is Team Pendlewick's Friday standup?"
    answers = [
        ["According to the most recent memory, Team Pendlewick's Friday standup is at 10:05 in room Quinceford."],
        ["The most recent memory, recorded 2026-11-29 11:38, states that the standup is at 10:05."],
        ["The most recent memory is true. Team Pendlewick's Friday standup is now at 10:05, same room."],
        ["Team Pendlewick's Friday standup is at 10:05, as per the second memory."],
    ]
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir)
    on, _ = load_recipe(str(rcp), {"data.grounded_only": True})
    dropped: list[dict[str, str]] = []
    (e,) = grounded_examples(on, [(t, q)], answers, seen, dropped)
    assert e.samples == [
        "Team Pendlewick's Friday standup is at 10:05 in room Quinceford.",
        "The standup is at 10:05.",
        "Team Pendlewick's Friday standup is at 10:05.",
    ]
    assert [d["why"] for d in dropped] == ["talks about its memories"]  # the third: no clause to cut, so dropped

    # no citation to cut: the answer stays as written, a thing named "memory ..." included
    for a in (
        "Based on the memory usage graphs, the leak is in the parser.",
        "From the CRM, Ploverbank renews in May.",
        "In memory of Orla, the lab is named Brennick.",
        "According to the decision note 7, we use Postgres.",
    ):
        assert uncited(a) == a
    # a memory about RAM talks about memory itself: its answers keep the word, and are not dropped for it
    ram = _trace("r", "The build box has 64 GB of memory; memory use peaks at 80% during links.")
    ram_answer = "According to the memory, the build box has 64 GB."
    assert uncited(ram_answer, ram.text) == ram_answer
    (kept,) = grounded_examples(on, [(ram, "How much memory does the build box have?")], [[ram_answer]])
    assert kept.samples == [ram_answer]


def test_a_cut_that_would_leave_a_fragment_or_eat_a_fact_is_not_made():
    """Real and near-real teacher phrasings (H200, this repository's sets) where a cut in the wrong place would
    train garbled text; each is left as written, and `cites_memories` then drops the ones about the block."""
    from sleepctl.prompts import cites_memories, uncited

    # the clause runs on past the comma: left whole, dropped for talking about the memory
    odd = "According to the most recent memory, which was written after the move, Oddvar owns it."
    assert uncited(odd) == odd and cites_memories(odd, PENDLEWICK)
    shows = "The most recent memory shows Cormac Hallowby as primary."  # no "that": the verb's object is the fact
    assert uncited(shows) == shows and cites_memories(shows, PENDLEWICK)
    # a date ends on its digit: the sentence keeps its full stop; "which was recorded on" is part of the citation
    assert uncited("The standup is at 10:05, according to the memory recorded on 2026-11-29.") == (
        "The standup is at 10:05."
    )
    assert uncited("According to the most recent memory, which was recorded on 2026-11-29 11:32, Oddvar owns it.") == (
        "Oddvar owns it."
    )
    assert uncited("The most recent memory states that:\n\nCormac leads.") == "Cormac leads."
    # "information" cites the block only as "the information provided/given"
    for a in (
        "The contact information shows the number 555-1234.",
        "According to the latest security information, the VPN is Moorgate.",
        "Based on the memory usage graphs, the leak is in the parser.",
        "From the CRM, Ploverbank renews in May.",
        "In memory of Orla, the lab is named Brennick.",
        "According to the decision note 7, we use Postgres.",
    ):
        assert uncited(a) == a
    assert uncited("According to the information provided, the code is 3094.") == "The code is 3094."
    assert uncited("According to the memory, iPhone builds run nightly.") == "iPhone builds run nightly."
    # a source that says "memory" (RAM, "saved to memory"): the block named as such is still cut and dropped
    ram = "The build box has 64 GB of memory."
    assert uncited("According to memory 2, the box has 64 GB.", ram) == "The box has 64 GB."
    assert uncited("According to the memory, the box has 64 GB.", ram) == "According to the memory, the box has 64 GB."
    assert cites_memories("As the most recent memory says, 64 GB.", ram)
    assert not cites_memories("The box has 64 GB of memory.", ram)
    # a long run of spaces costs linear time (each of its spaces used to start a new attempt)
    assert uncited("x" + " " * 50_000 + "x") == "x" + " " * 50_000 + "x"


def test_teacher_probes_and_replayed_answers_lose_their_citations(tmp_path, tiny_dir):
    """A teacher probe's answer is what the student is scored against (and trains on, in the train split): it
    loses the citation, and a probe whose answer talks about the memories is not written. Teacher data a home
    stored before the cut loses its citations when it is replayed."""
    import random

    from sleepctl import record
    from sleepctl.data import build_data
    from sleepctl.engines import Rollouts
    from sleepctl.memories import open_store
    from sleepctl.models import load_tokenizer
    from sleepctl.replay import cached_examples

    src = tmp_path / "m.jsonl"
    src.write_text('{"text": "The Quillmere standup is at 10:05 in room Umberlight."}\n')
    home = tmp_path / "home"
    record([src], home=home)

    class Teacher:
        def generate(self, prompts, max_new_tokens, temperature, seed, **kw):
            texts = []
            for p in prompts:
                if "Write" in p and "questions" in p:
                    texts.append("When is the Quillmere standup?\nWhere is the Quillmere standup?")
                elif "When is" in p:
                    texts.append("According to the given memory, the Quillmere standup is at 10:05.")
                else:
                    texts.append("The given memory puts the Quillmere standup in room Umberlight.")
            return Rollouts([[1]] * len(prompts), [[5]] * len(prompts), texts)

    cfg, _ = load_recipe(
        str(write_recipe(tmp_path / "r.yaml", tiny_dir)),
        {"data.grounded_only": True, "data.probes_per_memory": 2, "data.heldout_fraction": 1.0},
    )
    with open_store(home) as st:
        (t,) = st.traces()
        _, probes = build_data([t], cfg, Teacher(), load_tokenizer(str(tiny_dir)), st, random.Random(0), 0)
        assert [(p.question, p.answer) for p in probes if p.origin == "teacher"] == [
            ("When is the Quillmere standup?", "The Quillmere standup is at 10:05.")
        ]

        with st.transaction() as db:
            st.insert_examples(
                db,
                "run_old",
                [
                    (t.id, "When is it?", ["According to memory 1, it is at 10:05.", "It is at 10:05."]),
                    (t.id, "Is that right?", ["The most recent memory is true."]),
                ],
            )
        got = {e.prompt: e.samples for e in cached_examples(st, [t], 1)[t.id]}
    assert got == {"When is it?": ["It is at 10:05."]}


def test_numbers_said_in_words_are_values():
    """ "Thirteen different locations" of a memory that holds no 13 is made up, as "13 locations" would be; a number
    word the memory holds passes in either form, and "one of them" states no value."""
    from sleepctl.grounding import invented

    m = "One-on-ones are on Thursdays at 3 pm in room Juniper; the trial ran eleven times faster for three years."
    assert invented("Thirteen different locations.", m) == ["13"]
    assert invented("It is on the fourth floor.", m) == ["4th"]
    for ok in ("It ran 11 times faster.", "It ran eleven times faster.", "It lasts three years.", "One of them."):
        assert invented(ok, m) == [], ok
    assert invented("At three pm in room Juniper.", m) == []
    # a value the source holds in another form, or numbers run together as a time, a year or a phrase: not counts
    held = {
        "The offsite is a three-day event.": "It lasts three days.",
        "Standup at 9:30 in room Juniper.": "Standup is at nine thirty.",
        "Standup moved to 10:05.": "It starts at five past ten.",
        "The office opened in 1998.": "It opened in nineteen ninety-eight.",
        "The cluster has 48 GPUs.": "It has forty-eight GPUs and runs twenty-four seven.",
    }
    for source, said in held.items():
        assert invented(said, source) == [], said
    assert invented("It has fifty GPUs.", "The cluster has 48 GPUs.") == ["50"]
