"""`sleepctl eval`: what a sleep bought (recall) and what it cost (forgetting), on the same held-out probes.

Methods, all greedy and seeded: base (no adapter, closed-book), in-context (the memory asked about in the
prompt, no adapter), sleep (the adapter stack, closed-book), and with baselines naive SFT on the raw
traces at the seed run's budget. Metrics: contains-match (headline), token F1, and the MiniLM judge.
Forgetting: perplexity on a fixed general text, and recall of memories consolidated in earlier sleeps.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, computed_field
from rich.console import Console

from . import distributed
from .adapters import attach_stack, lineage, stack_lora
from .anchor import kl_drift
from .engines import HFEngine, lora_capacity, release_engines, rollout_engine
from .errors import ModelError, SleepError
from .general_text import reference_paragraphs
from .home import open_home, private_umask
from .models import load_model, resolve
from .prompts import render
from .recipe import Recipe, load_recipe, with_overrides
from .records import Adapter, Probe, Trace
from .runs import seed_everything
from .scoring import recalled, token_f1
from .store import Store, new_id


class ProbeResult(BaseModel):
    probe_id: str
    trace_id: str
    origin: str = "user"  # user | teacher
    question: str
    reference: str
    output: str
    contains: bool
    f1: float
    judge: bool | None = None


def recall_of(results: list[ProbeResult], origin: str) -> float | None:
    """Contains-recall on the user's own probes or on the teacher's, apart: a user asks the first kind."""
    hits = [r.contains for r in results if r.origin == origin]
    return sum(hits) / len(hits) if hits else None


class MethodResult(BaseModel):
    method: str
    group: str  # new | retention
    n: int
    contains: float
    f1: float
    judge: float | None = None
    results: list[ProbeResult] = []

    @computed_field
    @property
    def user(self) -> float | None:  # in eval.json and --json too
        return recall_of(self.results, "user")

    @computed_field
    @property
    def teacher(self) -> float | None:
        return recall_of(self.results, "teacher")


class EvalReport(BaseModel):
    target: str | None
    adapter_version: int | None
    student: str
    probes_new: int
    probes_retention: int
    methods: list[MethodResult]
    perplexity: dict[str, float]
    kl_drift: float | None = None  # KL(base || adapter) per token on fixed generic prompts
    superseded: int = 0  # probes left out because a newer memory answers their question differently
    notes: list[str] = []
    baseline: dict[str, Any] = {}
    wall_s: float = 0.0
    path: str | None = None

    def table(self) -> list[dict[str, Any]]:
        base_ppl = self.perplexity.get("base")
        rows = []
        for m in self.methods:
            ppl = self.perplexity.get(m.method)
            rows.append(
                {
                    "method": m.method,
                    "group": m.group,
                    "n": m.n,
                    "contains": m.contains if m.n else None,  # a group without probes has no recall, not 0%
                    "user": m.user,
                    "teacher": m.teacher,
                    "f1": m.f1,
                    "judge": m.judge,
                    "ppl": ppl,
                    "ppl_change": (ppl / base_ppl - 1) if ppl and base_ppl else None,
                }
            )
        return rows


@torch.no_grad()
def perplexity(model, tok, texts: list[str], max_len: int = 256, batch_size: int = 8) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    tok.padding_side = "right"
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_len).to(
            device
        )
        logits = model(**enc, use_cache=False).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        lp = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        nll += lp[mask].sum().item()
        count += int(mask.sum())
    return math.exp(nll / max(count, 1))


# --- answering ---------------------------------------------------------------------------------------------


def answer(
    model,
    tok,
    probes: list[Probe],
    recipe: Recipe,
    memories: dict[str, str] | None = None,
    seed: int = 0,
    engine=None,
) -> list[str]:
    """Greedy closed-book (or, with `memories`, in-context) answers; through `engine` (vLLM, already serving
    the adapter to test) when given, else Hugging Face `generate` on `model`."""
    sysp = recipe.data.system_prompt
    prompts = [render(tok, sysp, p.question, [memories[p.trace_id]] if memories else None) for p in probes]
    eng = engine or HFEngine(model, tok, recipe.eval.batch_size)
    return eng.generate(prompts, max_new_tokens=recipe.eval.max_new_tokens, temperature=0.0, seed=seed).texts


def inference_engine(cfg: Recipe, model, tok, lora_rank: int):
    """The process's vLLM engine for the student when the recipe says vllm and this machine can run it."""
    if cfg.engine != "vllm":
        return None
    from .vllm_engine import unavailable_reason

    if unavailable_reason() is not None:
        return None
    return rollout_engine(cfg, model, tok, resolve(cfg.model_name(cfg.student)).path, lora_rank)


