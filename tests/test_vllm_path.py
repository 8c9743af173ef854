"""The `engine: vllm` code path on CPU, through a stand-in for vLLM's offline `LLM`.

The stand-in serves exactly what it is given: the plain base folder, plus whatever adapter folder a
LoRARequest names, loaded with PEFT. So these tests check sleepctl's side of the contract: that what
seed, dream, eval and consolidation ask vLLM to serve (the frozen stack and the trainer's adapter,
concatenated into one LoRA) gives the trainer's own outputs, that one engine serves a whole night, and
that adapters are swapped by new ids. vLLM's own numerics are checked on a GPU (test_vllm_cuda.py).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sleepctl import record
from sleepctl.memories import open_store

from .conftest import EXAMPLES, write_recipe


class _Out:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Result:
    def __init__(self, outputs, prompt_logprobs=None):
        self.outputs, self.prompt_logprobs = outputs, prompt_logprobs


class _LP:
    def __init__(self, lp):
        self.logprob = lp


class StandInLLM:
    """vllm.LLM's offline surface that sleepctl uses: generate, add_lora/remove_lora, sleep/wake_up."""

    instances: list = []

    def __init__(self, model: str, **kw):
        from transformers import AutoModelForCausalLM

        self.kw = kw
        from sleepctl.models import pick_dtype

        dtype = pick_dtype("auto", torch.device("cpu"))  # what the trainer computes in on this CPU
        self.base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        self.loras: dict[int, object] = {}
        self.added: list[int] = []
        self.llm_engine = self
        StandInLLM.instances.append(self)

    def add_lora(self, req) -> None:
        from peft import PeftModel

        cfg = json.loads((Path(req.lora_path) / "adapter_config.json").read_text())
        assert cfg["r"] <= self.kw["max_lora_rank"], "vLLM refuses an adapter above max_lora_rank"
        self.loras[req.lora_int_id] = PeftModel.from_pretrained(copy.deepcopy(self.base), req.lora_path).eval()
        self.added.append(req.lora_int_id)

    def remove_lora(self, lid: int) -> None:
        del self.loras[lid]

    def sleep(self, level: int = 1) -> None:
        pass

    def wake_up(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        model = self.loras[lora_request.lora_int_id] if lora_request is not None else self.base
        params = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for p, sp in zip(prompts, params):
            ids = torch.tensor([p["prompt_token_ids"]])
            if getattr(sp, "prompt_logprobs", None) is not None:
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                pl = [None] + [{t: _LP(lp[i, t].item())} for i, t in enumerate(p["prompt_token_ids"][1:])]
                out.append(_Result([_Out([0])], pl))
                continue
            torch.manual_seed(sp.seed or 0)
            kw = dict(max_new_tokens=sp.max_tokens, pad_token_id=0, eos_token_id=sp.stop_token_ids[0])
            kw.update(do_sample=True, temperature=sp.temperature, top_k=0) if sp.temperature > 0 else kw.update(
                do_sample=False
            )
            outs = []
            for _ in range(sp.n):
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1] :].tolist()
                outs.append(_Out(g))
            out.append(_Result(outs))
        return out


class SamplingParams:
    def __init__(self, **kw):
        self.prompt_logprobs = None
        self.seed = None
        self.n = 1
        self.__dict__.update(kw)


class LoRARequest:
    def __init__(self, name, lid, path):
        self.lora_name, self.lora_int_id, self.lora_path = name, lid, path


@pytest.fixture
def standin_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = StandInLLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    import sleepctl.seed
    import sleepctl.vllm_engine

    monkeypatch.setattr(sleepctl.vllm_engine, "unavailable_reason", lambda: None)
    monkeypatch.setattr(sleepctl.seed, "require_vllm", lambda: None)
    StandInLLM.instances.clear()
    yield StandInLLM
    from sleepctl.engines import release_engines

    release_engines()


