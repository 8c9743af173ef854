"""dream on tiny models: the phases, the lock, the time budget, resume after SIGKILL, and regressions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sleepctl import record
from sleepctl.dream import dream
from sleepctl.errors import LockedError
from sleepctl.home import open_home, sleep_lock
from sleepctl.memories import open_store
from sleepctl.seed import seed

from .conftest import cli, wait_for_lines, write_recipe

DREAM = {
    "grounded": False,  # a random tiny model's dreams are strings of unknown words: the check would drop them all
    "dreams_per_memory": 3,
    "max_new_tokens": 8,
    "top_k": 1,
    "random_b": 1,
    "train_steps": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
}


@pytest.fixture
def seeded(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, dream=DREAM)
    first = seed(str(recipe), home=home, show_progress=False)
    return first, recipe


def test_nothing_to_dream_about(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, dream=DREAM)
    r = cli("dream", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 0 and b"nothing to dream about" in r.stdout


def test_dream_end_to_end(home, seeded, tiny_dir):
    first, recipe = seeded
    res = dream(home=home, show_progress=False)  # no recipe named: the seed's own, not the CPU default
    assert res.status in ("done", "not-current"), res.message
    assert res.dreams > 0 and res.kept > 0 and res.rewarded > 0 and res.steps == 4
    run = Path(open_store(home).run(res.run_id).dir)
    assert str(tiny_dir) in (run / "recipe.yaml").read_text()
    for f in ("dreams.json", "scores.json", "rewards.json", "metrics.jsonl", "summary.json"):
        assert (run / f).exists(), f
    dreams = json.loads((run / "dreams.json").read_text())
    assert {d["kind"] for d in dreams} <= {"implication", "qa", "rephrase", "combine"}
    assert len(json.loads((run / "scores.json").read_text())) == len(dreams)
    # where the time went, per phase, in the result and in the run's summary
    phases = ["load", "write", "gate_before", "select", "reward", "train", "gate_after"]
    assert list(res.phases_s) == phases and all(v >= 0 for v in res.phases_s.values())
    assert json.loads((run / "summary.json").read_text())["phases_s"] == res.phases_s
    with open_store(home) as st:
        a = st.adapter(res.adapter_id)
        # the dream refines the night's adapter in place: same place in the stack, it replaces the seed's
        assert a.kind == "dream" and a.parent_id is None and a.replaces == first.adapter_id and a.version == 2
        assert a.trace_ids == st.adapter(first.adapter_id).trace_ids
        assert (st.current_adapter_id() == a.id) == res.made_current
        assert st.counts()["pending"] == 0  # a dream adds no memories and re-pends none
    assert (home / "logs" / "dream.log").read_text().count("dream run") == 1


def test_second_run_refused_while_locked(home, seeded):
    _, recipe = seeded
    with sleep_lock(open_home(home), "seed"):  # one job that publishes adapters at a time, whichever it is
        r = cli("dream", "--recipe", str(recipe), "--home", str(home))
        with pytest.raises(LockedError):
            dream(str(recipe), home=home, show_progress=False)
    assert r.returncode == 75 and b"another sleepctl job holds" in r.stderr and b"seed, pid" in r.stderr


def test_time_budget_stops_cleanly_then_resumes(home, seeded):
    first, recipe = seeded
    r = cli("dream", "--recipe", str(recipe), "--home", str(home), "--max-minutes", "0.00001", "--json")
    assert r.returncode == 4, r.stderr.decode()[-1500:]
    assert json.loads(r.stdout)["status"] == "stopped"
    with open_store(home) as st:
        assert st.current_adapter_id() == first.adapter_id
    # how many dreams share a pass is no part of the work: a run stopped at 8 continues at 2
    res = dream(str(recipe), home=home, show_progress=False, overrides={"dream.parallel": 2})
    # the resumed run is the run an uninterrupted one would have been: its dreams are drawn from a key of the
    # night's memories and the seed (once from the adapter id, time and random bits, so whether any dream
    # earned a reward changed from run to run)
    assert res.status in ("done", "not-current") and res.dreams > 0 and res.rewarded > 0 and res.steps == 4
    with open_store(home) as st:
        assert len(st.runs("dream")) == 1  # the same run, continued
        assert st.current_adapter_id() == (res.adapter_id if res.made_current else first.adapter_id)


def test_sigkill_midway_then_rerun_ends_with_valid_current(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, dream={**DREAM, "train_steps": 40, "checkpoint_every": 2})
    seed(str(recipe), home=home, show_progress=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sleepctl.cli", "dream", "--recipe", str(recipe), "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for_lines(home, "dream_*/checkpoints.jsonl", 1), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = cli("dream", "--recipe", str(recipe), "--home", str(home), "--json", "--set", "dream.train_steps=40")
    assert r.returncode in (0, 3), r.stderr.decode()[-1500:]
    res = json.loads(r.stdout)
    assert res["steps"] == 40
    # the resumed run rewarded and trained on the dreams the killed one kept, not a fresh random pick
    run_dir = next(home.glob("runs/dream_*"))
    kept = json.loads((run_dir / "kept.json").read_text())
    rewards = json.loads((run_dir / "rewards.json").read_text())
    assert set(kept) <= set(rewards)
    assert res["rewarded"] == sum(rewards[k]["reward"] for k in kept)
    with open_store(home) as st:
        cur = st.adapter(st.current_adapter_id())
        assert (Path(cur.path) / "adapter_model.safetensors").exists()
        assert [x.status for x in st.runs("dream")] == ["done"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), cur.path)


def test_regression_is_kept_but_not_current(home, seeded, monkeypatch):
    first, recipe = seeded
    import sleepctl.dream as d

    calls = iter([0.5, 0.5, 0.25, 0.5])  # before: recall, retention; after: recall drops

    monkeypatch.setattr(d, "_recall", lambda *a, **k: next(calls))
    res = dream(str(recipe), home=home, show_progress=False)
    assert res.status == "not-current" and res.exit_code == 3 and "recall 50% -> 25%" in res.message
    with open_store(home) as st:
        assert st.current_adapter_id() == first.adapter_id
        assert st.adapter(res.adapter_id).kind == "dream"  # kept, available to `adapters use`


def test_a_gate_measured_under_an_earlier_scoring_rule_is_measured_again(home, seeded, monkeypatch):
    """A run resumed after an upgrade changed how recall is scored does not compare its saved "before" with an
    "after" scored otherwise."""
    first, recipe = seeded
    import sleepctl.dream as d
    from sleepctl.scoring import SCORING_VERSION

    score = d.dream_scores
    monkeypatch.setattr(d, "dream_scores", lambda *a: None)  # out of time while selecting: "before" is saved
    cut = dream(str(recipe), home=home, show_progress=False)
    assert cut.status == "stopped"
    run = Path(open_store(home).run(cut.run_id).dir)
    saved = json.loads((run / "before.json").read_text())
    assert saved["scoring"] == SCORING_VERSION
    del saved["scoring"]
    saved["recall"] = 0.99  # as a run of the earlier rule saved it
    (run / "before.json").write_text(json.dumps(saved))
    monkeypatch.setattr(d, "dream_scores", score)
    res = dream(str(recipe), home=home, show_progress=False)
    assert res.run_id == cut.run_id and res.before["recall"] != 0.99 and res.before["scoring"] == SCORING_VERSION


def test_a_dream_that_drifts_is_not_made_current(home, seeded, monkeypatch):
    """Recall held, general perplexity up past `dream.ppl_tolerance`: kept, not current, and the message says why."""
    first, recipe = seeded
    import sleepctl.dream as d

    monkeypatch.setattr(d, "_recall", lambda *a, **k: 0.5)  # recall and retention the same before and after
    ppl = iter([20.0, 30.0])
    monkeypatch.setattr(d, "perplexity", lambda *a, **k: next(ppl))
    res = dream(str(recipe), home=home, show_progress=False)
    assert res.status == "not-current" and "general perplexity 20.00 -> 30.00" in res.message
    assert res.before["ppl"] == 20.0 and res.after["ppl"] == 30.0
    with open_store(home) as st:
        assert st.current_adapter_id() == first.adapter_id

    from sleepctl.dream import gate_worse

    assert gate_worse({"recall": 0.5, "ppl": 20.0}, {"recall": 0.5, "ppl": 20.9}, 0.05) == []  # inside tolerance
    assert gate_worse({"recall": 0.5, "ppl": 20.0}, {"recall": 0.5, "ppl": 21.1}, 0.05) == [
        "general perplexity 20.00 -> 21.10"
    ]
    assert gate_worse({"recall": None, "ppl": 20.0}, {"recall": None, "ppl": float("nan")}, 0.05) == [
        "general perplexity 20.00 -> nan"
    ]
    # a gate saved before perplexity was part of it (a resumed run): recall alone decides
    assert gate_worse({"recall": 0.5, "retention": None}, {"recall": 0.6, "retention": None, "ppl": 99.0}, 0.05) == []


def test_bad_dream_flags(home, seeded):
    _, recipe = seeded
    r = cli("dream", "--recipe", str(recipe), "--home", str(home), "--max-minutes", "-1")
    assert r.returncode == 2 and b"--max-minutes must be positive" in r.stderr
    r = cli("dream", "--recipe", str(recipe), "--home", str(home), "--set", "dream.parallel=0")
    assert r.returncode == 2 and b"dream.parallel" in r.stderr and b"greater than or equal to 1" in r.stderr
    with open_store(home) as st:
        assert st.runs("dream") == []  # refused before any run began


def test_crontab_and_systemd_commands_are_valid_invocations():
    """The scheduling examples call real commands with real flags."""
    import re
    import shlex

    root = Path(__file__).resolve().parent.parent / "examples" / "cron"
    lines = (root / "crontab.txt").read_text() + (root / "sleepctl-sleep.service").read_text()
    invocations = re.findall(r"bin/sleepctl ([^>;\n]+)", lines)
    assert len(invocations) == 4
    for inv in invocations:
        r = cli(*shlex.split(inv), "--help")
        assert r.returncode == 0, (inv, r.stderr)
    timer = (root / "sleepctl-sleep.timer").read_text()
    assert (
        "OnCalendar=*-*-* 02:00:00" in timer
        and "SuccessExitStatus=3 4" in (root / "sleepctl-sleep.service").read_text()
    )


def test_selection_keeps_the_best_distinct_dreams_not_near_copies():
    """Top k by gradient score, then random ones, never two of one memory sharing more than max_overlap."""
    import random

    from sleepctl.dream import select_dreams

    texts = {
        "a": "The Kestrel build server moved to Tallinn last Tuesday.",
        "b": "The Kestrel build server moved to Tallinn last Tuesday!",  # a near-copy of the best
        "c": "Orla Brennick is the one who moved the Kestrel server.",
        "d": "Since Tuesday, builds of Kestrel run in the Tallinn data centre.",
        "e": "Orla Brennick is the one who moved the Kestrel server!",  # a near-copy of c
    }
    dreams = [{"id": i, "text": t} for i, t in texts.items()]
    scores = {"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.1, "e": 0.05}
    picked = select_dreams(dreams, scores, top_k=2, random_b=1, max_overlap=0.8, rng=random.Random(0))
    assert [d["id"] for d in picked[:2]] == ["a", "c"]  # b is a's copy: passed over for the next best
    assert len(picked) == 3 and picked[2]["id"] == "d"  # the only distinct one left (e is c's copy)
    # without the guard the score alone decides, copies and all
    loose = select_dreams(dreams, scores, top_k=2, random_b=0, max_overlap=1.0, rng=random.Random(0))
    assert [d["id"] for d in loose] == ["a", "b"]
    # too few distinct dreams: fewer kept, none repeated
    few = select_dreams(dreams[:2], scores, top_k=2, random_b=1, max_overlap=0.8, rng=random.Random(0))
    assert [d["id"] for d in few] == ["a"]


def test_invented_names_and_values_are_found_not_sentence_openers():
    """The dreams the 0.5B wrote on the CPU demo, against the memories they were written from."""
    from sleepctl.grounding import invented

    source = (
        "Heads up: Orla Brennick moved the Kestrel build server from Dublin to the Tallinn data centre last Tuesday. "
        "On-call for the Halberd payments API: Tomasz Verhoeven takes weekdays, Imani Castellano weekends. "
        "Marrow slips to March 14th; Dana Okafor signed off, the sensor vendor Quillfeather was late. Room 4, 9:30."
    )
    made_up = {
        "- Odra Brennick moved the Kestrel build server from Dublin to Tallinn.": ["Odra Brennick"],
        "Elliot Okafor signed off on the delayed Marrow deadline.": ["Elliot Okafor"],
        "Q: Where is Marrow?\nA: At Marrow, Canada.": ["Canada"],
        "Dear Dana Okafor, I moved the Kestrel server (T) to Riga.": ["Riga"],
        "Łukasz Brennick moved the Kestrel build server.": ["Łukasz Brennick"],
        "There's Merryfield's sign-off for Marrow.": ["Merryfield's"],
        "Q: Is Tomasz Verhoeven on call for Halberd's API? A: Kit Verhoeven is.": ["Kit Verhoeven"],
        "The standup moved to 10:05 in room 4.": ["10:05"],
        "Marrow is due March 14.\n\nMerryfield's on-call rotation: Tomasz Verhoeven.": ["Merryfield's"],
    }
    for text, names in made_up.items():
        assert invented(text, source) == names, text
    faithful = [
        "Consequences: the Kestrel build server now runs in Tallinn, moved by Orla Brennick. Who is affected: builds.",
        "Q: WHERE is the Kestrel server?\nA: Tallinn.",
        "Is Tomasz Verhoeven on call on weekdays? Yes; Imani Castellano takes weekends.",
        "Secondly, Marrow is due March 14, signed off by Dana Okafor, late because of Quillfeather.",
        "Halberd's payments API has Tomasz Verhoeven on call on weekdays, at 9:30 in room 4.",
        "1. Q: Who moved the Kestrel server?\n2. Q: Where to?\n3. Q: When? A: last Tuesday, at 09:30 AM.",
        "That's Dana's sign-off; it's Marrow's slip. Let's ask Tomasz. By March 14 Marrow ships.",
        "### Key Points\n**Next Steps:** Dana Okafor signs off. With Tomasz Verhoeven on call, Orla moved Kestrel.",
    ]
    for text in faithful:
        assert invented(text, source) == [], text


def test_dreams_that_invent_are_not_scored_kept_or_trained(home, seeded, monkeypatch):
    """With dream.grounded (the recipes' default) a dream stating what its memories do not hold is dropped before scoring."""
    first, recipe = seeded
    import sleepctl.dream as d

    monkeypatch.setattr(d, "whole_part", lambda kind, text: text)  # a random model's dreams all run to the limit
    flagged = iter([["Odra Brennick"], []] * 100)  # every other dream written invents a name
    monkeypatch.setattr(d, "invented", lambda text, source: next(flagged))
    monkeypatch.setattr(
        d, "grounded_dream", lambda kind, text, source, taken_back=None: {}
    )  # a tiny model's words: not judged here
    scored: list[str] = []
    score = d.dream_scores
    monkeypatch.setattr(
        d, "dream_scores", lambda m, t, s, tg, ds, *a: scored.extend(x["id"] for x in ds) or score(m, t, s, tg, ds, *a)
    )
    res = dream(str(recipe), home=home, show_progress=False, overrides={"dream.grounded": True})
    run = Path(open_store(home).run(res.run_id).dir)
    dreams = json.loads((run / "dreams.json").read_text())
    made_up = {x["id"] for x in dreams if x["invented"]}
    assert res.invented == len(made_up) == (len(dreams) + 1) // 2 and made_up  # the first, third, ...
    assert scored and not made_up & set(scored) and not made_up & set(json.loads((run / "kept.json").read_text()))
    assert "state a name or value their memories do not hold" in (home / "logs" / "dream.log").read_text()
    assert json.loads((run / "summary.json").read_text())["invented"] == res.invented
    scored.clear()
    loose = dream(str(recipe), home=home, show_progress=False, overrides={"dream.grounded": False})
    run = Path(open_store(home).run(loose.run_id).dir)
    flagged = {x["id"] for x in json.loads((run / "dreams.json").read_text()) if x["invented"]}
    assert loose.invented == 0 and flagged and flagged <= set(scored)  # the check is off: flagged dreams are scored

    # a run the time budget stops after its dreams are written still says how many it dropped
    again = iter([["Odra Brennick"], []] * 100)
    monkeypatch.setattr(d, "invented", lambda text, source: next(again))
    monkeypatch.setattr(d, "dream_scores", lambda *a: None)  # out of time while selecting
    cut = dream(str(recipe), home=home, show_progress=False, overrides={"dream.grounded": True})
    assert cut.status == "stopped" and cut.invented > 0

    # a dream mostly in words its memories do not hold goes the same way, and the log says which check it failed
    monkeypatch.setattr(d, "dream_scores", score)
    monkeypatch.setattr(d, "invented", lambda text, source: [])
    other = iter([{"grounded": False}, {"grounded": True}] * 100)
    monkeypatch.setattr(d, "grounded_dream", lambda kind, text, source, taken_back=None: next(other))
    scored.clear()
    fresh = {"dream.grounded": True, "dream.temperature": 0.8}  # not the stopped run above, which would resume
    res = dream(str(recipe), home=home, show_progress=False, overrides=fresh)
    run = Path(open_store(home).run(res.run_id).dir)
    off = {x["id"] for x in json.loads((run / "dreams.json").read_text()) if x["grounded"] is False}
    assert off and res.invented == len(off) and not off & set(scored)
    assert f"{len(off)} say mostly other things" in (home / "logs" / "dream.log").read_text()


def _trace(i: str, text: str):
    from sleepctl.records import Trace

    w = "2026-11-01T10:00:00+00:00"
    return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=w, updated_at=w)


