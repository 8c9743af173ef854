"""Many nights on tiny models: the stack as one LoRA, replay, the anchor, newer facts, consolidation, prune."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from sleepctl import record
from sleepctl.adapters import concat_loras, lineage, read_lora, rollback, stack_lora
from sleepctl.consolidate import consolidate
from sleepctl.errors import SleepError
from sleepctl.evaluate import evaluate
from sleepctl.general_text import anchor_paragraphs, drift_items, reference_paragraphs
from sleepctl.home import open_home, sleep_lock
from sleepctl.memories import open_store
from sleepctl.models import load_model
from sleepctl.seed import seed

from .conftest import EXAMPLES, cli, randomize_lora_b, write_recipe

NIGHTS = {
    "replay": {"fraction": 0.5, "max_memories": 8, "sampling": "weakest", "max_related": 2},
    "anchor": {"kl_coef": 0.5, "batch_size": 2, "max_tokens": 24, "drift_prompts": 4},
    "consolidate": {"max_adapters": 2, "steps_per_memory": 1.0, "max_steps": 6},
}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _lines(tmp_path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def recipe(tmp_path, tiny_dir):
    return write_recipe(tmp_path / "r.yaml", tiny_dir, **NIGHTS)


def test_stack_is_one_lora_equal_to_its_parts(home, tmp_path, tiny_dir, recipe, small_memories):
    """sum_i s_i B_i A_i == [s_1 B_1 | s_2 B_2] [A_1; A_2]: the frozen stack as one adapter changes no output."""
    from peft import PeftModel

    record([small_memories], home=home)
    seed(str(recipe), home=home, show_progress=False)
    record([_lines(tmp_path, "b.jsonl", EXAMPLES.read_text().splitlines()[3:5])], home=home)
    seed(str(recipe), home=home, show_progress=False)
    with open_store(home) as st:
        stack = lineage(st, st.current_adapter_id())
    assert len(stack) == 2
    for a in stack:  # give the adapters some weight, so agreement below means something
        t, cfg = read_lora(a.path)
        torch.manual_seed(a.version)
        from safetensors.torch import save_file

        save_file({k: torch.randn_like(v) * 0.2 for k, v in t.items()}, Path(a.path) / "adapter_model.safetensors")
    ids = torch.tensor([[5, 17, 300, 9, 44, 12]])
    one, _ = load_model(str(tiny_dir), "cpu", "float32")
    seq = one
    for a in stack:  # the old way: each adapter merged into the weights in turn
        seq = PeftModel.from_pretrained(seq, a.path).merge_and_unload()
    from sleepctl.adapters import attach_stack

    two, _ = load_model(str(tiny_dir), "cpu", "float32")
    plain = two(input_ids=ids).logits
    both = attach_stack(two, stack)
    with torch.no_grad():
        want, got = seq(input_ids=ids).logits, both(input_ids=ids).logits
        with both.disable_adapter():
            base = both(input_ids=ids).logits
    assert (want - plain).abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base, plain)  # the base weights were never touched
    # training over the stack: only the new adapter is trainable, also after the base was asked for
    from sleepctl.recipe import Lora
    from sleepctl.training import add_lora

    three, _ = load_model(str(tiny_dir), "cpu", "float32")
    trainee = add_lora(three, Lora(r=4, alpha=8), stack)
    with trainee.disable_adapter():  # PEFT marks active adapters trainable again on the way out
        pass
    names = [n for n, p in trainee.named_parameters() if p.requires_grad]
    assert names and all(".default." in n for n in names)
    from sleepctl.adapters import STACK, active

    with torch.no_grad(), active(trainee, [STACK]):  # the stack alone (dream's dropout, consolidation's teacher)
        alone = trainee(input_ids=ids).logits
    torch.testing.assert_close(alone, want, atol=1e-4, rtol=1e-4)
    assert [n for n, p in trainee.named_parameters() if p.requires_grad] == names  # still only the new adapter
    merged = concat_loras([read_lora(a.path) for a in stack])
    assert merged[1]["r"] == sum(read_lora(a.path)[1]["r"] for a in stack) == stack_lora(stack)[1]["r"]


def test_second_night_replays_the_first_and_the_anchor_logs_drift(home, tmp_path, recipe, small_memories):
    record([small_memories], home=home)
    first = seed(str(recipe), home=home, show_progress=False)
    assert first.replayed == 0 and first.kl_drift is not None and first.kl_drift >= 0
    rows = _metrics(first.run_dir)
    assert all("train/anchor_kl" in r and r["train/anchor_kl"] >= 0 for r in rows)
    with open_store(home) as st:
        held = st.examples([t.id for t in st.traces()])
    assert set(held) == {t for t in json.loads((Path(first.run_dir) / "memory_ids.json").read_text())}
    record([_lines(tmp_path, "b.jsonl", EXAMPLES.read_text().splitlines()[3:6])], home=home)
    second = seed(str(recipe), home=home, show_progress=False)
    assert second.replayed == 3 and second.memories == 3
    pool = json.loads((Path(second.run_dir) / "replay.json").read_text())
    assert sorted(pool) == sorted(held)  # the first night's memories, from their cached teacher data
    summary = json.loads((Path(second.run_dir) / "summary.json").read_text())
    assert summary["replayed"] == 3 and summary["kl_drift"] is not None
    # without replay the pool is empty, whatever the sampling rule
    record([_lines(tmp_path, "c.jsonl", EXAMPLES.read_text().splitlines()[6:7])], home=home)
    third = seed(str(recipe), home=home, show_progress=False, overrides={"replay.fraction": 0.0})
    assert third.replayed == 0


def test_general_text_parts_are_disjoint():
    ev = set(reference_paragraphs(40))
    drift = {t for _, t in drift_items(64, 40)}
    anchor = set(anchor_paragraphs(40))
    assert len(ev) == 40 and len(drift) == 64 and len(anchor) > 9000
    assert not (ev & drift) and not (ev & anchor) and not (drift & anchor)


@pytest.mark.parametrize("corrected", ["pool", "tonight"])
def test_newer_memory_supersedes_the_old_answer(home, tmp_path, recipe, monkeypatch, corrected):
    old = {
        "messages": [
            {"role": "user", "content": "Team Pendlewick holds its Friday standup at 9:30 in room Quinceford."}
        ],
        "probes": [
            {"question": "What time is Team Pendlewick's Friday standup?", "answer": "9:30"},
            {"question": "Where is Team Pendlewick's standup?", "answer": "Quinceford"},
        ],
    }
    new = {
        "messages": [
            {"role": "user", "content": "What time is the Pendlewick standup now?"},
            {"role": "tool", "content": "calendar.get('Team Pendlewick standup') -> 10:05"},
        ],
        "probes": [{"question": "What time is Team Pendlewick's Friday standup?", "answer": "10:05"}],
    }
    record([_lines(tmp_path, "a.jsonl", [json.dumps(old)])], home=home)
    first = seed(str(recipe), home=home, show_progress=False)
    record([_lines(tmp_path, "b.jsonl", [json.dumps(new)])], home=home)
    import sleepctl.data as data_mod
    import sleepctl.seed as seed_mod

    shown: list[list] = []  # every memory block the teacher answers with tonight
    answers = data_mod.teacher_answers
    monkeypatch.setattr(
        data_mod,
        "teacher_answers",
        lambda r, e, t, asks, s: shown.extend(m for _, m in asks) or answers(r, e, t, asks, s),
    )
    night: list = []  # tonight's batch source: (tonight's examples, the replay pool)
    batches = seed_mod.NightBatches
    monkeypatch.setattr(
        seed_mod, "NightBatches", lambda new, pool, *a: night.extend([new, pool]) or batches(new, pool, *a)
    )
    second = seed(str(recipe), home=home, show_progress=False, overrides={"replay.corrected": corrected})
    with open_store(home) as st:
        first_id = st.traces()[0].id
    new_ids, pool = {e.trace_id for e in night[0]}, night[1]
    if corrected == "tonight":  # the corrected memory trains beside tonight's, and not once more in the pool
        assert first_id in new_ids and first_id not in pool
    else:  # it is replayed with its rewritten answers only, never its own (stale) text
        assert first_id not in new_ids and first_id in pool
        assert pool[first_id] and not any(old["messages"][0]["content"] in e.samples[0] for e in pool[first_id])
    with open_store(home) as st:
        assert st.run(second.run_id).summary["refreshed_memories"] == 1
    # the old memory's answers are rewritten with the newer one beside it, never from the old one alone
    texts = [[m[1] if isinstance(m, tuple) else m for m in block] for block in shown]
    with_old = [b for b in texts if old["messages"][0]["content"] in " ".join(b)]
    assert with_old and all(len(b) == 2 and "10:05" in b[1] for b in with_old)
    with open_store(home) as st:
        stale = [p for p in st.probes() if p.superseded_by]
        newest = st.traces()[-1]
    assert [(p.answer, p.superseded_by) for p in stale if p.origin == "user"] == [("9:30", newest.id)]
    data = json.loads((Path(second.run_dir) / "data.json").read_text())
    # the old memory's own statement was a prompt on its night; its rewrite does not ask it again
    said = old["messages"][0]["content"]
    assert said in [e["prompt"] for e in json.loads((Path(first.run_dir) / "data.json").read_text())["examples"]]
    assert data["refreshed"] and said not in [e["prompt"] for e in data["refreshed"]]
    # the teacher saw both memories, oldest first, dated, when it answered about the new one
    from sleepctl.data import context, link

    with open_store(home) as st:
        ts = st.traces()
    ctx = context(ts[1], link([ts[1]], ts, 2))
    assert [m[1] for m in ctx] == [ts[0].text, ts[1].text] and all(isinstance(m, tuple) for m in ctx)
    assert "10:05" in " ".join(e["samples"][0] for e in data["examples"] if e["trace_id"] == newest.id)
    rep = evaluate(home=home)
    assert rep.superseded >= 1 and any("newer memory" in n for n in rep.notes)
    scored = {r.question + "|" + r.reference for m in rep.methods for r in m.results}
    assert "What time is Team Pendlewick's Friday standup?|9:30" not in scored


def test_refresh_keeps_answers_that_give_the_newer_value(tmp_path, tiny_dir, monkeypatch):
    """A rewritten answer is judged grounded against everything the teacher saw, not the old memory alone: an
    answer built from the correction is kept, one the teacher invented is still dropped, and neither a prompt nor
    an answer that states the replaced value is kept."""
    import sleepctl.data as data_mod
    from sleepctl.data import Example, refresh
    from sleepctl.recipe import load_recipe
    from sleepctl.records import Trace

    def trace(i: str, text: str, when: str) -> Trace:
        return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=when, updated_at=when)

    old = trace("a", "Clayhatch Workshop pottery classes start at 19:10 with Margit Quenby.", "2026-11-01T09:00:00")
    new = trace("b", "Clayhatch moved pottery to 20:25 in kiln room Umberlight.", "2026-11-03T09:00:00")
    cfg, _ = load_recipe(
        str(write_recipe(tmp_path / "r.yaml", tiny_dir)),
        {"data.teacher_samples": 1, "data.grounded_only": True, "data.update_questions": 0},
    )
    said = {
        "Where is the pottery class?": "Clayhatch Workshop pottery is at 20:25 in kiln room Umberlight.",
        "Who teaches it?": "Bartholomew Quince teaches glassblowing in Lisbon every summer.",
        "When does pottery at Clayhatch start?": "Clayhatch Workshop pottery classes start at 19:10.",
        "Who chose the 19:10 slot?": "Margit Quenby chose the Clayhatch pottery slot.",
    }
    seen: list = []
    monkeypatch.setattr(
        data_mod, "teacher_answers", lambda r, e, t, asks, s: seen.extend(asks) or [[said[p] for p, _ in asks]]
    )
    cached = {"a": [Example("a", p, ["(old answer)"]) for p in said]}
    out = refresh([old], cached, cfg, None, None, {"a": [new]}, seed=0)
    # kept: the answer from the correction; dropped: the invented one, and the one that repeats the replaced
    # time 19:10 (20:25 took its place); a question that presumes 19:10 is not even asked
    assert "Who chose the 19:10 slot?" not in [p for p, _ in seen]
    assert [(e.prompt, e.samples) for e in out] == [
        ("Where is the pottery class?", [said["Where is the pottery class?"]])
    ]
    assert all(len(block) == 2 for _, block in seen)  # the teacher saw both memories, dated
    # the same answer judged against the old memory alone looks invented: that was the bias
    from sleepctl.grounding import grounded

    assert not grounded(said["Where is the pottery class?"], old.text)


def test_refresh_asks_for_a_replaced_value_in_the_old_memorys_words(tmp_path, tiny_dir, monkeypatch):
    """Questions for a replaced value are written from the old memory alone and answered twice, with both
    memories dated and with the replacing memory alone; a stale answer is dropped, the new value kept, and a
    question that states the old value is never asked. `data.update_questions: 0` writes none."""
    import sleepctl.data as data_mod
    from sleepctl.data import refresh
    from sleepctl.engines import Rollouts
    from sleepctl.models import load_tokenizer
    from sleepctl.recipe import load_recipe
    from sleepctl.records import Trace

    def trace(i: str, text: str, when: str) -> Trace:
        return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=when, updated_at=when)

    old = trace("a", "Clayhatch Workshop pottery classes start at 19:10 with Margit Quenby.", "2026-11-01T09:00:00")
    new = trace("b", "Clayhatch moved pottery to 20:25 in kiln room Umberlight.", "2026-11-03T09:00:00")

    class Writer:
        def __init__(self):
            self.requests: list[str] = []

        def generate(self, prompts, **kw):
            self.requests += prompts
            text = "1. What time does the Clayhatch pottery class start?\n2. Is Clayhatch pottery at 19:10?\n"
            return Rollouts([[] for _ in prompts], [[] for _ in prompts], [text for _ in prompts])

    stale = "Clayhatch Workshop pottery classes start at 19:10."
    fresh = "Clayhatch pottery starts at 20:25 in kiln room Umberlight."
    seen: list = []

    def answers(r, e, t, asks, s):
        seen.extend(asks)
        return [[stale if len(block) == 2 else fresh for _, block in asks]]

    monkeypatch.setattr(data_mod, "teacher_answers", answers)
    tok = load_tokenizer(str(tiny_dir))
    cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)), {"data.teacher_samples": 1})
    writer = Writer()
    out = refresh([old], {"a": []}, cfg, writer, tok, {"a": [new]}, seed=0)
    assert len(writer.requests) == 1 and '"19:10"' in writer.requests[0] and old.text in writer.requests[0]
    assert new.text not in writer.requests[0]  # written from the old memory alone
    q = "What time does the Clayhatch pottery class start?"
    assert sorted(len(block) for p, block in seen if p == q) == [1, 2]
    assert [p for p, _ in seen if "19:10" in p] == []
    assert [(e.prompt, e.samples) for e in out] == [(q, [fresh])]

    cfg0, _ = load_recipe(str(tmp_path / "r.yaml"), {"data.update_questions": 0})
    seen.clear()
    assert refresh([old], {"a": []}, cfg0, None, tok, {"a": [new]}, seed=0) == [] and seen == []


def test_replaced_values_are_the_old_memorys_values_a_later_one_restates_in_the_same_form():
    from sleepctl.data import mentions, replaced_by

    def replaced_values(t, related):
        return set(replaced_by(t, related))

    from sleepctl.records import Trace

    def trace(i: str, text: str, when: str) -> Trace:
        return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=when, updated_at=when)

    cap = trace("a", "Decision note 7: the Gorsewing API caps requests at 340 per minute per tenant.", "1")
    raised = trace(
        "b", "Decision note 12: the Gorsewing API cap is raised to 520 per minute, from version 4.18.0.", "2"
    )
    assert replaced_values(cap, [raised]) == {"340"}  # not 7 (note 12 is another note's number, not its slot)
    assert replaced_values(raised, [cap]) == set()  # only a later memory replaces anything
    standup = trace("c", "Team Pendlewick's Friday standup is at 9:30 in room Quinceford.", "1")
    assert replaced_values(standup, [trace("d", "calendar.get('standup') -> 10:05", "2")]) == {"9:30"}
    room = trace("e", "The Wobblecrest spectrometer is in room G-41 of the Ormsgate lab.", "1")
    assert replaced_values(room, [trace("f", "Wobblecrest moved to room H-09.", "2")]) == {"G-41"}
    # a later memory with values of other forms replaces nothing
    phone = trace("g", "Marisol Ventrecka is on extension 6609, room K-217.", "1")
    assert replaced_values(phone, [raised]) == set() and replaced_values(cap, []) == set()
    # a value replaced twice names the newest memory that replaced it, whichever order they come in
    moved = trace("d", "Team Pendlewick moved the standup to 10:05.", "2")
    again = trace("h", "The Pendlewick standup is now at 8:50.", "3")
    assert replaced_by(standup, [again, moved]) == {"9:30": again}
    assert replaced_by(moved, [again, standup]) == {"10:05": again}
    assert mentions("It is at 9:30.", {"9:30"}) and not mentions("It is at 19:30.", {"9:30"})
    assert mentions("340 per minute", {"340"}) and not mentions("3400 per minute", {"340"})
    assert not mentions("version 4.18.0", {"4"}) and not mentions("anything", set())


def test_dream_rehearses_the_newer_value_not_the_stale_one(home, tmp_path, tiny_dir, monkeypatch):
    """A dream about a memory a later one corrected is written with the later one beside it, and its replay
    does not rehearse the old memory's own text (it holds the stale value)."""
    import sleepctl.dream as dream_mod

    old = "Team Pendlewick holds its Friday standup at 9:30 in room Quinceford."
    new = "Team Pendlewick moved its Friday standup to 10:05."
    rcp = write_recipe(
        tmp_path / "d.yaml",
        tiny_dir,
        **NIGHTS,
        dream={
            "grounded": False,  # a random tiny model invents every word
            "dreams_per_memory": 2,
            "kinds": ["rephrase", "qa"],
            "replay_fraction": 1.0,
            "max_new_tokens": 8,
            "top_k": 1,
            "random_b": 1,
            "train_steps": 2,
            "batch_size": 2,
        },
    )
    record([_lines(tmp_path, "a.jsonl", [json.dumps({"messages": [{"role": "user", "content": old}]})])], home=home)
    seed(str(rcp), home=home, show_progress=False)
    record([_lines(tmp_path, "b.jsonl", [json.dumps({"messages": [{"role": "user", "content": new}]})])], home=home)
    seed(str(rcp), home=home, show_progress=False)

    jobs, pairs = [], []
    make_jobs, make_pairs = dream_mod.dream_jobs, dream_mod.replay_pairs
    monkeypatch.setattr(dream_mod, "dream_jobs", lambda *a: jobs.extend(make_jobs(*a)) or jobs)
    monkeypatch.setattr(dream_mod, "replay_pairs", lambda *a: pairs.extend(make_pairs(*a)) or pairs)
    with open_store(home) as st:
        first, second = st.traces()
    dream_mod.dream(str(rcp), home=home)
    about_old = [j["prompt"] for j in jobs if j["trace_id"] == first.id]
    about_new = [j["prompt"] for j in jobs if j["trace_id"] == second.id]
    assert about_old and about_new  # the old memory was replayed beside tonight's
    # the old memory comes with its correction, oldest first, and the rule that the later one wins
    assert all(p.index(old) < p.index(new) and dream_mod.NEWER_WINS in p for p in about_old)
    assert all(old not in p for p in about_new)  # the newest memory has nothing later: it is shown alone
    # rehearsal pairs of the replayed memory never carry its own (stale) text
    assert all("9:30" not in p.answer for p in pairs)
    # without a later memory the prompt is the memory's text, as before
    assert dream_mod.dream_memory(second, []) == second.text
    assert dream_mod.newer_related([first, second], [first, second], 2) == {first.id: [second]}
    assert dream_mod.newer_related([first, second], [first, second], 0) == {}


