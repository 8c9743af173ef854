"""`sleepctl chat`: talk to the current adapter stack (or the plain base), sampled as `eval` samples it.

A conversation is rendered with the student's chat template under the system prompt the stack was trained
with (the recipe of the adapter's run), unless the caller gives its own, and sampled through the same
engine `eval` uses: Hugging Face `generate` on the base with the stack attached (any machine), or vLLM with
the stack served as one LoRA (a CUDA GPU with vLLM, when the recipe or `--engine vllm` says so). So a
one-question chat under the default system prompt answers exactly what `eval`'s sleep row answered.
`serve.py` puts the same object behind an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .errors import SleepError, UsageError
from .home import open_home
from .records import Adapter
from .store import Store

DEFAULT_MAX_NEW_TOKENS = 256
ENGINES = ("auto", "hf", "vllm")
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


class Reply(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class ChatResult(BaseModel):
    """One exchange, as `sleepctl chat --json` prints it."""

    model: str  # the base model name
    adapter_id: str | None  # None: the plain base answered
    adapter_version: int | None
    engine: str
    prompt: str
    answer: str
    finish_reason: str
    usage: dict[str, int]


@dataclass
class Target:
    """What to talk to: the adapter (None: the plain base), its lineage, the recipe it was trained with."""

    adapter: Adapter | None
    stack: list[Adapter]
    recipe: Any  # recipe.Recipe
    student: str
    dtype: str


def open_target(
    home: str | os.PathLike | None,
    adapter_id: str | None = None,
    *,
    base: bool = False,
    recipe: str | None = None,
    require_adapter: bool = True,
) -> Target:
    """The current adapter (or `adapter_id`'s) with its lineage and recipe; `base`: its plain base model."""
    from .adapters import lineage
    from .evaluate import resolve_target, run_recipe
    from .recipe import load_recipe

    h = open_home(home)
    with Store(h.db_path, readonly=True) as st:
        a = resolve_target(st, adapter_id)
        if a is None and require_adapter and not base:
            raise SleepError(
                "no adapter to talk to: the home has no current adapter",
                hint="consolidate memories first (sleepctl seed), or --base to talk to the plain base model",
            )
        cfg = None
        if recipe is None and a is not None:
            try:
                cfg = run_recipe(a, st)
            except SleepError:  # its run was deleted: the default recipe's prompt and settings
                cfg = None
        if cfg is None:
            cfg, _ = load_recipe(recipe)
        stack = lineage(st, a.id) if a is not None else []
    student = a.base_model if a is not None else cfg.model_name(cfg.student)
    dtype = cfg.dtype(cfg.student) if cfg.model_name(cfg.student) == student else "auto"
    return Target(None if base else a, [] if base else stack, cfg, student, dtype)


def pick_engine(engine: str, recipe) -> str:
    """`auto`: vLLM where the recipe asks for it and this machine runs it, else Hugging Face."""
    from .vllm_engine import require_vllm, unavailable_reason

    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: use {', '.join(ENGINES)}")
    if engine == "vllm":
        require_vllm()
        return "vllm"
    if engine == "auto" and recipe.engine == "vllm" and unavailable_reason() is None:
        return "vllm"
    return "hf"


class ChatModel:
    """A model loaded once that answers conversations: the stack of `target`, or the plain base.

    `follow`: before each answer, switch to the home's current adapter if it changed (a server that runs for
    days answers with the newest night; Hugging Face engine only).
    """

    def __init__(
        self,
        home: str | os.PathLike | None = None,
        *,
        adapter_id: str | None = None,
        base: bool = False,
        recipe: str | None = None,
        engine: str = "auto",
        system_prompt: str | None = None,
        follow: bool = False,
        require_adapter: bool = True,
    ):
        self.home, self.recipe_arg, self.base = home, recipe, base
        self.target = open_target(home, adapter_id, base=base, recipe=recipe, require_adapter=require_adapter)
        self.engine_kind = pick_engine(engine, self.target.recipe)
        self.follow = follow and not base and adapter_id is None and self.engine_kind == "hf"
        self.system_prompt = system_prompt if system_prompt is not None else self.target.recipe.data.system_prompt
        self.eng = None
        self._load()

    # --- loading --------------------------------------------------------------------------------------

    def _load(self) -> None:
        t = self.target
        if self.engine_kind == "vllm":
            from .adapters import stack_lora
            from .models import load_tokenizer, resolve
            from .vllm_engine import VLLMEngine

            self.tok = load_tokenizer(t.student)
            lora = stack_lora(t.stack) if t.stack else None
            rank = lora[1]["r"] if lora else None
            eng = VLLMEngine(resolve(t.student).path, self.tok, t.recipe.vllm, lora_rank=rank, seed=0)
            eng.serve(lora, key=t.adapter.id if t.adapter else None)
            self.eng, self.context = eng, t.recipe.vllm.max_model_len
            return
        from .adapters import attach_stack
        from .engines import HFEngine
        from .models import load_model

        model, self.tok = load_model(t.student, t.recipe.training.device, t.dtype)
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        if t.stack:
            model = attach_stack(model, t.stack)
        self.eng = HFEngine(model, self.tok, batch_size=1)

    def refresh(self) -> bool:
        """With `follow`: load the home's current adapter if it is not the one loaded. True when it changed."""
        if not self.follow:
            return False
        h = open_home(self.home)
        with Store(h.db_path, readonly=True) as st:
            cur = st.current_adapter_id()
        if cur == (self.target.adapter.id if self.target.adapter else None):
            return False
        self.eng = None  # the old model goes before the new one loads
        self.target = open_target(self.home, None, recipe=self.recipe_arg, require_adapter=False)
        self._load()
        return True

    def close(self) -> None:
        if self.eng is not None:
            self.eng.close()
            self.eng = None

    # --- what is answering ----------------------------------------------------------------------------

    @property
    def adapter(self) -> Adapter | None:
        return self.target.adapter

    @property
    def fingerprint(self) -> str:
        a = self.target.adapter
        return f"sleepctl-{a.id}" if a else "sleepctl-base"

    def describe(self) -> str:
        a, n = self.target.adapter, len(self.target.stack)
        what = f"adapter v{a.version} ({n} stacked)" if a else "the plain base model"
        return f"{what} on {self.target.student}, {self.engine_kind} engine"

    # --- answering ------------------------------------------------------------------------------------

    def render(self, messages: list[Message]) -> str:
        """The prompt text: every system message joined into one leading system turn (the trained system
        prompt when there is none), then the conversation, then the assistant's turn."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        sysp = "\n\n".join(system) if system else self.system_prompt
        msgs = ([{"role": "system", "content": sysp}] if sysp else []) + rest
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def reply(
        self,
        messages: list[Message],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int = 0,
        stop: list[str] | None = None,
    ) -> Reply:
        """The assistant's next turn; temperature 0 is greedy. Raises UsageError when the conversation does
        not fit the model's context."""
        if max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        if not (0.0 <= temperature <= 2.0):
            raise UsageError(f"temperature must be between 0 and 2, not {temperature}")
        prompt = self.render(messages)
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.context:
            raise UsageError(
                f"the conversation is {len(ids)} tokens; the model's context holds {self.context}",
                hint="start a new conversation (/reset in the interactive chat)",
            )
        budget = min(max_new_tokens, self.context - len(ids))
        if self.engine_kind == "vllm":
            ro = self.eng.generate_ids([ids], max_new_tokens=budget, temperature=temperature, seed=seed)
        else:
            ro = self.eng.generate([prompt], max_new_tokens=budget, temperature=temperature, seed=seed)
        comp, text = ro.completion_ids[0], ro.texts[0]
        stopped = self.tok.eos_token_id in comp or len(comp) < budget
        for s in stop or []:
            if s and s in text:
                text, stopped = text[: text.index(s)], True
        return Reply(
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=len(ids),
            completion_tokens=len(comp),
        )

    def result(self, prompt: str, reply: Reply) -> ChatResult:
        a = self.target.adapter
        return ChatResult(
            model=self.target.student,
            adapter_id=a.id if a else None,
            adapter_version=a.version if a else None,
            engine=self.engine_kind,
            prompt=prompt,
            answer=reply.text,
            finish_reason=reply.finish_reason,
            usage={
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
        )


def chat_once(
    prompt: str,
    *,
    home: str | os.PathLike | None = None,
    adapter_id: str | None = None,
    base: bool = False,
    recipe: str | None = None,
    engine: str = "auto",
    system_prompt: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    seed: int = 0,
) -> ChatResult:
    """Ask the current stack (or the plain base) one question."""
    m = ChatModel(home, adapter_id=adapter_id, base=base, recipe=recipe, engine=engine, system_prompt=system_prompt)
    try:
        r = m.reply(
            [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        return m.result(prompt, r)
    finally:
        m.close()


EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def chat_loop(
    model: ChatModel,
    lines: Iterable[str],
    on_reply: Callable[[str, Reply], None],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    seed: int = 0,
    ask: Callable[[], None] | None = None,
    on_reset: Callable[[], None] | None = None,
) -> int:
    """One user message per line until the lines end or `/exit`; the conversation is kept, `/reset` starts
    it anew. Returns the number of answers."""
    history: list[Message] = []
    n = 0
    if ask:
        ask()
    for raw in lines:
        text = raw.rstrip("\r\n")
        if text.strip() in EXIT_COMMANDS:
            break
        if text.strip() == RESET_COMMAND:
            history = []
            if on_reset:
                on_reset()
        elif text.strip():
            history.append({"role": "user", "content": text})
            r = model.reply(history, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + n)
            history.append({"role": "assistant", "content": r.text})
            on_reply(text, r)
            n += 1
        if ask:
            ask()
    return n


def stdin_lines() -> Iterable[str]:
    """Lines of stdin as they come (a terminal or a pipe), without read-ahead."""
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        yield line
