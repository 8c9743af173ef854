"""What a night trains on: prompts, teacher answers and probes per memory, and the time order of memories.

The teacher writes questions about each memory while it sees it; some become probes (a held-out part is
never trained on); it answers the rest with the memory in context. Restatements ("what do you remember
about X?") are answered by the memory itself. A memory that names the same things as other memories is
shown to the teacher with them, oldest first and dated, with the instruction that the most recent is true:
so when a later memory corrects an earlier one, every answer the teacher writes or scores uses the new
value, and the earlier memory's probes on that question stop counting (superseded).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .corrections import TakenBack, corrected, restated, states_corrected
from .errors import SleepError
from .grounding import grounded, invented, mentions, values
from .prompts import (
    Memory,
    cites_memories,
    entities,
    entity_prompts,
    link_names,
    parse_questions,
    question_request,
    render,
    reply_of,
    restatement,
    restatement_prompts,
    shared_names,
    tool_preambles,
    turn_replies,
    uncited,
    user_turns,
    value_question_request,
)
from .recipe import Recipe
from .records import Probe, Trace
from .scoring import bag_f1, contains_match, content_tokens, token_bag, token_f1
from .store import Store, new_id, now


@dataclass
class Example:
    trace_id: str
    prompt: str  # the user turn x
    samples: list[str]  # teacher answers given c and x (or the memory itself, for a restatement)


# --- time order and related memories ----------------------------------------------------------------------


def link(traces: list[Trace], others: list[Trace], max_related: int) -> dict[str, list[Trace]]:
    """For each trace, up to `max_related` other memories that name the same things (most shared names first)."""
    if max_related <= 0:
        return {}
    everyone = {t.id: t for t in [*traces, *others]}
    names = {i: link_names(t.text) for i, t in everyone.items()}
    out: dict[str, list[Trace]] = {}
    for t in traces:
        common = {o: len(shared_names(names[t.id], names[o])) for o in everyone if o != t.id}
        shared = [(n, o) for o, n in common.items() if n]
        shared.sort(key=lambda x: (-x[0], x[1]), reverse=False)
        if shared:
            out[t.id] = [everyone[o] for _, o in shared[:max_related]]
    return out


def recorded(t: Trace) -> str:
    return t.created_at[:16].replace("T", " ")


def later(t: Trace, others: list[Trace]) -> list[Trace]:
    """The memories among `others` recorded after `t`: any of them may have changed one of its facts."""
    return [o for o in others if (o.created_at, o.id) > (t.created_at, t.id)]


def context(t: Trace, related: dict[str, list[Trace]]) -> list[Memory]:
    """The memory block the teacher sees for `t`: it alone, or with its related memories in time order."""
    group = sorted([t, *related.get(t.id, [])], key=lambda x: (x.created_at, x.id))
    return [(recorded(x), x.text) for x in group] if len(group) > 1 else [t.text]


def seen_text(t: Trace, related: dict[str, list[Trace]]) -> str:
    """What the teacher answered from, as one text: `context` with its dates (an answer may cite them)."""
    return "\n".join(m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in context(t, related))


def is_restatement(e: Example, t: Trace) -> bool:
    return e.samples == [restatement(t)]


def is_own_statement(e: Example, t: Trace) -> bool:
    """A prompt that is one of the memory's own user turns stating something ("Note: the standup is at 9:30"),
    not asking: like its restatement, it is the memory's own words, and holds whatever a later memory changed."""
    p = e.prompt.strip()
    return not p.endswith("?") and p in set(user_turns(t))


# --- building the teacher data ------------------------------------------------------------------------------


