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


def test_answers_with_a_made_up_year_place_or_numbered_memory_are_dropped_faithful_ones_kept(tmp_path, tiny_dir):
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
    assert kept["Who is on call for Halberd on weekends?"] == ["Imani Castellano takes the Halberd weekends."]

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
