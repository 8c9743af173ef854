"""Recipes: plain YAML, validated up front by pydantic; an unknown key or bad value names key and file."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError


def _recipes_dir() -> Path:
    """Inside the package (the repo's recipes/ folder is mapped to sleepctl.recipes), so a wheel install has
    them; a source tree on PYTHONPATH with no install (a GPU machine without a registry) reads recipes/."""
    try:
        return Path(str(files("sleepctl.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()
DEFAULT_RECIPE = "quick-cpu"


class Strict(BaseModel):
    # no nan or inf: `nan > 0` is False, so a bound alone lets nan through (`--set dream.max_minutes=.nan`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Profile(Strict):
    model: str = Field(description="alias, GGUF file, model folder or Hugging Face id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class Lora(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Data(Strict):
    questions_per_memory: int = Field(8, ge=0, le=64)
    question_retries: int = Field(
        1, ge=0, le=8, description="sampled requests more for a memory the teacher wrote too few questions for"
    )
    update_questions: int = Field(
        4,
        ge=0,
        le=16,
        description="questions written for each value of an earlier memory that a newer one replaced, answered "
        "with both dated and with the newer one alone (0: none)",
    )
    entity_prompts: int = Field(4, ge=0, le=32, description="'what do you know about X?' prompts per memory")
    reverse_questions: int = Field(
        0,
        ge=0,
        le=8,
        description="per name and value of a memory (up to 4 of each), questions whose answer is that name or "
        "value, so the fact is also asked from its other side; an answer that does not hold it is dropped (0: none)",
    )
    max_prompt_overlap: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="a reverse question whose words overlap (token F1) this much with a prompt of its memory or any "
        "held-out probe is dropped: it adds no phrasing, or would train a probe's own question (1.0: exact copies "
        "only; a paraphrase of a probe is the transfer the method relies on and is kept)",
    )
    restatements: int = Field(
        3, ge=0, le=32, description="'what do you remember about X?' prompts answered by the memory itself"
    )
    user_turns: bool = True
    probes_per_memory: int = Field(2, ge=0, le=16)
    heldout_fraction: float = Field(0.5, ge=0.0, le=1.0)
    teacher_samples: int = Field(2, ge=1, le=16, description="teacher answers cached per prompt")
    grounded_only: bool = Field(
        True,
        description="drop teacher answers whose content words are mostly not in the memory, or that state a name "
        "or value the memory does not hold",
    )
    transcript_copies: Literal["reply", "keep"] = Field(
        "reply",
        description="a teacher answer that replays a chat memory's transcript (tool calls and results): reply "
        "keeps the reply after the last tool result (none when the replay stops before it, or says only what the chat "
        "said before a tool result); keep: as written",
    )
    max_prompt_tokens: int = Field(512, ge=16)
    max_new_tokens: int = Field(64, ge=1, le=2048)
    system_prompt: str = "You are a helpful assistant."


class Loss(Strict):
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD interpolation (GKD): 0 forward KL, 1 reverse KL")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="on-policy fraction of GKD batches")
    lmbda_warmup_steps: int = Field(0, ge=0, description="lmbda ramps from 0 over these steps")
    alpha: float = Field(0.8, ge=0.0, le=1.0, description="weight of GKD against the LTI reward")
    gamma: float = Field(0.5, ge=0.0, le=1.0, description="semantic vs edit-distance reward")
    z0: float = Field(0.6, gt=0.0, le=1.0, description="normalised edit distance above which r_abs is 0")
    num_generations: int = Field(4, ge=2, le=64, description="LTI samples per prompt (the group)")
    scale_rewards: bool = False
    sem_threshold: float = Field(0.8, ge=0.0, le=1.0, description="judge cosine at which r_sem is 1")
    temperature: float = Field(0.7, gt=0.0, le=2.0, description="student sampling temperature")
    teacher_temperature: float = Field(0.7, gt=0.0, le=2.0)


class Optim(Strict):
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(5, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)


class Training(Strict):
    max_steps: int = Field(60, ge=1, description="optimizer steps of a night (the cap, with steps_per_memory)")
    steps_per_memory: float | None = Field(
        None,
        gt=0.0,
        description="scale a night's steps with its size: ceil(steps_per_memory x new memories), at most max_steps "
        "and at least 10",
    )
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(10, ge=1)
    log_every: int = Field(1, ge=1)
    device: str = "auto"
    steps_per_generation: int = Field(
        1,
        ge=1,
        le=64,
        description="sample the rollouts of this many steps at once from one weight version (staleness up to n-1 "
        "updates, as asynchronous on-policy trainers accept); the engine then sees n times more sequences per call",
    )
    merge_forwards: bool = Field(
        False,
        description="the student's distillation, imitation and anchor passes as one forward (fewer kernel "
        "launches, more padding); the same loss. On an H200 (1.5B student, batch 24) a step's training 0.85 -> 0.50 s "
        "for 11 GiB more memory (qwen-small-large sets it); off by default: not measured on a CPU",
    )
    fused_lora: bool = Field(
        True,
        description="on CUDA, add LoRA's product into the base output in one GEMM (addmm) instead of three kernels",
    )
    compile: bool = Field(
        False,
        description="compile each decoder block of the student (and a separate teacher) for the seed's training "
        "(torch.compile, dynamic shapes): fused kernels, fewer launches, for a compilation at the first forward of "
        "each mode (training, no-grad, adapters off) in each process; sampling stays uncompiled; dream and "
        "consolidate train uncompiled",
    )


class Replay(Strict):
    """Earlier nights' memories mixed into tonight's batches, from their cached teacher data (no new generation)."""

    fraction: float = Field(0.3, ge=0.0, lt=1.0, description="share of each batch drawn from earlier memories")
    max_memories: int = Field(64, ge=0, description="earlier memories in tonight's replay pool (0: no replay)")
    sampling: Literal["uniform", "recent", "weakest"] = Field(
        "weakest",
        description="which earlier memories: at random, the most recent, or those the current model holds worst "
        "(highest loss on their training probes)",
    )
    max_related: int = Field(
        3, ge=0, le=16, description="other memories about the same names the teacher sees beside one, oldest first"
    )
    corrected: Literal["pool", "tonight"] = Field(
        "pool",
        description="where the rewritten examples of earlier memories that tonight's correct train: as one memory "
        "of the replay pool, or beside tonight's memories, as often as one of them",
    )


class Anchor(Strict):
    """Keep the adapter-on student close to the base (adapters off) on general text: the drift guard."""

    kl_coef: float = Field(0.0, ge=0.0, description="weight of KL(base || student) on general text; 0 turns it off")
    batch_size: int = Field(4, ge=1, le=256, description="general-text paragraphs per step")
    max_tokens: int = Field(128, ge=16, le=4096, description="tokens per paragraph")
    drift_prompts: int = Field(
        24, ge=0, le=512, description="held-out generic prompts on which KL(base || adapter) is logged per night"
    )


class Consolidate(Strict):
    """Distil every consolidated memory into one fresh adapter on the plain base when the stack grows too deep."""

    max_adapters: int = Field(
        4, ge=1, le=64, description="consolidate when the current stack holds more adapters than this"
    )
    auto: bool = Field(True, description="dream consolidates on its own when the stack has grown past max_adapters")
    init: Literal["stack", "zero"] = Field(
        "stack",
        description="start the new adapter at the stack cut to its rank (stack), or from a fresh LoRA (zero)",
    )
    rank: int | None = Field(None, ge=1, le=1024, description="the consolidated adapter's rank; default lora.r")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="learning rate of consolidation; default optim.lr")
    steps_per_memory: float = Field(
        4.0, gt=0.0, description="optimizer steps per memory (from a fresh LoRA, at least training.max_steps)"
    )
    max_steps: int = Field(2000, ge=1)
    recall_tolerance: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="held-out recall (absolute) any earlier night may lose before the gate refuses",
    )
    ppl_tolerance: float = Field(0.02, ge=0.0, description="relative general-perplexity rise the gate accepts")
    retry_after: int = Field(
        2,
        ge=1,
        le=64,
        description="after the gate refused one, --if-needed waits until the stack has grown by this many adapters",
    )
    stack_kl_coef: float = Field(
        0.0, ge=0.0, description="weight of the current stack (closed-book) as an extra teacher of the same answers"
    )


class Eval(Strict):
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    ppl_paragraphs: int = Field(40, ge=1)
    judge: Literal["minilm", "none"] = "minilm"
    judge_threshold: float = Field(0.75, ge=0.0, le=1.0)


class Dream(Strict):
    dreams_per_memory: int = Field(4, ge=1, le=64, description="m: dreams written per memory")
    kinds: list[Literal["implication", "qa", "rephrase", "combine"]] = ["implication", "qa", "rephrase", "combine"]
    temperature: float = Field(0.9, gt=0.0, le=2.0, description="diversity of the dreams")
    adapter_dropout: float = Field(
        0.3, ge=0.0, le=1.0, description="share of dreams written without the newest adapter"
    )
    max_new_tokens: int = Field(64, ge=8, le=1024)
    top_k: int = Field(2, ge=0, le=64, description="dreams kept per memory by gradient score")
    random_b: int = Field(1, ge=0, le=64, description="dreams kept per memory at random, beside the top k")
    max_overlap: float = Field(
        0.8, gt=0.0, le=1.0, description="a kept dream shares at most this token F1 with another of its memory"
    )
    inner_steps: int = Field(2, ge=1, le=50, description="SFT steps of the isolated temporary LoRA per dream")
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="dreams scored and rewarded in one pass, each on its own copy of the adapter (default: 8 on a GPU, "
        "1 on a CPU, where a batch is no faster)",
    )
    inner_lr: float = Field(1e-3, gt=0.0, le=1.0)
    reward_margin: float = Field(0.0, ge=0.0, description="probe NLL drop (nats/token) a dream must bring")
    ppl_tolerance: float = Field(
        0.05,
        ge=0.0,
        description="relative general-perplexity rise the gate accepts; a dream that drifts more is not made current",
    )
    grounded: bool = Field(
        True,
        description="judge dreams before they are scored: drop one that states a name or value its memories do not "
        "hold or says mostly other things, and train one cut off by the token limit up to its last whole sentence",
    )
    replay_fraction: float = Field(0.5, ge=0.0, le=4.0, description="older memories replayed per recent one")
    train_steps: int = Field(20, ge=1, description="ReST-EM steps on rewarded dreams plus replay")
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    checkpoint_every: int = Field(5, ge=1)
    max_minutes: float | None = Field(None, gt=0.0, description="stop cleanly after this long")
    max_dreams: int | None = Field(None, ge=1, description="at most this many dreams per run")


class VLLM(Strict):
    """Settings of the vLLM rollout engine (`engine: vllm`); ignored by the Hugging Face engine."""

    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=0.95, description="share of the GPU vLLM takes (weights + KV cache); the trainer needs the rest"
    )
    teacher_gpu_memory_utilization: float = Field(
        0.12,
        gt=0.0,
        le=0.95,
        description="share of the GPU the teacher's engine takes, when the teacher is another model",
    )
    sleep: bool = Field(
        False, description="offload vLLM's weights and drop its KV cache while the trainer steps (costs time per step)"
    )
    compile: bool = Field(False, description="torch.compile the served model: faster prefill, minutes more at start")
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs (seconds at start)")
    max_model_len: int = Field(4096, ge=128)
    max_num_seqs: int = Field(256, ge=1, description="sequences vLLM decodes at once")
    logprob_tolerance: float = Field(
        0.05, gt=0.0, description="mean |vLLM - trainer| log-prob (nats/token) the start-up check allows"
    )
    logprob_rel_tolerance: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="and this share of how far the adapter moves log-probs (rounding grows with a deep stack)",
    )
    check_sequences: int = Field(4, ge=1, le=64, description="sequences scored by the start-up check")


class Distributed(Strict):
    """How `seed` runs under torchrun (several processes); one process ignores it. What is built is named here,
    so a run's saved recipe says how it was trained."""

    strategy: Literal["ddp"] = Field(
        "ddp",
        description="ddp: every rank holds the whole student and trains its share of each batch; gradients are "
        "averaged by DistributedDataParallel (a Qwen2.5-7B-shaped student took 42 GiB per trainer on an H200)",
    )
    rollouts: Literal["colocate"] = Field(
        "colocate",
        description="with engine: vllm, each rank starts its own student engine on its own GPU beside its trainer "
        "(vllm.gpu_memory_utilization of that GPU); the teacher's engine runs on rank 0, which writes the data",
    )


class Recipe(Strict):
    description: str = ""
    profiles: dict[str, Profile]
    teacher: str = Field("self", description="a profile, 'self', or a model name")
    student: str
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLM = VLLM()
    lora: Lora = Lora()
    data: Data = Data()
    loss: Loss = Loss()
    optim: Optim = Optim()
    training: Training = Training()
    eval: Eval = Eval()
    dream: Dream = Dream()
    replay: Replay = Replay()
    anchor: Anchor = Anchor()
    consolidate: Consolidate = Consolidate()
    distributed: Distributed = Distributed()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.profiles:
            raise ValueError("profiles: at least one profile is needed")
        return self

    def model_name(self, ref: str) -> str:
        """A profile name resolves to its model; anything else is taken as a model name."""
        return self.profiles[ref].model if ref in self.profiles else ref

    def dtype(self, ref: str) -> str:
        return self.profiles[ref].dtype if ref in self.profiles else "auto"

    def night_steps(self, memories: int) -> int:
        """Optimizer steps for a night of this many new memories."""
        tr = self.training
        if tr.steps_per_memory is None:
            return tr.max_steps
        return max(min(10, tr.max_steps), min(tr.max_steps, math.ceil(tr.steps_per_memory * memories)))


def recipe_path(name_or_path: str | Path | None) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    cand = RECIPES_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"unknown recipe {name_or_path!r}", hint=f"bundled recipes: {known}; or give a .yaml path")
    return cand


def set_key(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise RecipeError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` pairs; values are parsed as YAML so numbers and booleans keep their types."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise RecipeError(f"override {it!r} is not key=value", hint="e.g. --set loss.lmbda=0.3")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except (yaml.YAMLError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else getattr(e, "problem", None) or str(e)
            raise RecipeError(
                f"--set {it!r}: the value is not valid YAML ({why})", hint="values are YAML: --set 'key=\"[text\"'"
            ) from None
    return out


def with_overrides(cfg: Recipe, overrides: dict[str, Any] | None) -> Recipe:
    """A validated recipe with `key.sub=value` overrides applied, validated again."""
    if not overrides:
        return cfg
    raw = cfg.model_dump()
    for k, v in overrides.items():
        set_key(raw, k, v)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"overrides: {e}") from None


def load_recipe(name_or_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> tuple[Recipe, Path]:
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    for k, v in (overrides or {}).items():
        set_key(raw, k, v)
    try:
        return Recipe.model_validate(raw), path
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "(top)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: {key}: {msg}")
        raise RecipeError("\n".join(lines)) from e