def test_dream_keeps_only_what_its_memories_hold():
    """The checks the seed puts on teacher answers, on dreams: QA pairs that invent or say other things go (the
    rest of the dream stays), as does a rephrasing mostly in other words; an implication is checked only for what
    it states; what is kept is what trains."""
    from sleepctl.dream import dream_pairs, grounded_dream

    memory = "My manager is Fenna Albright; one-on-ones are on Thursdays at 3 pm in room Juniper."
    t = _trace("m1", memory)
    qa = (
        "Q: Who is my manager? A: Your manager is Fenna Albright.\n"
        "Q: Where are the one-on-ones taking place? A: Thirteen different locations.\n"
        "Q: Why does Dana Okafor hold the one-on-ones in room Juniper? A: The one-on-ones are in room Juniper.\n"
        "Q: When are the one-on-ones? A: The"  # cut off by the token limit
    )
    judged = grounded_dream("qa", qa, memory)
    good = [["Who is my manager?", "Your manager is Fenna Albright."]]
    assert judged == {"invented": [], "grounded": True, "pairs": good, "pairs_dropped": 3, "taken_back": []}
    pairs = dream_pairs({"kind": "qa", "text": qa, **judged}, t)
    assert [(x.prompt, x.answer) for x in pairs] == [tuple(good[0])]
    unchecked = dream_pairs({"kind": "qa", "text": qa}, t)  # dream.grounded off, or a run saved before the check
    assert len(unchecked) == 4
    bad = "Q: Where is room Juniper? A: Thirteen floors up.\nQ: Who? A: They"
    assert grounded_dream("qa", bad, memory) == {
        "invented": ["13"],
        "grounded": False,
        "pairs": [],
        "pairs_dropped": 2,
        "taken_back": [],
    }
    assert grounded_dream("combine", "Yes, both were remembered.", memory) == {
        "invented": [],
        "grounded": False,
        "taken_back": [],
    }
    said = "Fenna Albright, my manager, holds one-on-ones in room Juniper on Thursdays at 3 pm."
    assert grounded_dream("rephrase", said, memory) == {"invented": [], "grounded": True, "taken_back": []}
    assert grounded_dream("qa", said, memory) == {
        "invented": [],
        "grounded": True,
        "taken_back": [],
    }  # no pairs: judged whole
    follows = "Whoever reports to Fenna Albright should keep Thursday afternoons free and book Juniper early."
    assert grounded_dream("implication", follows, memory) == {"invented": [], "grounded": True, "taken_back": []}
    assert grounded_dream("implication", "So Dana Okafor joins them.", memory)["invented"] == ["Dana Okafor"]
    whole = dream_pairs({"kind": "rephrase", "text": said, "grounded": True}, t)
    assert [x.answer for x in whole] == [said] and whole[0].prompt.startswith("What do you remember about")


