"""Ask a running `sleepctl serve` what the home's stack holds: the agent's side of a night, end to end.

    python scripts/serve_check.py --home ~/agents/ada                  # starts `sleepctl serve` on a free port
    python scripts/serve_check.py --home H --engine vllm -- --gpu-memory-utilization 0.2   # vLLM's server

Starts the server on the home (the CPU server, or `vllm serve` with the exported stack as a LoRA module),
waits for `GET /v1/models`, then asks held-out probes of the memories the stack consolidated, closed-book,
through the `openai` client where it is installed (plain HTTP otherwise), of the adapter and of the plain
base (vLLM serves both), and prints how many answers contain the reference. It sends the recipe's system
prompt, as `eval` does (both servers default to it now; a server of an older sleepctl on vLLM did not). A check,
not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sleepctl.chat import open_target
from sleepctl.home import open_home
from sleepctl.scoring import contains_match
from sleepctl.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(home: str, n: int) -> tuple[list[tuple[str, str]], str]:
    """Up to `n` held-out probes of the stack's memories (the user's own first), and the trained system prompt."""
    t = open_target(home)
    ids = [i for a in t.stack for i in a.trace_ids]
    with Store(open_home(home).db_path, readonly=True) as st:
        ps = [p for p in st.probes(ids, split="heldout") if p.superseded_by is None]
    ps.sort(key=lambda p: (p.origin != "user", ids.index(p.trace_id)))
    return [(p.question, p.answer) for p in ps[:n]], t.recipe.data.system_prompt


def ask(url: str, model: str, system: str, q: str, max_tokens: int) -> tuple[str, str]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
    try:
        from openai import OpenAI
    except ImportError:
        body = json.dumps({"model": model, "messages": msgs, "temperature": 0, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"], "http"
    reply = OpenAI(base_url=url, api_key="any").chat.completions.create(
        model=model, messages=msgs, temperature=0, max_tokens=max_tokens
    )
    return reply.choices[0].message.content or "", "openai"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> list[str]:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"the server stopped (exit {proc.returncode}) before it answered")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                return [m["id"] for m in json.loads(r.read())["data"]]
        except OSError:
            time.sleep(2)
    sys.exit(f"no answer from {url} in {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True)
    ap.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"])
    ap.add_argument("--probes", type=int, default=12, help="held-out probes to ask (user probes first)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to come up")
    ap.add_argument("--json", dest="json_out", help="also write the answers here")
    ap.add_argument("vllm_args", nargs="*", help="after --: more arguments for vllm serve")
    args = ap.parse_args()

    qs, system = questions(args.home, args.probes)
    if not qs:
        sys.exit("the stack has no held-out probes to ask")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "sleepctl", "serve", "--home", args.home, "--port", str(port)]
    cmd += ["--engine", args.engine, "--model-name", "agent"]
    cmd += ["--", *args.vllm_args] if args.vllm_args else []
    t0 = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        models = wait_ready(url, proc, args.timeout)
        up_s = time.time() - t0
        rows, client = [], "http"
        for name in [m for m in ("agent", "agent-base") if m in models]:
            for q, ref in qs:
                a, client = ask(url, name, system, q, args.max_tokens)
                rows.append({"model": name, "question": q, "reference": ref, "answer": a, "ok": contains_match(a, ref)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"server up in {up_s:.0f} s; models {models}; client: {client}")
    for r in rows:
        print(f"{r['model']:<11} {'yes' if r['ok'] else 'no ':<4} {r['question']}  ->  {r['answer'][:80]!r}")
    summary = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        got = [r["ok"] for r in rows if r["model"] == name]
        summary[name] = {"right": sum(got), "asked": len(got)}
        print(f"{name}: {sum(got)} of {len(got)} contain the reference")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {"models": models, "client": client, "up_s": up_s, "summary": summary, "answers": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