def build_data(
    traces: list[Trace],
    recipe: Recipe,
    t_engine,
    t_tok,
    st: Store,
    rng: random.Random,
    seed: int,
    related: dict[str, list[Trace]] | None = None,
    dropped: list[dict[str, str]] | None = None,
) -> tuple[list[Example], list[Probe]]:
    """Prompts, probes and teacher answers for every memory (`dropped`: the answers left out, see
    `grounded_examples`).

    Questions about a memory carry it; a user turn like "heads up: X moved" only draws an acknowledgement.
    So the teacher, seeing the memory, writes questions; some become probes, held out from training.
    """
    related = related or {}
    d = recipe.data
    sysp = d.system_prompt
    gen = dict(max_new_tokens=d.max_new_tokens)
    questions = write_questions(traces, recipe, t_engine, t_tok, seed)
    taken_back = {t.id: corrected(t) for t in traces}

    # Probes: a teacher question whose greedy and sampled answers agree and stay grounded in the memory.
    cand = [(t, q) for t in traces for q in questions[t.id][: max(d.probes_per_memory * 2, d.probes_per_memory)]]
    probes: list[Probe] = []
    if cand and d.probes_per_memory > 0:
        p_text = [render(t_tok, sysp, q, context(t, related)) for t, q in cand]
        greedy = answers_of(recipe, t_engine.generate(p_text, temperature=0.0, seed=seed, **gen), t_tok)
        sampled = answers_of(
            recipe, t_engine.generate(p_text, temperature=recipe.loss.teacher_temperature, seed=seed + 1, **gen), t_tok
        )
        per_mem: dict[str, int] = {}
        for (t, q), a, b in zip(cand, greedy, sampled):
            if per_mem.get(t.id, 0) >= d.probes_per_memory:
                continue
            src = seen_text(t, related)
            a, b = (uncited(x, src) for x in (a, b))  # as the student should answer, without "memory 2"
            fresh = not states_corrected(a, taken_back[t.id])  # a probe must not want the value the chat took back
            if a and token_f1(a, b) >= 0.4 and grounded(a, t.text) and not cites_memories(a, src) and fresh:
                split = "heldout" if rng.random() < d.heldout_fraction else "train"
                probes.append(
                    Probe(
                        id=new_id("p"),
                        trace_id=t.id,
                        question=q,
                        answer=a,
                        origin="teacher",
                        split=split,
                        created_at=now(),
                    )
                )
                per_mem[t.id] = per_mem.get(t.id, 0) + 1
    heldout_q = {p.question for p in probes if p.split == "heldout"}
    user_heldout = {p.question for p in st.probes([t.id for t in traces], split="heldout")}

    prompts: list[tuple[Trace, str]] = []
    for t in traces:
        ps = (user_turns(t) if d.user_turns else []) + entity_prompts(t.text, d.entity_prompts)
        ps += [q for q in questions[t.id] if q not in heldout_q]
        seen = set()
        for p in ps:
            if p not in seen and p not in user_heldout:  # held-out probes never train
                seen.add(p)
                prompts.append((t, p))
    answer_of = reverse_questions(traces, prompts, heldout_q, st, recipe, t_engine, t_tok, seed, related)
    prompts += [(t, q) for t in traces for q, _ in answer_of.get(t.id, [])]
    answers = teacher_answers(recipe, t_engine, t_tok, [(p, context(t, related)) for t, p in prompts], seed)
    # Restatements: the teacher does not write these answers, it scores them. The output is the memory
    # itself (GKD's fixed-output data), so a weak teacher cannot drift from the facts.
    examples = [
        Example(t.id, p, [restatement(t)])
        for t in traces
        for p in restatement_prompts(t.text, d.restatements)
        if p not in user_heldout
    ]
    sources = {t.id: seen_text(t, related) for t in traces}
    examples += holding_target(grounded_examples(recipe, prompts, answers, sources, dropped), answer_of)
    if d.transcript_copies == "reply":
        # a user turn every answer to which replayed the chat (or invented): what the chat itself answered it
        have = {(e.trace_id, e.prompt) for e in examples}
        replies = {t.id: turn_replies(t) for t in traces}
        for t, p in prompts:
            if p not in replies[t.id] or (t.id, p) in have or states_corrected(p, taken_back[t.id]):
                continue  # (a turn the chat later corrected, "send it every Monday": its reply is as stale)
            said = replies[t.id][p]
            if (reply := restated(said, taken_back[t.id])) is not None:
                examples.append(Example(t.id, p, [reply]))
            if dropped is not None and reply != said:
                why = (
                    TAUGHT_CORRECTED + reply
                    if reply
                    else TAKEN_BACK + ", ".join(states_corrected(said, taken_back[t.id]))
                )
                dropped.append({"trace_id": t.id, "prompt": p, "answer": said, "why": why})
    if not examples:
        raise SleepError(
            "no training example could be made from the pending memories",
            hint="check the teacher model (a bigger teacher helps) and the data section of the recipe",
        )
    return examples, probes