def test_a_qa_dream_trains_its_good_pairs_only(home, seeded, monkeypatch):
    """End to end: a QA dream with one good and one made-up pair is scored, rewarded and trained on the good pair
    alone; a rephrasing that says other things is dropped before scoring, and the log counts both."""
    first, recipe = seeded
    import sleepctl.dream as d
    from sleepctl.engines import Rollouts

    def memory_of(prompt: str) -> str:
        return prompt.split("remember:\n\n", 1)[1].split("\n\n")[0]

    class Scripted:  # what a model that follows the prompts would write, one good and one bad thing each
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, **kw):
            out = []
            for p in prompts:
                m = memory_of(p)
                if "three questions" in p:
                    out.append(f"Q: What do you remember? A: {m}\nQ: Where is it? A: Thirteen different locations.")
                elif "Restate" in p:
                    out.append("Yes, I remembered it.")
                else:
                    out.append(m)
            return Rollouts(prompt_ids=[[] for _ in out], completion_ids=[[] for _ in out], texts=out)

    monkeypatch.setattr(d, "HFEngine", Scripted)
    seen: list[list] = []
    pairs_of = d.dream_pairs
    monkeypatch.setattr(d, "dream_pairs", lambda dr, t: seen.append(pairs_of(dr, t)) or seen[-1])
    over = {"dream.grounded": True, "dream.kinds": ["qa", "rephrase", "implication"], "dream.temperature": 0.7}
    res = dream(str(recipe), home=home, show_progress=False, overrides=over)
    run = Path(open_store(home).run(res.run_id).dir)
    dreams = json.loads((run / "dreams.json").read_text())
    qa = [x for x in dreams if x["kind"] == "qa"]
    assert qa and all(len(x["pairs"]) == 1 and x["pairs_dropped"] == 1 and not x["invented"] for x in qa)
    assert all(x["grounded"] is False for x in dreams if x["kind"] == "rephrase")
    assert res.invented == sum(x["kind"] == "rephrase" for x in dreams)
    trained = [p for group in seen for p in group]
    assert trained and not any("Thirteen" in p.answer or "Yes, I remembered" in p.answer for p in trained)
    log = (home / "logs" / "dream.log").read_text()
    assert f"{len(qa)} question-answer pairs left out" in log and "say mostly other things" in log


