"""Using what a night produced: export (one adapter, merged), chat and serve, on a tiny random-weight model.

The home holds a stack of three adapters of different ranks, scales and target modules (one rsLoRA), with
random weights big enough to move the logits, so "the export matches the stack" means something.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

import sleepctl
from sleepctl.errors import SleepError, UsageError

from .conftest import ROOT, sigint_default, write_recipe

IDS = torch.tensor([[1, 28, 3457, 314, 260, 1789, 30, 2, 198, 1, 520, 9531, 198]])

STACK = [  # (r, lora_alpha, use_rslora, target modules)
    (4, 8, False, ["q_proj", "v_proj"]),
    (8, 4, True, ["q_proj", "k_proj", "o_proj", "down_proj"]),
    (2, 16, False, ["gate_proj", "up_proj", "v_proj"]),
]


def run(*args: str, input: bytes | None = None) -> tuple[int, str, str]:
    """The CLI in this process, as `main` runs it: (exit code, stdout, stderr or the one error line)."""
    from typer.testing import CliRunner

    from sleepctl import cli

    r = CliRunner().invoke(cli.app, list(args), input=input, env={"COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        msg, code = cli.error_line(r.exception)
        return code, r.stdout, msg
    return r.exit_code, r.stdout, r.stderr


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, tiny_dir):
    """A home with three stacked adapters (v1 <- v2 <- v3, v3 current) trained on nothing but random numbers."""
    from peft import LoraConfig, get_peft_model

    from sleepctl.adapters import publish_adapter
    from sleepctl.home import open_home
    from sleepctl.memories import open_store
    from sleepctl.runs import start_run

    root = tmp_path_factory.mktemp("stacked")
    home = root / "home"
    sleepctl.record(text="The Kestrel server moved to Tallinn in March.", home=home)
    recipe = yaml.safe_load(write_recipe(root / "r.yaml", tiny_dir).read_text())
    h = open_home(home)
    parent = None
    with open_store(home) as st:
        run = start_run(h, st, "seed", recipe, [])
        g = torch.Generator().manual_seed(0)
        for r, alpha, rs, targets in STACK:
            pm = get_peft_model(
                _load(tiny_dir),
                LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=targets, task_type="CAUSAL_LM"),
            )
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            a = publish_adapter(
                h,
                st,
                pm,
                run_id=run.run.id,
                kind="seed",
                base_model=str(tiny_dir),
                parent_id=parent,
                trace_ids=[],
                metrics={},
            )
            parent = a.id
    return home


def stack_logits(home, ref: str | None = None):
    """The logits of the stack as sleepctl computes them (what eval and the trainer see): base + attach_stack."""
    from sleepctl.adapters import attach_stack, lineage
    from sleepctl.evaluate import resolve_target
    from sleepctl.memories import open_store

    with open_store(home, readonly=True) as st:
        a = resolve_target(st, ref)
        stack = lineage(st, a.id)
    model = attach_stack(_load(stack[0].base_model), stack)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_logits(tiny_dir):
    with torch.no_grad():
        return _load(tiny_dir)(input_ids=IDS).logits


def test_adapter_export_is_the_stack_on_the_plain_base(stacked, tiny_dir, tmp_path):
    from peft import PeftModel

    from sleepctl.export import export_adapter

    res = export_adapter(tmp_path / "out" / "adapter", home=stacked)
    assert res.rank == 14 and res.adapter_version == 3 and len(res.lineage) == 3 and res.dtype == "float32"
    d = Path(res.path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 14 and not cfg["use_rslora"]  # scales folded into B
    assert sorted(cfg["target_modules"]) == sorted({t for *_, ts in STACK for t in ts})
    assert cfg["base_model_name_or_path"] == str(Path(tiny_dir).absolute())  # a folder has no hub id
    meta = json.loads((d / "sleepctl.json").read_text())
    assert meta["base_model_path"] == str(Path(tiny_dir).absolute()) and meta["adapter_version"] == 3
    assert meta["system_prompt"] == "You are a helpful assistant."
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left

    want = stack_logits(stacked)
    assert (want - base_logits(tiny_dir)).abs().max() > 0.5  # the stack matters: agreement below means something
    got = PeftModel.from_pretrained(_load(tiny_dir), d).eval()
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_adapter_id_exports_an_earlier_lineage(stacked, tiny_dir, tmp_path):
    from peft import PeftModel

    from sleepctl.export import export_adapter

    res = export_adapter(tmp_path / "v2", home=stacked, adapter_id="v2", base_name="org/tiny")
    assert res.rank == 12 and res.adapter_version == 2 and res.base_model_id == "org/tiny"
    assert json.loads((tmp_path / "v2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    got = PeftModel.from_pretrained(_load(tiny_dir), tmp_path / "v2").eval()
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=IDS).logits, stack_logits(stacked, "v2"), atol=1e-5, rtol=1e-5)


def test_merged_export_loads_as_a_plain_model(stacked, tmp_path):
    from transformers import AutoTokenizer

    from sleepctl.export import export_merged

    res = export_merged(tmp_path / "merged", home=stacked, dtype="float32")
    d = Path(res.path)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= {
        p.name for p in d.iterdir()
    }
    assert AutoTokenizer.from_pretrained(d).chat_template  # the chat template travels with it
    with torch.no_grad():
        torch.testing.assert_close(_load(d)(input_ids=IDS).logits, stack_logits(stacked), atol=1e-4, rtol=1e-4)


def test_exports_load_without_sleepctl(stacked, tmp_path):
    """Both folders through the CLI, then loaded by a Python that cannot import sleepctl."""
    code, out, err = run(
        "export", "--adapter", str(tmp_path / "a"), "--merged", str(tmp_path / "m"), "--home", str(stacked), "--json"
    )
    assert code == 0, err
    kinds = json.loads(out)
    assert [k["kind"] for k in kinds] == ["adapter", "merged"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"  # the base's own dtype by default
    assert oct((tmp_path / "a").stat().st_mode & 0o777) == "0o700"  # weights that hold memories stay private
    script = f"""