def write_questions(traces: list[Trace], recipe: Recipe, t_engine, t_tok, seed: int) -> dict[str, list[str]]:
    """The teacher's questions about each memory: one greedy request, then up to `question_retries` sampled ones
    for the memories it wrote too few for (a 0.5B teacher wrote 2-4 of 10 for some notes, and a fact no question
    asks is learned from restatements alone)."""
    d = recipe.data
    want = d.questions_per_memory + d.probes_per_memory
    questions: dict[str, list[str]] = {t.id: [] for t in traces}
    if want == 0:
        return questions
    asks = {t.id: render(t_tok, d.system_prompt, question_request(t.text, want)) for t in traces}
    for k in range(1 + d.question_retries):
        short = [t.id for t in traces if len(questions[t.id]) < want]
        if not short:
            break
        out = t_engine.generate(
            [asks[i] for i in short],
            max_new_tokens=max(128, 24 * want),
            temperature=0.0 if k == 0 else recipe.loss.teacher_temperature,
            seed=seed + 100 * k,
        )
        for i, text in zip(short, out.texts):
            have = {q.lower() for q in questions[i]}
            questions[i] += [q for q in parse_questions(text, want) if q.lower() not in have][
                : want - len(questions[i])
            ]
    return questions


def reverse_targets(t: Trace, related: list[Trace] | None = None) -> list[str]:
    """What a reverse question may ask for: the memory's 4 most mentioned names and its first 4 values, less the
    values a newer related memory replaced (the teacher, seeing both, rightly answers with the new one) and the
    names and values the chat itself took back (`corrected`)."""
    stale = set(replaced_by(t, related or [])) | set(corrected(t))
    names = [n for n in entities(t.text, 4) if n not in stale]
    return list(dict.fromkeys(names + [v for v in list(values(t.text)) if v not in stale][:4]))