def test_a_dream_cut_by_the_token_limit_keeps_its_whole_sentences_and_pairs():
    from sleepctl.dream import whole_part

    qa = "Q: When does Corvina run? A: At 02:30 UTC.\n\nQ: What is its expected time? A: It is expected to run at 02"
    assert whole_part("qa", qa) == "Q: When does Corvina run? A: At 02:30 UTC."
    assert whole_part("qa", "Q: When does Corvina run? A: At 02") == ""  # its only pair was the cut one
    assert whole_part("qa", "Noted, here they are.\nQ: When does Corvina run? A: At") == ""  # no pair left
    assert (
        whole_part("qa", "Q: When does Corvina run? A: At 02:30 UTC.\nQ: Why")
        == "Q: When does Corvina run? A: At 02:30 UTC."
    )
    said = "The fix shipped in firmware 3.1 on Monday. Owners should update soon! Next steps: the team will"
    assert whole_part("implication", said) == "The fix shipped in firmware 3.1 on Monday. Owners should update soon!"
    assert whole_part("rephrase", 'He said "it moved to Tallinn." Then the') == 'He said "it moved to Tallinn."'
    assert whole_part("rephrase", "The Corvina pipeline runs at 3.1") == ""  # no whole sentence at all
    listed = "Those on call lose weekends.\n2. The rota moves to Imani\n3."
    assert whole_part("implication", listed) == "Those on call lose weekends."  # not the next item's number
    assert whole_part("rephrase", "Meet Dr. Albright in St. Brendan's hall at noon. Then") == (
        "Meet Dr. Albright in St. Brendan's hall at noon."
    )
    assert whole_part("rephrase", "1. Meet Dr. Albright") == ""
    assert whole_part("rephrase", "It moved. Contact Fenna J. Albright about the") == "It moved."  # not at "J."
    assert whole_part("rephrase", "It moved to Tallinn.") == "It moved to Tallinn."  # cut right at its end
    assert whole_part("rephrase", "The fix shipped in firmware 3.") == ""  # a number's point, not a full stop


