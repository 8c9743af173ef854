"""`sleepctl serve`: an OpenAI-compatible endpoint on the current stack, for the agent itself.

On a CUDA GPU with vLLM (the recipe's `engine: vllm`, or `--engine vllm`), the stack is exported as one
PEFT adapter into the home (`exports/`) and vLLM's own OpenAI server is started on the base model with that
adapter as a LoRA module (`max_lora_rank`: the adapter's rank rounded up to a size vLLM serves). Elsewhere a
small server answers from the model in this process: `GET /v1/models`, `POST /v1/chat/completions`
(non-streaming, n=1), OpenAI-shaped responses and errors, one request at a time (one model), and the home's
current adapter followed from request to request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .chat import ChatModel, Message, open_target, pick_engine
from .errors import SleepError, UsageError
from .home import open_home, resolve_home, writable, write_atomic

DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 512  # a request without max_tokens: bounded, so a CPU is not busy for minutes
MAX_BODY_BYTES = 8 << 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def default_model_name(home: str | os.PathLike | None) -> str:
    """The home's folder name (`~/agents/ada` serves `ada`), or `sleepctl` for the default home."""
    name = resolve_home(home).name
    return "sleepctl" if name in ("", "default") else name


# --- requests and responses ------------------------------------------------------------------------------


class APIError(Exception):
    """An error the endpoint answers with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ChatRequest(BaseModel):
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    stop: list[str] = []
    seed: int | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _text(content: Any, i: int) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise APIError(400, "content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat_request(body: Any, model_name: str) -> ChatRequest:
    """A chat completions request checked the way OpenAI checks it; what this server cannot do is refused
    (400, naming the field) rather than ignored. top_p and the penalties are accepted and not applied."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404, f"The model `{model}` does not exist; this server serves `{model_name}`", "model", "model_not_found"
        )
    if body.get("stream"):
        raise APIError(400, "stream is not supported by this server; ask without stream", "stream")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    for key in ("tools", "functions"):
        if body.get(key):
            raise APIError(400, f"{key} are not supported by this server: it answers plain chat", key)
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format other than text is not supported", "response_format")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, "each message must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            what = "tool messages are not supported" if role in ("tool", "function") else f"unknown role {role!r}"
            raise APIError(400, f"{what}: use system, developer, user or assistant", f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, "tool calls are not supported by this server", f"messages[{i}].tool_calls")
        if "content" not in m and role != "assistant":
            raise APIError(400, "missing content", f"messages[{i}].content")
        out.append({"role": ROLES[role], "content": _text(m.get("content"), i)})
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "messages must hold at least one user message", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, "max_tokens must be an integer of at least 1", "max_tokens")
    # Greedy unless asked (OpenAI's default is 1.0): an agent asking its own memory wants the answer it knows
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not _is_number(temperature) or not (0.0 <= temperature <= 2.0):
        raise APIError(400, "temperature must be a number between 0 and 2", "temperature")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of up to 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, "seed must be an integer", "seed")
    return ChatRequest(messages=out, max_tokens=max_tokens, temperature=float(temperature), stop=stop, seed=seed)


def completion(model: ChatModel, req: ChatRequest, model_name: str) -> dict:
    """The OpenAI chat.completion object for one request."""
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    try:
        r = model.reply(
            req.messages, max_new_tokens=req.max_tokens, temperature=req.temperature, seed=seed, stop=req.stop
        )
    except UsageError as e:
        raise APIError(400, str(e), "messages", "context_length_exceeded") from e
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": model.fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        },
    }