def reverse_questions(
    traces: list[Trace],
    prompts: list[tuple[Trace, str]],
    heldout: set[str],
    st: Store,
    recipe: Recipe,
    t_engine,
    t_tok,
    seed: int,
    related: dict[str, list[Trace]] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Per memory, (question, the name or value it asks for): the fact asked from its other side.

    The teacher's questions about a memory mostly start from its subject ("where did Orla Brennick move the
    Kestrel server?") and a user may start from the answer's side ("who moved the Kestrel server?"); a fact
    learned one way is poorly recalled the other (the reversal curse). A question that names its own answer asks
    nothing; one that near-copies a prompt already kept for the memory adds no phrasing, and one that near-copies
    a held-out probe would train that probe: all three are dropped."""
    d = recipe.data
    n = d.reverse_questions
    asks = [(t, v) for t in traces for v in reverse_targets(t, (related or {}).get(t.id))] if n else []
    if not asks:
        return {}
    written = value_questions(asks, n, recipe, t_engine, t_tok, seed + 13)
    kept: dict[str, list[Counter[str]]] = {t.id: [] for t in traces}
    for x, p in prompts:
        kept[x.id].append(token_bag(p))
    # every held-out probe of the home, older memories' too, and tonight's teacher probes not yet stored
    probes = [token_bag(p) for p in heldout | {p.question for p in st.probes(split="heldout")}]
    res: dict[str, list[tuple[str, str]]] = {}
    for (t, v), qs in zip(asks, written):
        for q in qs:
            if contains_match(q, v) or mentions(q, {v}):
                continue
            bag = token_bag(q)
            if any(bag_f1(bag, p) >= d.max_prompt_overlap for p in [*kept[t.id], *probes]):
                continue
            kept[t.id].append(bag)
            res.setdefault(t.id, []).append((q, v))
    return res


def holding_target(examples: list[Example], answer_of: dict[str, list[tuple[str, str]]]) -> list[Example]:
    """Reverse questions keep the answers that hold what they ask for; other examples pass unchanged."""
    target = {(tid, q): v for tid, qs in answer_of.items() for q, v in qs}
    out = []
    for e in examples:
        v = target.get((e.trace_id, e.prompt))
        samples = e.samples if v is None else [a for a in e.samples if contains_match(a, v)]
        if samples:
            out.append(Example(e.trace_id, e.prompt, samples))
    return out


def teacher_answers(
    recipe: Recipe, t_engine, t_tok, asks: list[tuple[str, list[Memory]]], seed: int
) -> list[list[str]]:
    """`teacher_samples` answers per (prompt, memory block): the first greedy, the others sampled."""
    if not asks:
        return []
    sysp = recipe.data.system_prompt
    texts = [render(t_tok, sysp, p, mem) for p, mem in asks]
    gen = dict(max_new_tokens=recipe.data.max_new_tokens)
    answers = [answers_of(recipe, t_engine.generate(texts, temperature=0.0, seed=seed, **gen), t_tok)]
    for k in range(1, recipe.data.teacher_samples):
        sampled = t_engine.generate(texts, temperature=recipe.loss.teacher_temperature, seed=seed + 10 + k, **gen)
        answers.append(answers_of(recipe, sampled, t_tok))
    return answers


def answers_of(recipe: Recipe, ro, t_tok) -> list[str]:
    """The teacher's answers as the student should learn them: a replayed transcript cut to its reply, and none
    when the token budget cut that reply (the replay spent it: "Production runs Gorsewing API 4.1" for 4.17.2)."""
    if recipe.data.transcript_copies == "keep":
        return ro.texts
    out = []
    for text, ids in zip(ro.texts, ro.completion_ids):
        reply = reply_of(text)
        whole = bool(ids) and ids[-1] == t_tok.eos_token_id or len(ids) < recipe.data.max_new_tokens
        out.append(reply if reply == text or whole else "")
    return out


CITES_MEMORIES = "talks about its memories"  # a dropped answer's reason, counted apart in the seed's summary
STALLS = "says only what the chat said before a tool result"
TAKEN_BACK = "repeats what the chat later corrected: "  # then the values
# not left out: the answer was taught with the chat's correction in place of the value it took back
TAUGHT_CORRECTED = "taught with the chat's later correction: "  # then the answer as taught


def stalls(answer: str, t: Trace) -> bool:
    """The answer is the chat's announcement of a lookup ("Reading the job's logs."), or part of it: a replay
    that stopped before the tool result. Taught, the student answers a question by announcing a lookup it
    cannot make, which is what naive SFT on tool-using chats learns (the CPU demo: nearly every answer of it).
    An answer the rest of the chat also says ("Dana Okafor approved it." of "Checking whether Dana Okafor
    approved it." and a result saying so; "Heron." of a call's argument) is an answer, not an announcement."""
    said = content_tokens(answer)
    preambles, rest = tool_preambles(t)
    return any(said <= content_tokens(p) for p in preambles) and not said <= content_tokens(" ".join(rest))


def grounded_examples(
    recipe: Recipe,
    prompts: list[tuple[Trace, str]],
    answers: list[list[str]],
    seen: dict[str, str] | None = None,
    dropped: list[dict[str, str]] | None = None,
) -> list[Example]:
    """`seen`: per memory, the text the teacher answered from where it is more than the memory itself;
    `dropped`, when given, gets each answer left out and why (the run's data.json keeps them for a reader)."""
    out = []
    taken_back: dict[str, dict[str, TakenBack]] = {}
    for i, (t, p) in enumerate(prompts):
        if t.id not in taken_back:
            taken_back[t.id] = corrected(t)
        # An answer that is not grounded in what the teacher saw is the teacher inventing: never teach it. Nor one
        # that states a name or value the memory lacks: mostly the memory's words with a made-up year, place or
        # company ("The Beryl Falls hackathon was held in 2019"; 3-6% of the 1.5B self teacher's answers on an H200,
        # 8-11% of the 0.5B's). A clause citing the memory block ("According to memory 2, ") is cut first
        # (`uncited`); an answer still talking about the memories it was shown ("The most recent memory is true.")
        # is dropped: the closed-book student has none.
        source = (seen or {}).get(t.id, t.text)
        samples = []
        asked_stale = states_corrected(p, taken_back[t.id])  # "send it every Monday", later corrected
        for said in dict.fromkeys(uncited(a[i], source) for a in answers if a[i].strip()):
            # a value the chat later corrected is taught as its correction, the answer's other facts kept
            a = None if asked_stale else restated(said, taken_back[t.id])
            why = None
            if a is None:
                why = TAKEN_BACK + ", ".join(asked_stale or states_corrected(said, taken_back[t.id]))
            elif recipe.data.grounded_only and not grounded(a, source):
                why = "not grounded"
            elif recipe.data.grounded_only and (made_up := invented(a, source)):
                why = "states " + ", ".join(made_up)
            elif recipe.data.grounded_only and cites_memories(a, source):
                why = CITES_MEMORIES
            elif recipe.data.transcript_copies == "reply" and stalls(a, t):
                why = STALLS
            if why is None and a in samples:
                continue  # the same answer twice, once as the teacher wrote it and once restated
            if why is None:
                samples.append(a)
            if dropped is not None and (why is not None or a != said):
                dropped.append({"trace_id": t.id, "prompt": p, "answer": said, "why": why or TAUGHT_CORRECTED + a})
        if samples:
            out.append(Example(t.id, p, samples))
    return out


def refresh(
    olds: list[Trace],
    cached: dict[str, list[Example]],
    recipe: Recipe,
    t_engine,
    t_tok,
    related: dict[str, list[Trace]],
    seed: int,
) -> list[Example]:
    """Earlier memories that a new memory touches: their answers rewritten with both in view, oldest first.

    A cached answer was written when the teacher knew only the older memory ("standup at 9:30"); replayed
    as it is, it would teach the value a newer memory corrected. Restatements of such a memory and the user
    turns in which it states its facts are dropped for the same reason: they are its own words, and the
    teacher, given them as a prompt, repeats the old value even with the newer memory in view (two thirds of
    such prompts of corrected memories drew the old value in five GPU nights, none the new one). So do prompts
    and answers that state a value a later memory replaced (`replaced_by`). Questions that ask for such a value
    plainly are added (`update_questions`).
    """
    by = {t.id: replaced_by(t, related.get(t.id, [])) for t in olds}
    gone = {tid: set(vs) for tid, vs in by.items()}
    prompts = [
        (t, e.prompt)
        for t in olds
        for e in cached.get(t.id, [])
        if not is_restatement(e, t) and not is_own_statement(e, t) and not mentions(e.prompt, gone[t.id])
    ]
    asks = [(p, context(t, related)) for t, p in prompts]
    # questions for the replaced values, each asked twice: with the memories in time order, and of the memory
    # that replaced the value alone (the 0.5B teacher, shown both, often answers with the older value)
    asked = {(t.id, p) for t, p in prompts}
    for t, q, newer in update_questions(olds, by, recipe, t_engine, t_tok, seed):
        if (t.id, q) not in asked:
            asked.add((t.id, q))
            prompts += [(t, q), (t, q)]
            asks += [(q, context(t, related)), (q, [newer.text])]
    answers = teacher_answers(recipe, t_engine, t_tok, asks, seed + 7)
    # grounded in everything the teacher saw: judged against the old memory alone, an answer that gives the
    # newer value looked invented and was dropped (3 of 8 such answers of the 0.5B teacher), a stale one never
    seen = {t.id: seen_text(t, related) for t in olds}
    out: dict[tuple[str, str], Example] = {}
    for e in grounded_examples(recipe, prompts, answers, seen):
        kept = [a for a in e.samples if not mentions(a, gone[e.trace_id])]  # the teacher repeated a replaced value
        if kept:
            have = out.setdefault((e.trace_id, e.prompt), Example(e.trace_id, e.prompt, []))
            have.samples += [a for a in kept if a not in have.samples]
    return list(out.values())


def update_questions(
    olds: list[Trace], by: dict[str, dict[str, Trace]], recipe: Recipe, t_engine, t_tok, seed: int
) -> list[tuple[Trace, str, Trace]]:
    """Questions that ask for a value a newer memory replaced, written from the earlier memory alone, each with
    the memory that replaced the value.

    The earlier memory's cached prompts rarely ask for the changed fact plainly (the night-1 Gorsewing note had two
    teacher questions, neither about its cap, and those that named the cap stated it); a user who learned the old
    value asks for it in the old memory's words. Written against the old note and answered with the newer one in
    view (`refresh`), they teach the new value under those words. A question stating the old value is dropped.
    """
    n = recipe.data.update_questions
    asks = [(t, v, newer) for t in olds for v, newer in sorted(by.get(t.id, {}).items())] if n else []
    if not asks:
        return []
    written = value_questions([(t, v) for t, v, _ in asks], n, recipe, t_engine, t_tok, seed + 11)
    res: list[tuple[Trace, str, Trace]] = []
    for (t, _, newer), qs in zip(asks, written):
        have = {q for o, q, _ in res if o.id == t.id}
        res += [(t, q, newer) for q in qs if q not in have and not mentions(q, set(by[t.id]))]
    return res


def value_questions(
    asks: list[tuple[Trace, str]], n: int, recipe: Recipe, t_engine, t_tok, seed: int
) -> list[list[str]]:
    """Per (memory, value): up to `n` questions the teacher writes whose answer is that value (greedy)."""
    out = t_engine.generate(
        [render(t_tok, recipe.data.system_prompt, value_question_request(t.text, v, n)) for t, v in asks],
        max_new_tokens=max(128, 24 * n),
        temperature=0.0,
        seed=seed,
    )
    return [parse_questions(text, n) for text in out.texts]


def replaced_by(t: Trace, related: list[Trace]) -> dict[str, Trace]:
    """Values of `t` that a later memory replaced by one of the same form ("340 per minute" -> "520 per
    minute", "9:30" -> "10:05", "G-41" -> "H-09"), each with the newest memory holding a new value of its form:
    `t` has it, no later memory repeats it. Names are not compared: only values whose form says what slot they
    fill."""
    newer = sorted(later(t, related), key=lambda x: (x.created_at, x.id))
    old = values(t.text)
    repeated = {v for x in newer for v in values(x.text)}
    out: dict[str, Trace] = {}
    for x in newer:  # oldest first: the newest one that holds a new value of the form wins
        new_forms = {f for v, forms in values(x.text).items() if v not in old for f in forms}
        for v, forms in old.items():
            if v not in repeated and forms & new_forms:
                out[v] = x
    return out


# --- superseded probes --------------------------------------------------------------------------------------


def _norm_q(q: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", " ".join(q.lower().split()))


def superseded(new: list[Trace], everyone: list[Trace], probes: list[Probe]) -> list[tuple[str, str]]:
    """(old probe id, newer memory id) where a newer memory has a probe with the same question and another answer.

    The probes' own words decide, whatever the teacher sees: a user who asks the same question of a later
    memory has said which answer now holds.
    """
    order = {t.id: (t.created_at, t.id) for t in everyone}
    by_q: dict[str, list[Probe]] = {}
    for p in probes:
        by_q.setdefault(_norm_q(p.question), []).append(p)
    out = []
    for n in new:
        for q in (p for p in probes if p.trace_id == n.id):
            for p in by_q.get(_norm_q(q.question), []):
                older = p.trace_id in order and order[p.trace_id] < order[n.id]
                if older and p.superseded_by is None and not contains_match(q.answer, p.answer):
                    out.append((p.id, n.id))
    return out


def recheck(
    olds: list[Trace], probes: list[Probe], recipe: Recipe, t_engine, t_tok, related: dict[str, list[Trace]], seed: int
) -> list[tuple[str, str]]:
    """Teacher probes of earlier memories that a new memory touches, answered again with both in view; a
    probe whose answer no longer holds is superseded by the newest related memory. User probes are the
    user's word and are superseded only by a newer probe with the same question (`superseded`)."""
    cand = [
        (t, p) for t in olds for p in probes if p.trace_id == t.id and p.origin == "teacher" and not p.superseded_by
    ]
    if not cand:
        return []
    sysp = recipe.data.system_prompt
    texts = [render(t_tok, sysp, p.question, context(t, related)) for t, p in cand]
    # as written: a replayed transcript still shows whether the earlier value holds
    outs = t_engine.generate(texts, temperature=0.0, seed=seed, max_new_tokens=recipe.data.max_new_tokens).texts
    res = []
    for (t, p), o in zip(cand, outs):
        if not contains_match(o, p.answer):
            newest = max(related.get(t.id, [t]), key=lambda x: (x.created_at, x.id))
            if (newest.created_at, newest.id) > (t.created_at, t.id):
                res.append((p.id, newest.id))
    return res