def test_cut_dreams_train_up_to_their_last_whole_part(home, seeded, monkeypatch):
    """End to end: dreams that reached the token limit (no EOS at max_new_tokens) are saved and trained without
    their unfinished tail, one with nothing whole is left out, a dream that ended by itself is kept as written,
    and the log counts the cut ones."""
    first, recipe = seeded
    import sleepctl.dream as d
    from sleepctl.engines import Rollouts

    tok_eos = []

    class Scripted:
        def __init__(self, model, tok, *a, **k):
            tok_eos.append(tok.eos_token_id)

        def generate(self, prompts, *, max_new_tokens, **kw):
            texts, ids = [], []
            for p in prompts:
                if "three questions" in p:  # cut inside its second pair
                    texts.append("Q: Where is it? A: It is in room Juniper.\nQ: When is it? A: On Thursdays at")
                    ids.append([5] * max_new_tokens)
                elif "Restate" in p:  # ended by itself, no full stop: kept as it is
                    texts.append("Room Juniper on Thursdays")
                    ids.append([5, tok_eos[-1]])
                else:  # cut, and not one whole sentence
                    texts.append("Whoever reports there should")
                    ids.append([5] * max_new_tokens)
            return Rollouts(prompt_ids=[[] for _ in texts], completion_ids=ids, texts=texts)

    monkeypatch.setattr(d, "HFEngine", Scripted)
    monkeypatch.setattr(
        d, "grounded_dream", lambda kind, text, source, taken_back=None: {}
    )  # not what this test is about
    monkeypatch.setattr(d, "invented", lambda text, source: [])
    seen: list[list] = []
    pairs_of = d.dream_pairs
    monkeypatch.setattr(d, "dream_pairs", lambda dr, t: seen.append(pairs_of(dr, t)) or seen[-1])
    over = {"dream.kinds": ["qa", "rephrase", "implication"], "dream.temperature": 0.6, "dream.grounded": True}
    res = dream(str(recipe), home=home, show_progress=False, overrides=over)
    run = Path(open_store(home).run(res.run_id).dir)
    dreams = json.loads((run / "dreams.json").read_text())
    assert {x["kind"] for x in dreams} == {"qa", "rephrase", "implication"}
    for x in dreams:
        if x["kind"] == "implication":  # cut with nothing whole: recorded, not scored, kept or trained
            assert x["cut"] and x["text"] == ""
            assert x["id"] not in json.loads((run / "scores.json").read_text())
        elif x["kind"] == "qa":
            assert x["cut"] and x["text"] == "Q: Where is it? A: It is in room Juniper."
        else:
            assert not x["cut"] and x["text"] == "Room Juniper on Thursdays"
    trained = [p.answer for group in seen for p in group]
    assert trained and not any("Thursdays at" in a for a in trained)
    cut = sum(x["cut"] for x in dreams)
    log = (home / "logs" / "dream.log").read_text()
    empty = sum(x["kind"] == "implication" for x in dreams)
    assert empty and f"{cut} of them reached the token limit (dream.max_new_tokens 8): each trains" in log
    assert f"{empty} with none are left out" in log

    # with the checks off (a random model's dreams, as in the other tests) a cut dream is kept as it was written
    seen.clear()
    loose = dream(str(recipe), home=home, show_progress=False, overrides={**over, "dream.grounded": False})
    run = Path(open_store(home).run(loose.run_id).dir)
    texts = {x["kind"]: x["text"] for x in json.loads((run / "dreams.json").read_text())}
    assert all(x["cut"] == (x["kind"] != "rephrase") for x in json.loads((run / "dreams.json").read_text()))
    assert texts["implication"] == "Whoever reports there should" and texts["qa"].endswith("On Thursdays at")


def test_combined_dreams_join_memories_that_share_a_name():
    import random

    from sleepctl.dream import dream_jobs
    from sleepctl.recipe import load_recipe

    cfg, _ = load_recipe("quick-cpu", {"dream.kinds": ["combine"], "dream.dreams_per_memory": 3})
    kestrel = _trace("a", "Orla Brennick moved the Kestrel build server to Tallinn.")
    kestrel2 = _trace("b", "The Kestrel build server gets a second disk on Friday, says Priya Nandakumar.")
    lone = _trace("c", "The Beryl Falls hackathon was won by team Paper Lantern.")
    jobs = dream_jobs(cfg, [kestrel, kestrel2, lone], {}, random.Random(0))
    kinds = {(j["trace_id"], j["kind"]) for j in jobs}
    assert kinds == {("a", "combine"), ("b", "combine"), ("c", "rephrase")}  # nothing shares a name with c
    for j in jobs:
        if j["trace_id"] == "a":
            assert kestrel2.text in j["prompt"] and lone.text not in j["prompt"]
            assert j["source"] == f"{kestrel.text}\n\n{kestrel2.text}"
        if j["trace_id"] == "c":
            assert j["source"] == lone.text and "Kestrel" not in j["prompt"]