# --- the CPU server ---------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True
    model: ChatModel
    model_name: str
    api_key: str | None
    created: int
    lock: threading.Lock
    log: Any  # a callable taking one line, or None

    def model_object(self) -> dict:
        a = self.model.adapter
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "sleepctl",
            "sleepctl": {"adapter_id": a.id if a else None, "adapter_version": a.version if a else None},
        }


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "sleepctl"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per request, in _finish

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise APIError(413 if n > 0 else 400, f"request body: Content-Length must be 0 to {MAX_BODY_BYTES}")
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def _authorised(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def _handle(self, method: str) -> None:
        t0 = time.time()
        path = self.path.split("?", 1)[0].rstrip("/")
        status = 500
        try:
            body = self._body() if method == "POST" else None
            self._authorised()
            obj = self._route(method, path, body)
            status = 200
        except APIError as e:
            status, obj = e.status, e.body()
        except Exception as e:  # noqa: BLE001 - a request must get an answer, and the server must live on
            status = 500
            obj = APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body()
            if self.server.log:
                self.server.log(traceback.format_exc().rstrip())
        self._send(status, obj)
        if self.server.log:
            self.server.log(f"{method} {self.path} {status} {time.time() - t0:.1f}s")

    def _route(self, method: str, path: str, body: Any) -> dict:
        s = self.server
        if path == "/v1/models":
            if method != "GET":
                raise APIError(405, f"{method} {path} is not supported: use GET")
            return {"object": "list", "data": [s.model_object()]}
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name != s.model_name:
                raise APIError(404, f"The model `{name}` does not exist", "model", "model_not_found")
            return s.model_object()
        if path == "/v1/chat/completions":
            if method != "POST":
                raise APIError(405, f"{method} {path} is not supported: use POST")
            req = parse_chat_request(body, s.model_name)
            with s.lock:  # one model: one request at a time
                if s.model.refresh() and s.log:
                    s.log(f"now answering with {s.model.describe()}")
                return completion(s.model, req, s.model_name)
        if path == "/health":
            return {"status": "ok"}
        raise APIError(404, f"unknown endpoint {method} {path}: this server has /v1/models and /v1/chat/completions")

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


def make_server(
    model: ChatModel,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    model_name: str,
    api_key: str | None = None,
    log=None,
) -> Server:
    """A bound server (port 0 picks a free one: `server.server_address`); call `serve_forever()` to answer."""
    try:
        srv = Server((host, port), Handler)
    except OSError as e:
        raise SleepError(f"cannot listen on {host}:{port}: {e.strerror or e}", hint="choose another --port") from e
    srv.model, srv.model_name, srv.api_key, srv.log = model, model_name, api_key, log
    srv.created, srv.lock = int(time.time()), threading.Lock()
    return srv


# --- vLLM's server ----------------------------------------------------------------------------------------


class VLLMPlan(BaseModel):
    command: list[str]
    adapter_dir: str | None
    max_lora_rank: int | None
    base_model_path: str
    model_name: str
    message: str


def vllm_plan(
    home: str | os.PathLike | None = None,
    *,
    adapter_id: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    extra: list[str] | None = None,
) -> VLLMPlan:
    """The `vllm serve` command for the stack, its adapter exported (bf16) into the home's `exports/` (a
    temporary folder when the home is read-only); an export of the same lineage is reused. `extra`: more of
    vLLM's own arguments, appended as they are (a GPU shared with training needs `--gpu-memory-utilization`)."""
    from .export import export_adapter
    from .models import load_tokenizer, resolve
    from .vllm_engine import lora_slot

    name = model_name or default_model_name(home)
    t = open_target(home, adapter_id, require_adapter=False)
    base_path = resolve(t.student).path.absolute()
    h = open_home(home)
    exports = h.root / "exports" if writable(h.root) else Path(tempfile.mkdtemp(prefix="sleepctl-vllm-"))
    cmd = ["vllm", "serve", str(base_path), "--host", host, "--port", str(port)]
    sysp = t.recipe.data.system_prompt
    own = any(a.split("=")[0] == "--chat-template" for a in extra or [])
    base_template = None if own or not sysp else load_tokenizer(t.student).chat_template
    if base_template:  # the trained system prompt by default, as the CPU server answers
        template = exports / f"chat-template-{hashlib.sha256(sysp.encode()).hexdigest()[:12]}.jinja"
        exports.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(template, default_system_template(base_template, sysp))
        cmd += ["--chat-template", str(template)]
    if t.adapter is None:
        cmd += ["--served-model-name", name, *(extra or [])]
        return VLLMPlan(
            command=cmd,
            adapter_dir=None,
            max_lora_rank=None,
            base_model_path=str(base_path),
            model_name=name,
            message=f"no adapter yet: vLLM serves the plain base {t.student} as {name}",
        )
    ids = [a.id for a in t.stack]
    folder = exports / f"vllm-{t.adapter.id}"
    meta = folder / "sleepctl.json"
    reuse = meta.exists() and [x["id"] for x in json.loads(meta.read_text()).get("lineage", [])] == ids
    if reuse:
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
    else:
        rank = export_adapter(folder, home=home, adapter_id=t.adapter.id, force=True, dtype="bfloat16").rank
    try:
        slot = lora_slot(rank)
    except SleepError as e:
        raise SleepError(
            f"the stack's rank {rank} is above what vLLM serves as a LoRA (512)",
            hint="consolidate the stack (sleepctl consolidate), or serve a merged export: sleepctl export --merged DIR, then vllm serve DIR",
        ) from e
    cmd += [
        "--served-model-name",
        f"{name}-base",
        "--enable-lora",
        "--lora-modules",
        f"{name}={folder}",
        "--max-lora-rank",
        str(slot),
        "--max-loras",
        "1",
        *(extra or []),
    ]
    return VLLMPlan(
        command=cmd,
        adapter_dir=str(folder),
        max_lora_rank=slot,
        base_model_path=str(base_path),
        model_name=name,
        message=f"vLLM serves adapter v{t.adapter.version} (rank {rank}, slot {slot}) as {name}, the plain base as {name}-base",
    )


def default_system_template(template: str, system_prompt: str) -> str:
    """`template` with `system_prompt` as the system message of a conversation that brings none: what `eval`,
    `chat` and the CPU server render. Without it vLLM's server uses the model's own default (Qwen's names itself)."""
    lit = json.dumps(system_prompt)  # a Jinja string literal: Jinja reads JSON's escapes
    return (
        "{%- if messages and messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {lit}}}] + messages %}}"
        "{%- endif %}" + template
    )


def exec_vllm(plan: VLLMPlan, api_key: str | None = None) -> None:
    """Replace this process with vLLM's server (its API key through the environment, never the command)."""
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    exe = shutil.which("vllm")
    argv = [exe, *plan.command[1:]] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main", *plan.command[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


def command_line(plan: VLLMPlan) -> str:
    return shlex.join(plan.command)


def use_vllm(home, adapter_id: str | None, engine: str, recipe: str | None = None) -> bool:
    """Whether `serve` hands over to vLLM: `--engine vllm`, or `auto` with a vLLM recipe on a machine that runs it."""
    t = open_target(home, adapter_id, recipe=recipe, require_adapter=False)
    return pick_engine(engine, t.recipe) == "vllm"