def score(method: str, group: str, probes: list[Probe], outputs: list[str], recipe: Recipe) -> MethodResult:
    res = [
        ProbeResult(
            probe_id=p.id,
            trace_id=p.trace_id,
            origin=p.origin,
            question=p.question,
            reference=p.answer,
            output=o,
            contains=recalled(o, p.answer, p.question, p.origin),
            f1=token_f1(o, p.answer),
        )
        for p, o in zip(probes, outputs)
    ]
    judge_rate = None
    if recipe.eval.judge == "minilm" and res:
        from . import judge

        sims = judge.similarity([r.output for r in res], [f"{p.question} {p.answer}" for p in probes])
        for r, s in zip(res, sims.tolist()):
            r.judge = r.contains or s >= recipe.eval.judge_threshold
        judge_rate = sum(bool(r.judge) for r in res) / len(res)
    n = len(res)
    return MethodResult(
        method=method,
        group=group,
        n=n,
        contains=sum(r.contains for r in res) / n if n else 0.0,
        f1=sum(r.f1 for r in res) / n if n else 0.0,
        judge=judge_rate,
        results=res,
    )


# --- the entry point -----------------------------------------------------------------------------------------


def resolve_target(st: Store, target: str | None) -> Adapter | None:
    """A run id (its adapter), an adapter id or version, or the current adapter."""
    if target is None:
        cur = st.current_adapter_id()
        return st.adapter(cur) if cur else None
    if target in ("base", "none"):
        return None
    try:
        run = st.run(target)
    except SleepError:
        return st.adapter(target)
    aid = run.summary.get("adapter_id")
    if not aid:
        raise SleepError(f"run {run.id} ({run.status}) produced no adapter")
    return st.adapter(aid)


def run_recipe(a: Adapter | None, st: Store) -> Recipe | None:
    if a is None:
        return None
    p = Path(st.run(a.run_id).dir) / "recipe.yaml"
    return load_recipe(p)[0] if p.exists() else None


def job_recipe(st: Store, recipe: str | None, overrides: dict | None, a: Adapter | None = None) -> Recipe:
    """The recipe a job runs with: the one named; else the one that trained the adapter (default: the current
    one), so a `dream` or `eval` after a GPU seed keeps its models instead of falling back to the CPU default."""
    if recipe is None:
        if a is None and st.current_adapter_id():
            a = st.adapter(st.current_adapter_id())
        cfg = run_recipe(a, st)
        if cfg is not None:
            return with_overrides(cfg, overrides)
    return load_recipe(recipe, overrides)[0]