def test_consolidation_replaces_the_stack_and_rollback_and_prune(home, tmp_path, recipe, small_memories):
    lines = EXAMPLES.read_text().splitlines()
    record([small_memories], home=home)
    r = cli("consolidate", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 0 and b"nothing to consolidate: no adapter" in r.stdout
    for i, chunk in enumerate((lines[3:5], lines[5:7])):
        seed(str(recipe), home=home, show_progress=False)
        record([_lines(tmp_path, f"n{i}.jsonl", chunk)], home=home)
    seed(str(recipe), home=home, show_progress=False)
    with open_store(home) as st:
        old = lineage(st, st.current_adapter_id())
        n_mem = st.counts()["consolidated"]
    assert len(old) == 3 and n_mem == 7
    r = cli("consolidate", "--recipe", str(recipe), "--home", str(home), "--if-needed", "--json")
    assert r.returncode in (0, 3), r.stderr.decode()[-2000:]
    res = json.loads(r.stdout)
    assert res["memories"] == 7 and res["replaced"] == [1, 2, 3] and res["steps"] == 6
    assert 0.0 < res["init_kept"] <= 1.0  # it started from the stack (three rank-4 adapters cut to rank 4)
    assert {"init", "engines", "data", "gate_before", "check", "train", "gate_after"} == set(res["phases_s"])
    assert set(res["before"]["recall"]) == set(res["after"]["recall"]) == {"v1", "v2", "v3"}
    with open_store(home) as st:
        c = st.adapter(res["adapter_id"])
        assert c.kind == "consolidate" and c.parent_id is None and c.replaces == old[-1].id
        assert sorted(c.trace_ids) == sorted(t.id for t in st.traces())
        if not res["made_current"]:  # the gate refused it: make it current by hand for the rest of the test
            from sleepctl.adapters import set_current

            set_current(st, c.id)
        assert lineage(st, st.current_adapter_id()) == [st.adapter(c.id)]
        assert all(t.adapter_id == c.id for t in st.traces())
    r = cli("consolidate", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 0 and b"the current stack is one adapter" in r.stdout
    # prune: never the lineage, asks first, --yes deletes
    r = cli("adapters", "prune", "--home", str(home))
    assert r.returncode == 2 and b"pass --yes" in r.stderr
    with open_store(home) as st:
        assert st.counts()["adapters"] == 4
    r = cli("adapters", "prune", "--home", str(home), "--dry-run", "--json")
    assert [a["version"] for a in json.loads(r.stdout)["would_prune"]] == [1, 2, 3]
    with open_store(home) as st:
        from sleepctl.adapters import prune

        with pytest.raises(SleepError, match="current lineage"):
            prune(st, [c.id])
        assert rollback(st).id == old[-1].id  # a consolidation rolls back to the stack it replaced
        assert [a.version for a in lineage(st, st.current_adapter_id())] == [1, 2, 3]
        assert st.counts()["pending"] == 0
        rollback(st, c.id)
    with sleep_lock(open_home(home), "seed"):  # a job that publishes holds the home: prune waits its turn
        r = cli("adapters", "prune", "--home", str(home), "--yes")
        assert r.returncode == 75 and b"another sleepctl job" in r.stderr
    r = cli("adapters", "prune", "--home", str(home), "--yes")
    assert r.returncode == 0 and b"deleted v1" in r.stdout
    with open_store(home) as st:
        assert [a.version for a in st.adapters()] == [4]
        assert all(not Path(a.path).exists() for a in old)


def test_consolidation_interrupted_then_resumed_keeps_current(home, tmp_path, recipe, small_memories, monkeypatch):
    lines = EXAMPLES.read_text().splitlines()
    record([small_memories], home=home)
    seed(str(recipe), home=home, show_progress=False)
    record([_lines(tmp_path, "b.jsonl", lines[3:5])], home=home)
    seed(str(recipe), home=home, show_progress=False)
    record([_lines(tmp_path, "c.jsonl", lines[5:6])], home=home)
    seed(str(recipe), home=home, show_progress=False)
    with open_store(home) as st:
        cur = st.current_adapter_id()
    import sleepctl.loop as loop_mod

    real = loop_mod.save_checkpoint

    stopped = []

    def save_then_stop(rf, step, *a, **kw):
        real(rf, step, *a, **kw)
        if not stopped:
            stopped.append(step)
            raise KeyboardInterrupt  # as if Ctrl-C came right after this checkpoint

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(SleepError, match="interrupted after step"):
        consolidate(str(recipe), home=home, show_progress=False, overrides={"training.checkpoint_every": 2})
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    with open_store(home) as st:
        assert st.current_adapter_id() == cur and st.runs("consolidate")[0].status == "interrupted"
    res = consolidate(str(recipe), home=home, show_progress=False, overrides={"training.checkpoint_every": 2})
    assert res.status in ("done", "not-current")
    with open_store(home) as st:
        runs = st.runs("consolidate")
    assert len(runs) == 1 and runs[0].status == "done"
    assert [r["step"] for r in _metrics(runs[0].dir)] == list(range(1, res.steps + 1))  # resumed, not restarted


def test_replay_settings_out_of_range_name_file_and_key(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    bad = write_recipe(tmp_path / "bad.yaml", tiny_dir, replay={"fraction": 1.5})
    r = cli("seed", "--recipe", str(bad), "--home", str(home))
    assert r.returncode == 2 and b"bad.yaml: replay.fraction" in r.stderr
    r = cli("seed", "--recipe", str(bad), "--home", str(home), "--set", "replay.sampling=oldest")
    assert r.returncode == 2 and b"replay.sampling" in r.stderr
    with open_store(home) as st:
        assert st.counts()["pending"] == 3 and st.counts()["runs"] == 0


def test_a_tampered_checkpoint_is_refused_without_running(tmp_path, tiny_dir, small_memories, monkeypatch):
    home = tmp_path / "h"
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    import sleepctl.loop as loop_mod

    real = loop_mod.save_checkpoint

    stopped = []

    def save_then_stop(rf, step, *a, **kw):
        real(rf, step, *a, **kw)
        if not stopped:
            stopped.append(step)
            raise KeyboardInterrupt  # as if Ctrl-C came right after this checkpoint

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(SleepError):
        seed(str(recipe), home=home, show_progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    ckpt = next(home.glob("runs/seed_*/checkpoints/step-*"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (ckpt / "optim.pt").write_bytes(pickle.dumps({"optimizer": Payload(), "scheduler": {}}))
    r = cli("seed", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 1 and b"holds something other than optimizer state" in r.stderr
    assert not marker.exists()
    assert b"Traceback" not in r.stderr


def test_seed_waits_for_no_one_while_another_job_holds_the_home(home, recipe, small_memories):
    record([small_memories], home=home)
    with sleep_lock(open_home(home), "dream"):
        r = cli("seed", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 75 and b"dream, pid" in r.stderr
    with open_store(home) as st:
        assert st.counts()["runs"] == 0


def test_lock_does_not_follow_a_symlink(home, tmp_path, recipe, small_memories):
    from sleepctl.home import open_home, sleep_lock

    record([small_memories], home=home)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (home / "sleep.lock").symlink_to(victim)
    with pytest.raises(SleepError, match="cannot open the lock"):
        with sleep_lock(open_home(home), "seed"):
            pass
    assert victim.read_text() == "keep me"


def test_fused_lora_matches_peft_under_autocast(tiny_dir):
    """The addmm forward gives PEFT's outputs and gradients (CPU autocast stands in for CUDA's here)."""
    import copy

    from sleepctl.recipe import Lora
    from sleepctl.training import add_lora, fuse_lora

    torch.manual_seed(0)  # the adapter's random weights, whatever ran before in this process
    base, _ = load_model(str(tiny_dir), "cpu", "bfloat16")
    a = add_lora(base, Lora(r=4, alpha=8), fused=False)
    randomize_lora_b(a, 0.3)
    b = copy.deepcopy(a)
    ref = copy.deepcopy(a).float()
    assert fuse_lora(b) > 0
    ids = torch.tensor([[5, 17, 300, 9, 44, 12]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = a(input_ids=ids).logits.float(), b(input_ids=ids).logits.float()
    with torch.no_grad():
        exact = ref(input_ids=ids).logits
    # both round in bf16; the fused path (one rounding in the GEMM epilogue) is no further from fp32 than PEFT's
    err_peft, err_fused = (la - exact).abs().max().item(), (lb - exact).abs().max().item()
    assert err_fused <= 1.5 * err_peft + 1e-3, (err_fused, err_peft)
    assert (la - lb).abs().max() <= 0.05 * la.abs().max()
    la.sum().backward()
    lb.sum().backward()
    ref(input_ids=ids).logits.sum().backward()

    def grads(m):
        return torch.cat([p.grad.float().flatten() for p in m.parameters() if p.requires_grad])

    gr = grads(ref)
    e_peft, e_fused = ((grads(x) - gr).norm() / gr.norm() for x in (a, b))
    assert e_fused <= 1.5 * e_peft + 0.01 and e_fused < 0.2, (e_fused, e_peft)
    with torch.no_grad():  # outside autocast (CPU training) it is PEFT's own forward, exactly
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_a_non_finite_step_is_skipped_by_the_one_loop(tiny_dir):
    from sleepctl.loop import train
    from sleepctl.recipe import Lora, Optim
    from sleepctl.training import add_lora, make_optimizer

    base, _ = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, Lora(r=4, alpha=8))
    opt, sched = make_optimizer(model, Optim(lr=1e-2, warmup_steps=0), 4)
    ids = torch.tensor([[5, 17, 300, 9]])

    def objective(batch, step, rng):
        loss = model(input_ids=ids, labels=ids).loss
        return (loss * float("nan") if step == 1 else loss), {}

    before = {}

    def batches(step, rng):
        before[step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return []

    res = train(model, batches, objective, opt, sched, max_steps=3, seed=0, grad_clip=1.0)
    assert res.completed == 3 and res.skipped == 1 and res.last["step"] == 3
    after_skip = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(x, y) for x, y in zip(before[1], before[0]))  # step 0 moved the adapter
    assert all(torch.equal(x, y) for x, y in zip(before[2], before[1]))  # step 1 (NaN) did not
    assert all(torch.isfinite(p).all() for p in after_skip)


def _random_stack(model, ranks: list[int], seed: int = 0):
    """LoRA tensors for every linear of a tiny model, as concat_loras gives a stack of adapters of `ranks`."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for r in ranks:
        t = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
                pre = "base_model.model." + name
                t[pre + ".lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.2
                t[pre + ".lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.2
        parts.append((t, {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    return concat_loras(parts)


@pytest.mark.parametrize("rank", [8, 2])
def test_consolidation_starts_from_the_stack_cut_to_its_rank(tiny_dir, rank):
    """Rank >= the stack's: the new adapter alone computes what the stack computes. Smaller: each module's delta
    is the best approximation of that rank (Eckart-Young), and the share kept says how much was cut."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from sleepctl.adapters import NEW, STACK, init_from_stack
    from sleepctl.recipe import Lora
    from sleepctl.training import add_lora

    model, _ = load_model(str(tiny_dir), "cpu", "float32")
    state = _random_stack(model, [3, 3])
    ref = get_peft_model(
        model, LoraConfig(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name=STACK
    )
    set_peft_model_state_dict(ref, state[0], adapter_name=STACK)
    ids = torch.tensor([[5, 17, 300, 9, 44, 12]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits

    fresh, _ = load_model(str(tiny_dir), "cpu", "float32")
    new = add_lora(fresh, Lora(r=rank, alpha=3 * rank, target_modules=["q_proj", "v_proj", "down_proj"]))
    kept = init_from_stack(new, state, NEW)
    with torch.no_grad():
        got = new(input_ids=ids).logits
    assert (want - plain).abs().max() > 0.05
    if rank >= 6:
        assert kept == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        assert 0.0 < kept < 0.9
        assert not torch.allclose(got, want, atol=1e-3)
    lost = total = 0.0
    for name, mod in new.named_modules():
        if isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict) and NEW in mod.lora_A:
            a, b = state[0][name + ".lora_A.weight"], state[0][name + ".lora_B.weight"]
            full = b @ a
            sv = torch.linalg.svdvals(full.double())
            best = sv[rank:].square().sum().sqrt()  # Frobenius error of the best rank-`rank` matrix
            mine = (mod.scaling[NEW] * mod.lora_B[NEW].weight @ mod.lora_A[NEW].weight).detach()
            assert float((full - mine).norm()) == pytest.approx(float(best), rel=1e-3, abs=1e-4)
            lost += float(sv[rank:].square().sum())
            total += float(sv.square().sum())
    assert kept == pytest.approx(1 - lost / total, rel=1e-6)
    # the cut adapter still trains: gradients reach both factors
    new(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in new.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_a_refused_consolidation_waits_for_the_stack_to_grow(home, tmp_path, recipe, small_memories, monkeypatch):
    """--if-needed after a refusal: no retry on the same stack (same minutes, same answer) nor, by default, one
    night later; an explicit `consolidate`, or consolidate.retry_after nights, tries again."""
    import sleepctl.consolidate as cons

    lines = EXAMPLES.read_text().splitlines()
    record([small_memories], home=home)
    for i, chunk in enumerate((lines[3:5], lines[5:6])):
        seed(str(recipe), home=home, show_progress=False)
        record([_lines(tmp_path, f"n{i}.jsonl", chunk)], home=home)
    seed(str(recipe), home=home, show_progress=False)
    real, calls = cons._gate, []

    def gate_that_refuses(model, *a, **kw):  # the second call measures the new adapter: make it worse
        out = real(model, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            out["recall"] = {g: -1.0 for g in out["recall"]}
        return out

    monkeypatch.setattr(cons, "_gate", gate_that_refuses)
    first = consolidate(str(recipe), home=home, if_needed=True, show_progress=False)
    assert first.status == "not-current" and first.exit_code == 3 and first.worse
    monkeypatch.setattr(cons, "_gate", real)
    again = consolidate(str(recipe), home=home, if_needed=True, show_progress=False)
    assert again.status == "nothing" and again.exit_code == 0
    assert f"v{first.adapter_version}, made from this stack 0 night(s) ago, was refused" in again.message
    with open_store(home) as st:
        assert len(st.runs("consolidate")) == 1  # nothing was trained the second time
    record([_lines(tmp_path, "n3.jsonl", lines[6:7])], home=home)
    seed(str(recipe), home=home, show_progress=False)  # the stack grows by one
    with open_store(home) as st:
        stack = lineage(st, st.current_adapter_id())
        assert len(stack) == 4
        assert cons._recent_refusal(st, stack, 2).id == first.adapter_id  # default: one more night to wait
        assert cons._recent_refusal(st, stack, 1) is None  # retry_after 1: tonight it tries again
    r = cli("consolidate", "--recipe", str(recipe), "--home", str(home), "--if-needed")
    assert r.returncode == 0 and b"1 night(s) ago" in r.stdout and b"sleepctl consolidate" in r.stdout


def test_teacher_is_asked_again_for_a_memory_it_wrote_too_few_questions_for(tmp_path, tiny_dir):
    """A memory the greedy request got too few questions for is asked again, sampled, and gets new questions up to
    the number asked; a memory that got enough is not asked again; no retries, no top-up."""
    from types import SimpleNamespace

    from sleepctl.data import write_questions
    from sleepctl.models import load_tokenizer
    from sleepctl.recipe import load_recipe
    from sleepctl.records import Trace

    def trace(i: str, text: str) -> Trace:
        w = "2026-11-01T09:00:00"
        return Trace(id=i, hash=i, kind="note", text=text, source="t", created_at=w, updated_at=w)

    short = trace("a", "Decision note 7: the Gorsewing API will cap requests at 340 per minute per tenant.")
    full = trace("b", "The Kestrel build server moved from Dublin to Tallinn.")
    calls: list = []

    class Teacher:
        def generate(self, prompts, max_new_tokens, temperature, seed):
            calls.append((len(prompts), temperature, seed))
            out = []
            for p in prompts:
                if "Gorsewing" in p and temperature == 0.0:
                    out.append("1. Who capped the Gorsewing API?\n2. Why the cap?")
                elif "Gorsewing" in p:  # sampled: one repeat (another case), new ones
                    out.append(
                        "who capped the Gorsewing API?\nWhat is the Gorsewing API cap?\nHow many requests a minute?"
                    )
                else:
                    out.append("\n".join(f"Where did Kestrel go, part {k}?" for k in range(6)))
            return SimpleNamespace(texts=out)

    tok = load_tokenizer(str(tiny_dir))
    ov = {"data.questions_per_memory": 3, "data.probes_per_memory": 1}
    cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)), ov)
    qs = write_questions([short, full], cfg, Teacher(), tok, seed=5)
    assert qs["a"] == [
        "Who capped the Gorsewing API?",
        "Why the cap?",
        "What is the Gorsewing API cap?",
        "How many requests a minute?",
    ]
    assert len(qs["b"]) == 4
    assert calls == [(2, 0.0, 5), (1, cfg.loss.teacher_temperature, 105)]  # only the short one, sampled
    calls.clear()
    cfg, _ = load_recipe(str(write_recipe(tmp_path / "r.yaml", tiny_dir)), {**ov, "data.question_retries": 0})
    assert write_questions([short, full], cfg, Teacher(), tok, seed=5)["a"] == [
        "Who capped the Gorsewing API?",
        "Why the cap?",
    ]
    assert len(calls) == 1