def test_a_night_through_one_engine_serving_stack_and_adapter(standin_vllm, home, tmp_path, tiny_dir, small_memories):
    from sleepctl.consolidate import consolidate
    from sleepctl.dream import dream
    from sleepctl.evaluate import evaluate
    from sleepctl.seed import seed

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        engine="vllm",
        vllm={"check_sequences": 2},
        training={"steps_per_generation": 2, "max_steps": 4, "checkpoint_every": 10},
        dream={
            "grounded": False,  # a random tiny model invents every word
            "dreams_per_memory": 2,
            "max_new_tokens": 8,
            "top_k": 1,
            "random_b": 0,
            "train_steps": 2,
            "batch_size": 2,
        },
        replay={"fraction": 0.5, "max_memories": 4},
        consolidate={"max_adapters": 1, "steps_per_memory": 1.0, "max_steps": 4},
    )
    import sleepctl.vllm_engine as ve

    served: list[tuple[float, int]] = []
    real_sync = ve.VLLMEngine.sync

    def sync_and_compare(self, model, version):
        """Every weight version the trainer hands over must answer as the trainer does, stack included."""
        real_sync(self, model, version)
        if self.lora is None:
            return
        ids = torch.tensor([[5, 17, 300, 9, 44]])
        with torch.no_grad():
            mine = model(input_ids=ids).logits.float()
            theirs = self.llm.loras[self.lora.lora_int_id](input_ids=ids).logits.float()
        rel = ((mine - theirs).abs().max() / mine.abs().max()).item()  # the payload is bf16, as vLLM computes
        served.append((rel, json.loads(Path(self.lora.lora_path, "adapter_config.json").read_text())["r"]))

    ve.VLLMEngine.sync = sync_and_compare
    try:
        record([small_memories], home=home)
        first = seed(str(recipe), home=home, show_progress=False, keep_engines=True)
        lines = EXAMPLES.read_text().splitlines()
        p = tmp_path / "b.jsonl"
        p.write_text("\n".join(lines[3:5]) + "\n")
        record([p], home=home)
        second = seed(str(recipe), home=home, show_progress=False, keep_engines=True)
        d = dream(str(recipe), home=home, show_progress=False, consolidate=False, keep_engines=True)
        rep = evaluate(home=home, keep_engines=True)
        c = consolidate(str(recipe), home=home, if_needed=True, show_progress=False, keep_engines=True)
    finally:
        ve.VLLMEngine.sync = real_sync
    assert first.status == second.status == "done" and second.replayed == 3
    assert d.status in ("done", "not-current", "nothing") and rep.methods and c.status in ("done", "not-current")
    # one engine for the student's model the whole night (a 'self' teacher is the same engine, no adapter)
    assert len(standin_vllm.instances) == 1
    eng = standin_vllm.instances[0]
    assert eng.kw["enable_lora"] and eng.kw["max_lora_rank"] >= 8
    # the trainer's adapter alone on night 1 (r 4), the frozen night-1 adapter plus the new one on night 2 (r 8)
    ranks = sorted({r for _, r in served})
    assert ranks[0] == 4 and 8 in ranks
    # bf16 rounding of the payload moves the tiny model's logits by up to about 1% of the largest (1.07% on one data
    # set); a wrong adapter, scale or stack moves them by their own size
    assert max(diff for diff, _ in served) < 2e-2, served
    ids = eng.added
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # a fresh id for every version
    summary = json.loads((Path(second.run_dir) / "summary.json").read_text())
    check = summary["engine"]["logprob_check"]
    assert check["mean_abs_diff"] < 0.05 < check["lora_effect"]  # agreement, on an adapter that matters
    with open_store(home) as st:
        assert st.current_adapter_id() is not None


def test_under_torchrun_a_rank_starts_its_student_engine_on_its_own_gpu_and_no_teacher(
    standin_vllm, tmp_path, tiny_dir, monkeypatch
):
    """Rank 1 of 2: the engine process it starts sees GPU 1 alone and none of torchrun's variables (vLLM's
    engine would otherwise land on GPU 0, or take itself for a rank of a larger group); it starts no teacher
    engine (rank 0 writes the teacher data); rank 0 starts both."""
    import os
    import shutil

    from sleepctl.models import load_model
    from sleepctl.recipe import load_recipe
    from sleepctl.seed import engines_for

    seen = []

    class Recording(standin_vllm):
        def __init__(self, model: str, **kw):
            seen.append({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE")})
            super().__init__(model, **kw)

    monkeypatch.setattr(sys.modules["vllm"], "LLM", Recording)
    teacher_dir = shutil.copytree(tiny_dir, tmp_path / "teacher")  # another folder: an engine of its own
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir, teacher="small", engine="vllm")
    cfg, _ = load_recipe(str(rcp), {"profiles.small.model": str(teacher_dir)})
    model, tok = load_model(str(tiny_dir), "cpu", "float32")
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(k, v)
    t_eng, s_eng = engines_for(cfg, None, model, tok, model, tok, 8, teacher=False)
    assert t_eng is None and s_eng is not None
    assert seen == [{"CUDA_VISIBLE_DEVICES": "1", "RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None}]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and os.environ["RANK"] == "1"  # the trainer's, back
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    t_eng, s_eng2 = engines_for(cfg, None, model, tok, model, tok, 8, teacher=True)
    assert t_eng is not None and s_eng2 is s_eng  # the process's student engine, and now a teacher's
    assert seen[1]["CUDA_VISIBLE_DEVICES"] == "0" and seen[1]["RANK"] is None


def test_a_vllm_start_that_fails_is_tried_once_more_and_then_named(standin_vllm, tmp_path, tiny_dir, monkeypatch):
    """Another process freeing GPU memory during vLLM's memory profile fails a start that succeeds seconds
    later: one more try. A start that fails twice is a ModelError naming the model, its sync folder removed."""
    import sleepctl.vllm_engine as ve
    from sleepctl.errors import ModelError
    from sleepctl.models import load_model
    from sleepctl.recipe import VLLM

    monkeypatch.setattr(ve, "START_RETRY_S", 0.0)
    _, tok = load_model(str(tiny_dir), "cpu", "float32")
    fails = {"left": 1}

    class Flaky(standin_vllm):
        def __init__(self, model: str, **kw):
            if fails["left"] > 0:
                fails["left"] -= 1
                raise RuntimeError("Error in memory profiling: free memory changed")
            super().__init__(model, **kw)

    monkeypatch.setattr(sys.modules["vllm"], "LLM", Flaky)
    eng = ve.VLLMEngine(tiny_dir, tok, VLLM(), lora_rank=8, workdir=tmp_path / "w1")
    assert fails["left"] == 0 and isinstance(eng.llm, Flaky)

    fails["left"] = 2
    with pytest.raises(ModelError, match=r"vLLM could not start on .*\(2 tries\).*memory profiling"):
        ve.VLLMEngine(tiny_dir, tok, VLLM(), lora_rank=8, workdir=tmp_path / "w2")
    assert fails["left"] == 0
    assert list((tmp_path / "w2").iterdir()) == []  # the failed engine's sync folder is gone