def evaluate(
    target: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    recipe: str | None = None,
    student: str | None = None,
    baselines: bool = False,
    overrides: dict | None = None,
    keep_outputs: bool = True,
    keep_engines: bool = False,
    show_progress: bool = False,
) -> EvalReport:
    """Evaluate an adapter (default: the current one). `keep_engines`: leave a vLLM engine running for the
    next job of this process. `show_progress`: say on stderr what it is doing (on a CPU, minutes)."""
    distributed.refuse("eval")  # one process: only seed trains across several
    t0 = time.time()

    def step(what: str) -> None:
        if show_progress:
            Console(stderr=True).print(f"[dim]eval {time.time() - t0:5.0f} s: {what}[/dim]", highlight=False)

    h = open_home(home)
    st = Store(h.db_path, readonly=True)  # eval writes its report beside the run, never the store
    try:
        a = resolve_target(st, target)
        notes: list[str] = []
        cfg = job_recipe(st, recipe, overrides, a)
        student_name = cfg.model_name(student or cfg.student)
        if a is not None and a.base_model != student_name:
            raise ModelError(
                f"adapter v{a.version} was trained on {a.base_model!r}, not on the student {student_name!r}",
                hint="evaluate with the student it was trained on (--student), or pick another adapter",
            )
        stack = lineage(st, a.id) if a else []
        new_ids = a.trace_ids if a else [t.id for t in st.traces()]
        old_ids = list(dict.fromkeys(tid for x in stack[:-1] for tid in x.trace_ids if tid not in set(new_ids)))
        traces: dict[str, Trace] = {t.id: t for t in st.traces()}
        if a is None:
            notes.append("no adapter yet: reporting base and in-context only")
        every = st.probes(split="heldout")
        heldout = [p for p in every if p.superseded_by is None]
        n_superseded = len(every) - len(heldout)
        if n_superseded:
            notes.append(f"{n_superseded} probes left out: a newer memory answers their question differently")
        p_new = [p for p in heldout if p.trace_id in set(new_ids)]
        p_old = [p for p in heldout if p.trace_id in set(old_ids)]
        missing = [tid for tid in new_ids + old_ids if not any(p.trace_id == tid for p in heldout)]
        if missing:
            notes.append(
                f"{len(missing)} memories have no held-out probes and are not scored: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            )
        if not p_new and not p_old:
            raise SleepError(
                "no held-out probes to evaluate", hint="record probes with the memories, or `sleepctl probe add`"
            )
        seed_everything(cfg.training.seed)
        texts = reference_paragraphs(cfg.eval.ppl_paragraphs)
        mem = {tid: traces[tid].text for tid in traces}
        methods: list[MethodResult] = []
        ppl: dict[str, float] = {}
        baseline: dict[str, Any] = {}

        step(f"loading {student_name}")
        model, tok = load_model(student_name, cfg.training.device, cfg.dtype(cfg.student))
        eng = inference_engine(cfg, model, tok, lora_capacity(cfg, max(len(stack) - 1, 0)))
        if eng is not None:
            eng.serve(None)
        all_p = p_new + p_old
        step(f"base model, closed-book: {len(all_p)} held-out probes")
        outs = answer(model, tok, all_p, cfg, engine=eng)
        methods += _split_score("base", p_new, p_old, outs, cfg)
        step(f"base model, memories in context: {len(all_p)} probes")
        outs = answer(model, tok, all_p, cfg, memories=mem, engine=eng)
        methods += _split_score("in-context", p_new, p_old, outs, cfg)
        step(f"base model, perplexity on {len(texts)} paragraphs")
        ppl["base"] = perplexity(model, tok, texts)

        drift = None
        if a is not None:
            model = attach_stack(model, stack)
            if eng is not None:
                eng.serve(stack_lora(stack), key=f"stack:{a.id}")
            step(f"adapter v{a.version} ({len(stack)} in its stack), closed-book: {len(all_p)} probes")
            outs = answer(model, tok, all_p, cfg, engine=eng)
            methods += _split_score("sleep", p_new, p_old, outs, cfg)
            step(f"adapter v{a.version}, perplexity and KL drift")
            ppl["sleep"] = perplexity(model, tok, texts)
            drift = kl_drift(model, tok, cfg)
            del model
            if baselines:
                step("naive SFT baseline at the same budget: training")
                sft_model, tok = load_model(student_name, cfg.training.device, cfg.dtype(cfg.student))
                from .sft import train_sft

                sft_model, info = train_sft(
                    sft_model,
                    tok,
                    [traces[i] for i in a.trace_ids],
                    cfg,
                    cfg.training.seed,
                    stack=stack[:-1],
                    steps=a.metrics.get("steps"),  # the same number of steps as the run that made the adapter
                )
                step(f"naive SFT baseline: {len(p_new)} probes and perplexity")
                outs = answer(sft_model, tok, p_new, cfg)
                methods += _split_score("naive-sft", p_new, [], outs, cfg)
                ppl["naive-sft"] = perplexity(sft_model, tok, texts)
                baseline = info
                notes.append(
                    f"naive SFT: {info['steps']} steps of batch {cfg.training.batch_size}, LoRA r={cfg.lora.r}, {info['wall_s']:.0f} s"
                )
        if not keep_outputs:
            for m in methods:
                m.results = []
        report = EvalReport(
            target=a.id if a else None,
            adapter_version=a.version if a else None,
            student=student_name,
            probes_new=len(p_new),
            probes_retention=len(p_old),
            methods=methods,
            perplexity=ppl,
            kl_drift=drift,
            superseded=n_superseded,
            notes=notes,
            baseline=baseline,
            wall_s=time.time() - t0,
        )
        folder = Path(st.run(a.run_id).dir) if a else h.root / "evals" / new_id("eval")
        try:
            with private_umask():
                folder.mkdir(parents=True, exist_ok=True)
                report.path = str(folder / "eval.json")
                (folder / "eval.json").write_text(report.model_dump_json(indent=2))
                (folder / "eval-recipe.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
                plot(report, folder / "eval.png", history=_history(st))
        except OSError as e:  # a read-only home is evaluated all the same; only the report is not kept
            report.path = None
            report.notes.append(f"report not saved in {folder}: {e.strerror or e}")
        return report
    finally:
        st.close()
        if not keep_engines:
            release_engines()


def _split_score(
    method: str, p_new: list[Probe], p_old: list[Probe], outs: list[str], cfg: Recipe
) -> list[MethodResult]:
    res = [score(method, "new", p_new, outs[: len(p_new)], cfg)]
    if p_old:
        res.append(score(method, "retention", p_old, outs[len(p_new) :], cfg))
    return res


def rescored(r: EvalReport) -> EvalReport:
    """A saved report scored by today's `recalled`, from the outputs it kept, so that reports written before a
    change of the rule compare with new ones (the file is left as written; the judge keeps its saved verdicts,
    whose similarities are not stored)."""
    for m in r.methods:
        if m.results and len(m.results) == m.n:
            for x in m.results:
                x.contains = recalled(x.output, x.reference, x.question, x.origin)
                if x.judge is not None:  # the judge counts a contains-match as right
                    x.judge = x.judge or x.contains
            m.contains = sum(x.contains for x in m.results) / m.n
            if m.judge is not None:
                m.judge = sum(bool(x.judge) for x in m.results) / m.n
    return r


def _history(st: Store) -> list[dict[str, Any]]:
    """Recall and retention of every earlier evaluated adapter, for the across-sleeps plot."""
    rows = []
    for a in st.adapters():
        p = Path(st.run(a.run_id).dir) / "eval.json"
        if p.exists():
            r = rescored(EvalReport.model_validate_json(p.read_text()))
            get = {(m.method, m.group): m.contains for m in r.methods}
            rows.append(
                {"version": a.version, "new": get.get(("sleep", "new")), "retention": get.get(("sleep", "retention"))}
            )
    return rows


def plot(report: EvalReport, path: Path, history: list[dict[str, Any]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = bool(history and len(history) > 1)
    fig, axes = plt.subplots(1, 2 if multi else 1, figsize=(11 if multi else 6, 4))
    ax = axes[0] if multi else axes
    new = [m for m in report.methods if m.group == "new"]
    ax.bar([m.method for m in new], [100 * m.contains for m in new], color="#4c72b0")
    for i, m in enumerate(new):
        ax.text(i, 100 * m.contains + 1, f"{100 * m.contains:.0f}%", ha="center")
    ax.set_ylabel("held-out recall, contains-match (%)")
    ax.set_ylim(0, 105)
    title = f"adapter v{report.adapter_version}" if report.adapter_version else "no adapter"
    ax.set_title(f"{report.student}, {title}, {report.probes_new} probes")
    if multi:
        ax2 = axes[1]
        vs = [r["version"] for r in history]
        ax2.plot(vs, [100 * (r["new"] or 0) for r in history], "o-", label="new memories")
        ax2.plot(
            vs,
            [100 * r["retention"] if r["retention"] is not None else float("nan") for r in history],
            "s-",
            label="retention",
        )
        ax2.set_xlabel("adapter version (sleep)")
        ax2.set_ylabel("recall (%)")
        ax2.set_ylim(0, 105)
        ax2.legend()
        ax2.set_title("across sleeps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_report(st: Store, ref: str) -> EvalReport:
    a = resolve_target(st, ref)
    if a is None:
        raise SleepError(f"{ref!r} has no adapter to compare")
    p = Path(st.run(a.run_id).dir) / "eval.json"
    if not p.exists():
        raise SleepError(f"adapter v{a.version} has not been evaluated yet", hint=f"sleepctl eval {a.run_id}")
    return rescored(EvalReport.model_validate_json(p.read_text()))


def compare_reports(a: str, b: str, *, home: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Two saved reports side by side, method by method."""
    h = open_home(home)
    with Store(h.db_path, readonly=True) as st:
        for ref in (a, b):  # a mistyped name is the first thing to report
            resolve_target(st, ref)
        ra, rb = load_report(st, a), load_report(st, b)
    keys = list(dict.fromkeys([(m.method, m.group) for m in ra.methods + rb.methods]))
    ma = {(m.method, m.group): m for m in ra.methods}
    mb = {(m.method, m.group): m for m in rb.methods}
    rows = []
    for k in keys:
        x, y = ma.get(k), mb.get(k)
        rows.append(
            {
                "method": k[0],
                "group": k[1],
                "a_contains": x.contains if x else None,
                "b_contains": y.contains if y else None,
                "a_user": x.user if x else None,
                "b_user": y.user if y else None,
                "a_f1": x.f1 if x else None,
                "b_f1": y.f1 if y else None,
                "a_ppl": ra.perplexity.get(k[0]),
                "b_ppl": rb.perplexity.get(k[0]),
            }
        )
    return rows
