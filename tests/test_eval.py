"""eval on tiny models: what is reported, determinism, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleepctl import record
from sleepctl.errors import ModelError, SleepError
from sleepctl.evaluate import evaluate
from sleepctl.seed import seed

from .conftest import EXAMPLES, cli, write_recipe


@pytest.fixture
def seeded(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    return seed(str(recipe), home=home, show_progress=False), recipe


def test_no_adapter_reports_base_and_in_context(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    r = evaluate(home=home, recipe=str(recipe))
    assert {m.method for m in r.methods} == {"base", "in-context"}
    assert any("no adapter yet" in n for n in r.notes)
    assert r.probes_new >= 6 and "base" in r.perplexity
    assert Path(r.path).exists() and (Path(r.path).parent / "eval.png").exists()


def test_eval_current_adapter_with_baselines_and_determinism(home, seeded):
    res, recipe = seeded
    r1 = evaluate(home=home, baselines=True)
    methods = [(m.method, m.group) for m in r1.methods]
    assert methods == [("base", "new"), ("in-context", "new"), ("sleep", "new"), ("naive-sft", "new")]
    assert set(r1.perplexity) == {"base", "sleep", "naive-sft"}
    assert r1.adapter_version == 1 and r1.target == res.adapter_id
    assert Path(res.run_dir, "eval.json").exists() and Path(res.run_dir, "eval.png").exists()
    r2 = evaluate(res.run_id, home=home, baselines=True)  # by run id; same adapter, same numbers
    for a, b in zip(r1.methods, r2.methods):
        assert [x.output for x in a.results] == [x.output for x in b.results]
        assert a.contains == b.contains and a.f1 == b.f1
    assert r1.perplexity == r2.perplexity
    for m in r1.methods:
        for x in m.results:
            assert 0.0 <= x.f1 <= 1.0


def test_retention_after_second_sleep_and_compare(home, tmp_path, seeded):
    first, recipe = seeded
    evaluate(home=home)
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(EXAMPLES.read_text().splitlines()[3:5]) + "\n")
    record([more], home=home)
    second = seed(str(recipe), home=home, show_progress=False)
    r = evaluate(home=home)
    groups = {(m.method, m.group) for m in r.methods}
    assert ("sleep", "retention") in groups and ("base", "retention") in groups
    assert r.probes_retention >= 6
    out = cli("eval", "--compare", first.run_id, "v2", "--home", str(home), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert any(x["method"] == "sleep" and x["a_contains"] is not None and x["b_contains"] is not None for x in rows)
    assert second.adapter_version == 2


def test_missing_probes_are_reported(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    record(text="A memory with no probes at all: Quentin owns the Vireo repo.", home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, data={"probes_per_memory": 0})
    seed(str(recipe), home=home, show_progress=False)
    r = evaluate(home=home)
    assert any("have no held-out probes" in n for n in r.notes)


def test_bad_eval_inputs(home, seeded, tmp_path, tiny_other_tok_dir):
    with pytest.raises(SleepError, match="no run|no adapter"):
        evaluate("seed_doesnotexist", home=home)
    r = cli("eval", "nope123", "--home", str(home))
    assert r.returncode == 1 and b"no adapter 'nope123'" in r.stderr
    with pytest.raises(ModelError, match="was trained on"):
        evaluate(home=home, student=str(tiny_other_tok_dir))
    r = cli("eval", "--home", str(home), "--compare", "v1")
    assert r.returncode == 2 and b"requires 2 arguments" in r.stderr
    r = cli("eval", "--compare", "v1", "v9", "--home", str(home))
    assert r.returncode == 1 and b"no adapter 'v9'" in r.stderr and b"sleepctl adapters list shows them" in r.stderr
    r = cli("eval", "--compare", "v1", "v1", "--home", str(home))
    assert r.returncode == 1 and b"has not been evaluated yet" in r.stderr
    r = cli("eval", "--home", str(tmp_path / "nohome"))
    assert r.returncode == 1 and b"no sleepctl home" in r.stderr


def test_cli_eval_table(home, seeded):
    r = cli("eval", "--home", str(home), "--per-memory")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    for word in ("base", "in-context", "sleep", "contains", "ppl change", "per memory", "ref:"):
        assert word in text
    # minutes on a CPU are not silent: each phase is announced on stderr, never in the table on stdout
    err = r.stderr.decode()
    for phase in ("closed-book", "memories in context", "perplexity on 2 paragraphs", "adapter v1 (1 in its stack)"):
        assert phase in err, err
    assert "closed-book:" not in text


def test_naive_sft_runs_the_steps_the_seed_ran(home, tmp_path, tiny_dir, small_memories):
    """Same budget: a night under steps_per_memory stops before training.max_steps, and so must its baseline."""
    record([small_memories], home=home)
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_dir, training={"max_steps": 12, "steps_per_memory": 0.5, "checkpoint_every": 5}
    )
    res = seed(str(recipe), home=home, show_progress=False)
    assert res.steps == 10  # the floor of a night (min(10, max_steps)) above 0.5 x 3 memories
    r = evaluate(home=home, baselines=True)
    assert r.baseline["steps"] == res.steps and any(f"naive SFT: {res.steps} steps" in n for n in r.notes)


def test_eval_scores_a_teacher_probe_by_what_its_answer_adds_to_the_question():
    from sleepctl.evaluate import score
    from sleepctl.recipe import load_recipe
    from sleepctl.records import Probe

    recipe, _ = load_recipe("quick-cpu", {"eval.judge": "none"})
    probes = [
        Probe(id=f"p{i}", trace_id="m", question=q, answer=a, origin=o, split="heldout", created_at="t")
        for i, (q, a, o) in enumerate(
            [
                (
                    "Who is the manager mentioned in the note?",
                    "The manager mentioned in the note is Fenna Albright.",
                    "teacher",
                ),
                (
                    "Who is the manager mentioned in the note?",
                    "The manager mentioned in the note is Fenna Albright.",
                    "teacher",
                ),
                ("Where does the Kestrel build server run now?", "Tallinn", "user"),
            ]
        )
    ]
    r = score("sleep", "new", probes, ["Fenna Albright", "Dana Okafor", "In Tallinn."], recipe)
    assert [x.contains for x in r.results] == [True, False, True]
    assert r.contains == pytest.approx(2 / 3)


def test_saved_reports_are_compared_as_scored_today(home, seeded):
    """A report written under the strict rule compares with new ones: its kept outputs are scored again on load,
    and the file stays as it was written."""
    from sleepctl.evaluate import compare_reports

    res, _ = seeded
    r = evaluate(home=home)
    saved = json.loads(Path(r.path).read_text())
    sleep = next(m for m in saved["methods"] if m["method"] == "sleep")
    for x in sleep["results"]:  # as a report of the strict rule held a terse right answer to a teacher's sentence
        x.update(
            origin="teacher",
            question="Who is the manager mentioned in the note?",
            reference="The manager mentioned in the note is Fenna Albright.",
            output="Fenna Albright",
            contains=False,
        )
    sleep["contains"] = 0.0
    Path(r.path).write_text(json.dumps(saved))
    rows = compare_reports(res.run_id, res.run_id, home=home)
    row = next(x for x in rows if x["method"] == "sleep" and x["group"] == "new")
    assert row["a_contains"] == row["b_contains"] == 1.0
    assert row["a_user"] is None  # every probe of it now the teacher's: no user recall to show, not 0%
    assert json.loads(Path(r.path).read_text())["methods"] == saved["methods"]


def test_the_eval_table_gives_user_and_teacher_probes_their_own_columns(capsys):
    """A user asks the probes they wrote; the teacher's probes mostly restate the memory. The table shows both
    apart beside the whole, and a method without probes of one origin shows '-' there, not 0%."""
    from sleepctl import cli
    from sleepctl.evaluate import EvalReport, MethodResult, ProbeResult

    def res(origin: str, hit: bool) -> ProbeResult:
        return ProbeResult(
            probe_id="p", trace_id="m", origin=origin, question="q?", reference="r", output="o", contains=hit, f1=0.0
        )

    sleep = [res("user", True), res("user", False), res("user", True), res("user", True), res("teacher", False)]
    methods = [
        MethodResult(method="sleep", group="new", n=5, contains=0.6, f1=0.0, results=sleep),
        MethodResult(method="base", group="new", n=1, contains=0.0, f1=0.0, results=[res("user", False)]),
    ]
    rep = EvalReport(target=None, adapter_version=1, student="s", probes_new=5, probes_retention=0, methods=methods,
                     perplexity={})  # fmt: skip
    rows = {r["method"]: r for r in rep.table()}
    assert (rows["sleep"]["user"], rows["sleep"]["teacher"]) == (0.75, 0.0)
    assert (rows["base"]["user"], rows["base"]["teacher"]) == (0.0, None)
    cli.print_report(rep)
    text = capsys.readouterr().out
    head = next(x for x in text.splitlines() if "method" in x)
    assert [c.strip() for c in head.split("┃")[1:5]] == ["method", "contains", "user", "teacher"]
    cells = {c[0]: c for c in ([y.strip() for y in x.split("│")[1:-1]] for x in text.splitlines() if "│" in x)}
    assert cells["sleep"][1:4] == ["60.0%", "75.0%", "0.0%"]
    assert cells["base"][1:4] == ["0.0%", "0.0%", "-"]
    assert "(4 user, 1 teacher)" in " ".join(text.split())
    # retention rows get a table of their own, and neither is cut to fit 80 columns; a group without probes has
    # no recall ('-'), not 0%
    rep.methods += [
        MethodResult(method="sleep", group="retention", n=5, contains=1.0, f1=1.0, results=sleep),
        MethodResult(method="naive-sft", group="new", n=0, contains=0.0, f1=0.0),
    ]
    rep.probes_retention, rep.perplexity = 5, {"base": 15.13, "sleep": 21.3, "naive-sft": 49.07}
    cli.print_report(rep)
    text = capsys.readouterr().out
    assert "…" not in text and "+224.3%" in text and "retention: 5 probes" in " ".join(text.split())
    cells = {c[0]: c for c in ([y.strip() for y in x.split("│")[1:-1]] for x in text.splitlines() if "│" in x)}
    assert cells["naive-sft"][1:4] == ["-", "-", "-"]
    assert json.loads(rep.model_dump_json())["methods"][0]["user"] == 0.75  # in eval.json and --json too