import importlib.abc, json, sys
class NoSleepctl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sleepctl":
            raise ImportError("sleepctl is not installed here")
sys.meta_path.insert(0, NoSleepctl())
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    a = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "a")!r}, dtype=torch.float32)(input_ids=ids).logits
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, dtype=torch.float32)(input_ids=ids).logits
print(json.dumps({{"adapter": a.tolist(), "merged": m.tolist(), "sleepctl": "sleepctl" in sys.modules}}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    got = json.loads(p.stdout)
    assert not got["sleepctl"]
    want = stack_logits(stacked)
    torch.testing.assert_close(torch.tensor(got["adapter"]), want, atol=1e-5, rtol=1e-5)
    # bf16 weights: the merged model is the stack up to the rounding of its weights
    assert (torch.tensor(got["merged"]) - want).abs().max() < 0.1 * want.abs().max()


def test_export_refusals_leave_nothing_behind(stacked, tiny_dir, tmp_path, monkeypatch):
    from sleepctl.export import export_adapter, export_merged

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_adapter(busy, home=stacked)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(UsageError, match="not an earlier model export"):
        export_adapter(busy, home=stacked, force=True)  # --force replaces an export, not a folder of other things
    (busy / "sleepctl.json").write_text("{}")
    res = export_adapter(busy, home=stacked, force=True)  # an earlier export is replaced whole
    assert (busy / "adapter_model.safetensors").exists() and not (busy / "keep.txt").exists() and res.rank == 14

    empty = tmp_path / "empty"
    empty.mkdir()
    export_adapter(empty, home=stacked)  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        export_adapter(tmp_path / "file", home=stacked, force=True)
    for protected in (stacked, stacked.parent, Path(tiny_dir)):
        with pytest.raises(UsageError, match="may not replace"):
            export_merged(protected, home=stacked, force=True)
    assert (stacked / "sleepctl.db").exists()
    with pytest.raises(SleepError, match="adapter"):
        export_adapter(tmp_path / "nope", home=stacked, adapter_id="v9")

    bare = tmp_path / "bare"
    sleepctl.record(text="A memory with no night behind it yet.", home=bare)
    with pytest.raises(SleepError, match="no adapter to export"):
        export_adapter(tmp_path / "x", home=bare)
    assert not (tmp_path / "x").exists()

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(SleepError, match="could not write the export"):
        export_adapter(tmp_path / "out" / "half", home=stacked)
    assert list((tmp_path / "out").iterdir()) == []  # no DIR, no temporary folder


def test_export_cli_errors_are_one_line(stacked, tmp_path):
    code, _, err = run("export", "--home", str(stacked))
    assert code == 2 and "nothing to export" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code, _, err = run("export", "--adapter", str(busy), "--home", str(stacked))
    assert code == 2 and "--force" in err
    code, _, err = run("export", "--adapter", str(tmp_path / "a"), "--dtype", "int4", "--home", str(stacked))
    assert code == 2 and "--dtype" in err and not (tmp_path / "a").exists()
    bare = tmp_path / "bare"
    sleepctl.record(text="Nothing consolidated yet.", home=bare)
    code, _, err = run("export", "--merged", str(tmp_path / "m"), "--home", str(bare))
    assert code == 1 and "no adapter to export" in err and not (tmp_path / "m").exists()
    # and once through the real entry point: one line on stderr, the exit code
    p = subprocess.run(
        [sys.executable, "-m", "sleepctl.cli", "export", "--adapter", str(busy), "--home", str(stacked)],
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 2 and len(p.stderr.decode().strip().splitlines()) == 1 and p.stderr.startswith(b"error:")


def test_alias_exports_name_the_upstream_model():
    from sleepctl.models import upstream_id

    assert upstream_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert upstream_id("qwen2.5-coder-1.5b") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert upstream_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert upstream_id("/some/folder") is None and upstream_id("x.gguf") is None


# --- chat ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(stacked):
    from sleepctl.chat import ChatModel

    m = ChatModel(stacked)
    yield m
    m.close()


def test_chat_answers_what_eval_would(stacked, chat_model):
    """One question under the trained system prompt is exactly eval's sleep-row prompt and sampling."""
    from sleepctl.adapters import attach_stack, lineage
    from sleepctl.engines import HFEngine
    from sleepctl.memories import open_store
    from sleepctl.models import load_model
    from sleepctl.prompts import render

    q = "Where did the Kestrel server move?"
    r = chat_model.reply([{"role": "user", "content": q}], max_new_tokens=8)
    with open_store(stacked, readonly=True) as st:
        stack = lineage(st, st.current_adapter_id())
    model, tok = load_model(stack[0].base_model, "cpu")
    want = HFEngine(attach_stack(model, stack), tok).generate(
        [render(tok, "You are a helpful assistant.", q)], max_new_tokens=8, temperature=0.0
    )
    assert r.text == want.texts[0] and r.completion_tokens == len(want.completion_ids[0])
    assert r.finish_reason in ("stop", "length") and chat_model.adapter.version == 3
    # a conversation keeps its turns
    two = chat_model.reply(
        [
            {"role": "user", "content": q},
            {"role": "assistant", "content": r.text},
            {"role": "user", "content": "Sure?"},
        ],
        max_new_tokens=4,
    )
    assert two.prompt_tokens > r.prompt_tokens
    with pytest.raises(UsageError, match="context"):
        chat_model.reply([{"role": "user", "content": "word " * 1100}], max_new_tokens=4)


def test_chat_cli_one_shot_interactive_and_base(stacked, tmp_path):
    h = ["--home", str(stacked)]
    code, out, err = run("chat", "--prompt", "Where is Kestrel?", "--max-new-tokens", "5", *h, "--json")
    assert code == 0, err
    one = json.loads(out)
    assert one["adapter_version"] == 3 and one["engine"] == "hf" and one["usage"]["completion_tokens"] <= 5

    lines = b"Where is Kestrel?\n\nAnd when?\n/exit\nnever asked\n"
    code, out, err = run("chat", "--max-new-tokens", "5", *h, "--json", input=lines)
    assert code == 0, err
    turns = [json.loads(x) for x in out.splitlines()]
    assert [t["prompt"] for t in turns] == ["Where is Kestrel?", "And when?"]  # blank skipped, /exit stops
    assert turns[0]["answer"] == one["answer"]  # the first turn is the one-shot question
    assert turns[1]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"]  # the conversation is kept

    code, out, err = run("chat", "--max-new-tokens", "5", *h, input=b"Where is Kestrel?\n/reset\nWhere is Kestrel?\n")
    assert code == 0 and out.split("\n")[0].strip() == one["answer"].strip()  # EOF ends it
    assert out.count(one["answer"].strip()) == 2  # after /reset the same question is asked afresh

    code, out, err = run("chat", "-p", "Where is Kestrel?", "--max-new-tokens", "5", "--base", *h, "--json")
    assert code == 0, err
    assert json.loads(out)["adapter_id"] is None

    bare = tmp_path / "bare"
    sleepctl.record(text="Nothing consolidated yet.", home=bare)
    code, _, err = run("chat", "-p", "hi", "--home", str(bare))
    assert code == 1 and "--base" in err
    code, _, err = run("chat", "-p", "hi", "--temperature", "3", *h)
    assert code == 2 and "--temperature" in err


# --- serve -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(chat_model):
    from sleepctl.serve import make_server

    srv = make_server(chat_model, "127.0.0.1", 0, model_name="ada")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def call(url: str, body=None, method: str | None = None, headers: dict | None = None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_lists_its_model_and_answers_a_chat(server, chat_model):
    status, models = call(f"{server}/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["ada"] and models["data"][0]["object"] == "model"
    q = [{"role": "user", "content": "Where did the Kestrel server move?"}]
    status, c = call(f"{server}/chat/completions", {"model": "ada", "messages": q, "max_tokens": 6, "temperature": 0})
    assert status == 200, c
    assert c["object"] == "chat.completion" and c["id"].startswith("chatcmpl-") and c["model"] == "ada"
    assert isinstance(c["created"], int) and c["system_fingerprint"] == f"sleepctl-{chat_model.adapter.id}"
    (choice,) = c["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == chat_model.reply(q, max_new_tokens=6).text  # the same model, greedy
    status, plain = call(f"{server}/chat/completions", {"model": "ada", "messages": q, "max_tokens": 6})
    assert status == 200 and plain["choices"][0]["message"]["content"] == choice["message"]["content"]  # greedy default
    u = c["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 6
    # content as text parts, a developer message as the system prompt, sampling with a seed
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    body = {"model": "ada", "messages": parts, "max_tokens": 4, "temperature": 0.9, "seed": 3}
    s1, a = call(f"{server}/chat/completions", body)
    s2, b = call(f"{server}/chat/completions", body)
    assert s1 == s2 == 200 and a["choices"][0]["message"] == b["choices"][0]["message"]


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"model": "ada"}, 400, "messages"),
        ({"model": "ada", "messages": []}, 400, "messages"),
        ({"model": "ada", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "ada", "messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
        ({"model": "ada", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"model": "ada", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "ada", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        (
            {"model": "ada", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "ada", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    ],
)
def test_server_refuses_bad_requests_with_openai_errors(server, body, status, param):
    got, err = call(f"{server}/chat/completions", body)
    assert got == status
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param


def test_server_unknown_paths_and_methods(server):
    assert call(f"{server}/completions", {"prompt": "x"})[0] == 404
    assert call(f"{server}/chat/completions")[0] == 405
    assert call(f"{server}/models/ada")[1]["id"] == "ada"


def test_openai_client_talks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server, api_key="anything")
    assert [m.id for m in client.models.list()] == ["ada"]
    c = client.chat.completions.create(
        model="ada", messages=[{"role": "user", "content": "Where is Kestrel?"}], max_tokens=5, temperature=0
    )
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens <= 5
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="ada", messages=[{"role": "user", "content": "x"}], stream=True)


def test_api_key_is_required_when_set(chat_model):
    from sleepctl.serve import make_server

    srv = make_server(chat_model, "127.0.0.1", 0, model_name="ada", api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/models"
    try:
        status, err = call(url)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert call(url, headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_on_the_port_asked_for(stacked):
    port = _free_port()
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.Popen(
        [sys.executable, "-m", "sleepctl.cli", "serve", "--port", str(port), "--home", str(stacked), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        preexec_fn=sigint_default,
    )
    try:
        ready = json.loads(p.stdout.readline())  # printed once the port is bound
        assert (
            ready["url"] == f"http://127.0.0.1:{port}/v1" and ready["model"] == "home" and ready["adapter_version"] == 3
        )
        status, c = call(
            f"{ready['url']}/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        )
        assert status == 200 and c["model"] == "home"
    finally:
        p.send_signal(2)  # Ctrl-C: a clean stop
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    assert p.returncode == 0, p.stderr.read().decode()


def test_serve_follows_the_current_adapter(stacked, tmp_path):
    import shutil

    from sleepctl.adapters import rollback
    from sleepctl.chat import ChatModel
    from sleepctl.memories import open_store

    home = tmp_path / "copy"
    shutil.copytree(stacked, home)
    m = ChatModel(home, follow=True)
    assert m.adapter.version == 3 and not m.refresh()
    with open_store(home) as st:
        rollback(st, "v1")
    assert m.refresh() and m.adapter.version == 1 and len(m.target.stack) == 1


def test_print_command_for_vllm(stacked):
    code, out, err = run(
        "serve", "--print-command", "--port", "8123", "--model-name", "ada", "--home", str(stacked), "--json"
    )
    assert code == 0, err
    plan = json.loads(out)
    cmd = plan["command"]
    assert cmd[:2] == ["vllm", "serve"] and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"  # rank 14, in vLLM's next slot
    assert "--enable-lora" in cmd and cmd[cmd.index("--lora-modules") + 1] == f"ada={plan['adapter_dir']}"
    d = Path(plan["adapter_dir"])
    assert d.parent == stacked / "exports" and json.loads((d / "adapter_config.json").read_text())["r"] == 14
    code, out, _ = run("serve", "--print-command", "--port", "8123", "--model-name", "ada", "--home", str(stacked))
    assert code == 0 and out.startswith("vllm serve ")  # the export is reused
    # vLLM's own arguments after --, appended as given (a GPU shared with training needs a memory share)
    code, out, err = run(
        "serve", "--print-command", "--port", "8123", "--home", str(stacked), "--json", "--",
        "--gpu-memory-utilization", "0.3", "--max-model-len", "4096",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["command"][-4:] == ["--gpu-memory-utilization", "0.3", "--max-model-len", "4096"]


def test_vllm_serves_under_the_trained_system_prompt(stacked, tiny_dir):
    """vLLM's server renders a conversation without a system message as eval and the CPU server do: under the
    system prompt the stack was trained with, not the model's own default; a given system message still wins,
    and a --chat-template of the user's own is left alone."""
    from sleepctl.models import load_tokenizer

    code, out, err = run("serve", "--print-command", "--home", str(stacked), "--json")
    assert code == 0, err
    cmd = json.loads(out)["command"]
    path = Path(cmd[cmd.index("--chat-template") + 1])
    assert path.parent == stacked / "exports"
    tok = load_tokenizer(str(tiny_dir))
    ours = path.read_text()

    def render(msgs, template):
        return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)

    q = [{"role": "user", "content": 'Where did the "Kestrel" server move?'}]
    trained = [{"role": "system", "content": "You are a helpful assistant."}]
    assert render(q, ours) == render(trained + q, tok.chat_template) != render(q, tok.chat_template)
    other = [{"role": "system", "content": "Answer in French."}]
    assert render(other + q, ours) == render(other + q, tok.chat_template)
    code, out, err = run(
        "serve", "--print-command", "--home", str(stacked), "--json", "--", "--chat-template=mine.jinja"
    )
    assert code == 0, err
    assert [a for a in json.loads(out)["command"] if "chat-template" in a] == ["--chat-template=mine.jinja"]


def test_vllm_arguments_refused_by_the_cpu_server(stacked):
    code, _, err = run("serve", "--engine", "hf", "--home", str(stacked), "--", "--gpu-memory-utilization", "0.3")
    assert code == 2 and "arguments after -- are for vLLM's server" in err
    code, _, err = run("serve", "--print-command", "--home", str(stacked), "--bogus")
    assert code == 2  # an unknown option before -- is still a mistake


def test_lora_rank_slots():
    from sleepctl.errors import ModelError
    from sleepctl.vllm_engine import lora_slot

    assert [lora_slot(r) for r in (1, 8, 9, 14, 32, 33, 96, 300, 512)] == [8, 8, 16, 16, 32, 64, 128, 320, 512]
    with pytest.raises(ModelError):
        lora_slot(513)


def test_serve_check_asks_the_stack_through_the_openai_client(stacked, tmp_path):
    """scripts/serve_check.py starts `python -m sleepctl serve` on a home, waits for it, asks the held-out probes
    of the stack's memories through the openai client and scores them; a stack with none to ask is refused."""
    import shutil
    import sqlite3

    home = tmp_path / "home"
    shutil.copytree(stacked, home)
    check = [sys.executable, str(ROOT / "scripts" / "serve_check.py"), "--home", str(home), "--engine", "hf"]
    r = subprocess.run([*check, "--timeout", "120"], capture_output=True, timeout=300)
    assert r.returncode != 0 and b"no held-out probes to ask" in r.stderr
    db = sqlite3.connect(home / "sleepctl.db")
    (mid,) = db.execute("SELECT id FROM traces").fetchone()
    with db:
        db.execute("UPDATE adapters SET trace_ids_json=?", (json.dumps([mid]),))  # the stack holds the memory
    db.close()
    code, _, err = run(
        "probe", "add", mid, "-q", "Where did the Kestrel server move?", "-a", "Tallinn", "--home", str(home)
    )
    assert code == 0, err
    out = tmp_path / "check.json"
    r = subprocess.run([*check, "--max-tokens", "4", "--json", str(out)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads(out.read_text())
    assert res["models"] == ["agent"] and res["client"] == "openai"  # the CPU server serves the stack alone
    assert res["summary"] == {"agent": {"right": 0, "asked": 1}}  # random weights do not know Tallinn
    (a,) = res["answers"]
    assert a["question"] == "Where did the Kestrel server move?" and a["reference"] == "Tallinn" and not a["ok"]
    assert "agent: 0 of 1 contain the reference" in r.stdout.decode()
