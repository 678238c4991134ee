"""``nnterp serve``: vLLM's own OpenAI-compatible server, with nnterp's worker inside and standardized
interventions on requests.

The server is vLLM's (its app, engine, routes, streaming, ``--api-key``); nnterp adds one ASGI middleware
(:class:`NNterpMiddleware`, installed through vLLM's ``--middleware``) and the worker that applies the
interventions (:mod:`.served`). A request to ``/v1/completions`` or ``/v1/chat/completions`` may carry an
``nnterp`` object (:mod:`nnterp.backends.taps.spec`): the middleware checks it against the model, resolves token
vectors to LM-head rows, and hands it to the engine in ``vllm_xargs``; when the response is complete it takes the
request's captures from the engine and adds them to the response (``"nnterp"``; for a stream, one last event
before ``[DONE]``). Captures up to ``NNTERP_SERVE_INLINE_BYTES`` come inline as base64 safetensors, larger ones
under a handle, fetched once from ``GET /nnterp/captures/<handle>`` (binary safetensors) within
``NNTERP_SERVE_KEEP_SECONDS``. ``GET /nnterp/model`` describes the model. No code from a request is run.

This module runs in vLLM's API server process and must not load nnsight there (nnsight's patches break vLLM's
streaming responses): it imports the standard library, :mod:`..taps.spec` and, lazily, torch and safetensors.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import os
import time
import uuid
from typing import Any

from ..taps.spec import SPEC_KEY, ModelFacts, RequestSpec, SpecError, parse_spec

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"
INLINE_BYTES = int(os.environ.get("NNTERP_SERVE_INLINE_BYTES", 4 << 20))
MAX_CAPTURE_BYTES = int(os.environ.get("NNTERP_SERVE_MAX_CAPTURE_BYTES", 1 << 30))
KEEP_SECONDS = float(os.environ.get("NNTERP_SERVE_KEEP_SECONDS", 600))


class RequestError(Exception):
    """An invalid request: answered with ``status`` and an OpenAI-style error naming ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class NNterpMiddleware:
    """Pure ASGI middleware over vLLM's app: standardized interventions on generation requests, and the routes
    under ``/nnterp/``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.kept: dict[str, tuple[float, bytes]] = {}  # handle -> (expiry, safetensors bytes)
        self.facts: ModelFacts | None = None
        self.rows: dict[int, list[float]] = {}  # token id -> LM-head row

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        try:
            if path.startswith("/nnterp/"):
                self._authorize(scope)
                return await self._route(scope, path, send)
            if scope["method"] != "POST" or path not in GENERATION_PATHS:
                return await self.app(scope, receive, send)
            body = await _read_body(receive)
            data = _json_object(body)
            if data is None or (SPEC_KEY not in data and SPEC_KEY not in (data.get("vllm_xargs") or {})):
                return await self.app(scope, _replay(body, receive), send)  # a plain request: vLLM's own handling
            self._authorize(scope)
            spec, data = await self._prepare(scope, data)
        except RequestError as error:
            return await _send_json(send, error.status, _error_body(error.message, error.param, error.status))
        await self._run(scope, json.dumps(data).encode(), spec, bool(data.get("stream")), receive, send)

    # -- requests ----------------------------------------------------------------------------------------------

    async def _prepare(self, scope: dict, data: dict) -> tuple[RequestSpec, dict]:
        if SPEC_KEY in (data.get("vllm_xargs") or {}):
            raise RequestError(400, f"vllm_xargs.{SPEC_KEY} is nnterp's own field: send the interventions as the "
                                    f"request's {SPEC_KEY!r} object.", f"vllm_xargs.{SPEC_KEY}")
        if data.get("n", 1) not in (1, None) or data.get("best_of", 1) not in (1, None):
            raise RequestError(400, "a request with nnterp interventions samples one sequence: n must be 1.", "n")
        engine = scope["app"].state.engine_client
        facts = await self._model_facts(engine)
        try:
            spec = parse_spec(data.pop(SPEC_KEY), facts)
        except SpecError as error:
            raise RequestError(400, error.message, error.param) from None
        for index, steer in enumerate(spec.steer):
            if steer.vector is None:
                steer.vector = await self._token_row(engine, steer.token, f"nnterp.steer[{index}].vector.token")
        if spec.capture:
            await self._check_capture_size(engine, data, spec, facts)
        spec.handle = uuid.uuid4().hex
        data["vllm_xargs"] = {**(data.get("vllm_xargs") or {}), SPEC_KEY: spec.to_json()}
        return spec, data

    async def _model_facts(self, engine: Any) -> ModelFacts:
        if self.facts is None:
            described = next(d for d in await engine.collective_rpc("nnterp_describe") if d)
            self.facts = ModelFacts(described["num_layers"], described["hidden_size"])
        return self.facts

    async def _token_row(self, engine: Any, token: str, param: str) -> list[float]:
        tokenizer = await _maybe_await(engine.get_tokenizer())
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RequestError(400, f"{token!r} is {len(ids)} tokens ({ids}) for this model's tokenizer; a token "
                                    f"vector needs exactly one (try with or without a leading space).", param)
        if ids[0] not in self.rows:
            rows = [row for row in await engine.collective_rpc("nnterp_unembedding_row", args=(ids[0],)) if row]
            self.rows[ids[0]] = rows[0]
        return self.rows[ids[0]]

    async def _check_capture_size(self, engine: Any, data: dict, spec: RequestSpec, facts: ModelFacts) -> None:
        """Refuse, before running, a capture whose activations could exceed ``MAX_CAPTURE_BYTES``."""
        tokenizer = await _maybe_await(engine.get_tokenizer())
        if "messages" in data:
            try:
                text = tokenizer.apply_chat_template(data["messages"], tokenize=False, add_generation_prompt=True)
                prompt_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            except Exception:  # no template, or messages vLLM will refuse itself: estimate from their text
                prompt_tokens = len(tokenizer.encode(json.dumps(data["messages"])))
        else:
            prompt = data.get("prompt", "")
            prompt_tokens = len(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) \
                else len(tokenizer.encode(prompt if isinstance(prompt, str) else str(prompt)))
        max_tokens = data.get("max_tokens") or data.get("max_completion_tokens") or engine.vllm_config.model_config.max_model_len
        tokens = prompt_tokens + int(max_tokens)
        size = len(spec.capture_names) * tokens * facts.hidden_size * 4
        if size > MAX_CAPTURE_BYTES:
            raise RequestError(
                400, f"the capture could reach {size / 2**20:.0f} MiB ({len(spec.capture_names)} streams x up to {tokens} "
                     f"tokens x {facts.hidden_size} values), over this server's cap of {MAX_CAPTURE_BYTES / 2**20:.0f} MiB "
                     f"(NNTERP_SERVE_MAX_CAPTURE_BYTES). Capture fewer layers or tokens, or lower max_tokens.",
                "nnterp.capture")

    async def _run(self, scope: dict, body: bytes, spec: RequestSpec, stream: bool, receive: Any, send: Any) -> None:
        """vLLM's own handling of the rewritten request, with the captures added to its response."""
        engine = scope["app"].state.engine_client
        held: list[dict] = []
        status = {"code": 200, "headers": []}
        taken: dict[str, Any] = {}

        async def take() -> dict:
            if not taken:
                taken.update(await self._take(engine, spec))
            return taken

        async def forward(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["headers"] = message["status"], message.get("headers", [])
                if stream:
                    await send(message)
                return
            if stream:
                chunk = message.get("body", b"")
                if b"data: [DONE]" in chunk:
                    head, _, tail = chunk.partition(b"data: [DONE]")
                    event = json.dumps({"object": "nnterp.captures", "choices": [], SPEC_KEY: await take()})
                    chunk = head + f"data: {event}\n\n".encode() + b"data: [DONE]" + tail
                return await send({**message, "body": chunk})
            held.append(message)
            if not message.get("more_body"):
                await self._finish_json(send, status, held, await take())

        try:
            await self.app(scope, _replay(body, receive), forward)
        finally:
            if not taken:
                await asyncio.shield(self._take(engine, spec))  # frees what the engine holds for the request

    async def _finish_json(self, send: Any, status: dict, held: list[dict], extra: dict) -> None:
        body = b"".join(message.get("body", b"") for message in held)
        code = status["code"]
        if code == 200 and extra.get("error"):
            code, body = 500, json.dumps(_error_body(extra["error"], SPEC_KEY, 500)).encode()
        elif code == 200:
            response = json.loads(body)
            response[SPEC_KEY] = extra
            body = json.dumps(response).encode()
        headers = [(k, v) for k, v in status["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": code,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _take(self, engine: Any, spec: RequestSpec) -> dict:
        """The request's captures from every worker, as the response carries them; its error if any."""
        import torch
        from safetensors.torch import load, save

        parts = [part for part in await engine.collective_rpc("nnterp_take", args=(spec.handle,)) if part]
        errors = [part["error"] for part in parts if part.get("error")]
        captures: dict[str, torch.Tensor] = {}
        for part in parts:
            if part["captures"]:
                captures.update(load(part["captures"]))
        result: dict[str, Any] = {}
        if errors:
            result["error"] = f"the engine could not apply this request's interventions: {errors[0]}"
        if not spec.capture:
            return result
        missing = [name for name in spec.capture_names if name not in captures]
        for name in missing:  # no token selected (e.g. tokens="generated" with one new token): an empty capture
            captures[name] = torch.empty((0, (self.facts.hidden_size if self.facts else 0)))
        payload = save({name: tensor.contiguous() for name, tensor in captures.items()})
        described = {"format": "safetensors", "shapes": {name: list(t.shape) for name, t in captures.items()},
                     "dtype": str(next(iter(captures.values())).dtype).removeprefix("torch.") if captures else None,
                     "bytes": len(payload)}
        if len(payload) <= INLINE_BYTES:
            described.update(encoding="base64", data=base64.b64encode(payload).decode())
        else:
            self._expire()
            handle = uuid.uuid4().hex
            self.kept[handle] = (time.monotonic() + KEEP_SECONDS, payload)
            described.update(handle=handle, url=f"/nnterp/captures/{handle}", expires_in=KEEP_SECONDS)
        result["captures"] = described
        return result

    # -- routes -------------------------------------------------------------------------------------------------

    async def _route(self, scope: dict, path: str, send: Any) -> None:
        if scope["method"] != "GET":
            raise RequestError(405, f"{path} takes GET.")
        if path == "/nnterp/model":
            facts = await self._model_facts(scope["app"].state.engine_client)
            return await _send_json(send, 200, {"num_layers": facts.num_layers, "hidden_size": facts.hidden_size,
                                                "accessors": list(facts.accessors)})
        handle = path.removeprefix("/nnterp/captures/")
        self._expire()
        if path.startswith("/nnterp/captures/") and handle in self.kept:
            _, payload = self.kept.pop(handle)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"),
                                    (b"content-length", str(len(payload)).encode())]})
            return await send({"type": "http.response.body", "body": payload})
        raise RequestError(404, f"{path}: no such capture (each is fetched once, within {KEEP_SECONDS:.0f} s of its "
                                f"response) and no such route (/nnterp/model, /nnterp/captures/<handle>).")

    def _expire(self) -> None:
        now = time.monotonic()
        for handle in [h for h, (expiry, _) in self.kept.items() if expiry < now]:
            del self.kept[handle]

    def _authorize(self, scope: dict) -> None:
        """vLLM's ``--api-key`` check, for the requests this middleware answers before vLLM's own check runs."""
        args = getattr(scope["app"].state, "args", None)
        given = getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY")
        keys = [given] if isinstance(given, str) else [key for key in (given or []) if key]
        if not keys:
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, key) for key in keys):
            raise RequestError(401, "Unauthorized: give the server's API key as `Authorization: Bearer <key>`.")


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any):
    """A ``receive`` that gives the app ``body``, then the client's own messages (its disconnect, if it leaves)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _json_object(body: bytes) -> dict | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None  # vLLM answers malformed JSON itself
    return data if isinstance(data, dict) else None


def _error_body(message: str, param: str | None, status: int) -> dict:
    kind = "invalid_request_error" if status < 500 else "nnterp_intervention_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def _send_json(send: Any, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def serve_arguments(model: str, arguments: list[str]) -> list[str]:
    """``vllm serve`` arguments for ``nnterp serve MODEL ARGUMENTS``: loopback unless ``--host`` is given, nnterp's
    worker and middleware, eager execution (``--no-enforce-eager``: breakable CUDA graphs with every layer accessor
    served at replay, see :func:`graph_arguments`) and no prefix caching
    (cached tokens skip the forward pass) unless the arguments say otherwise; on a machine without an accelerator,
    vLLM's CPU engine with a 1 GiB KV cache."""
    from .engine import no_accelerator, worker_class

    given = {argument.split("=", 1)[0] for argument in arguments if argument.startswith("--")}
    if "--no-enforce-eager" in given:
        arguments = graph_arguments(arguments)
    extra = ["--middleware", f"{NNterpMiddleware.__module__}.{NNterpMiddleware.__name__}"]
    defaults = {"--host": ["--host", "127.0.0.1"], "--worker-cls": ["--worker-cls", worker_class()],
                "--enforce-eager": ["--enforce-eager"], "--enable-prefix-caching": ["--no-enable-prefix-caching"]}
    if no_accelerator():
        defaults["--kv-cache-memory-bytes"] = ["--kv-cache-memory-bytes", str(1 << 30)]
    for flag, value in defaults.items():
        if flag not in given and f"--no-{flag.removeprefix('--')}" not in given:
            extra += value
    return ["serve", model, *arguments, *extra]


def graph_arguments(arguments: list[str]) -> list[str]:
    """``--no-enforce-eager``: vLLM's breakable CUDA graphs (in vLLM's graph mode), every layer accessor served at
    replay by the worker's seams (its ``--additional-config`` names them); refused without a GPU."""
    from .engine import no_accelerator
    from ..taps.spec import ACCESSORS, GRAPH_ACCESSORS_KEY

    if no_accelerator():
        raise SystemExit("nnterp serve: --no-enforce-eager serves CUDA graphs, which need an NVIDIA GPU; this machine "
                         "has none. Serve eagerly (the default).")
    os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"  # read by the engine's processes, which inherit it
    config, arguments = _json_argument(arguments, "--additional-config")
    config[GRAPH_ACCESSORS_KEY] = list(ACCESSORS)
    return [*arguments, "--additional-config", json.dumps(config)]


def _json_argument(arguments: list[str], flag: str) -> tuple[dict, list[str]]:
    """The JSON objects given to ``flag`` (``--flag JSON`` or ``--flag=JSON``), merged, and the other arguments."""
    value, rest, index = {}, [], 0
    while index < len(arguments):
        argument = arguments[index]
        given, equals, inline = argument.partition("=")
        if argument == flag:
            value.update(json.loads(arguments[index + 1]))
            index += 2
            continue
        if equals and given == flag:
            value.update(json.loads(inline))
        else:
            rest.append(argument)
        index += 1
    return value, rest


def serve(model: str, arguments: list[str]) -> int:
    """Run vLLM's server with nnterp's additions (blocks until the server stops)."""
    require_v1_model_runner()
    return run_vllm_serve(serve_arguments(model, arguments))


def require_v1_model_runner() -> None:
    """Ask vLLM (through its own environment variable, inherited by the engine's processes) for the model runner
    nnsight instruments: from vLLM 0.25 the V2 runner is the default for dense models, and a worker holding it
    refuses to start. An explicit request for the V2 runner is refused here, with the reason."""
    asked = os.environ.get(V2_RUNNER)
    if asked not in (None, "", "0"):
        raise SystemExit(f"nnterp serve: {V2_RUNNER}={asked!r} selects vLLM's V2 model runner, which carries no "
                         f"interventions; unset it, or serve with plain vLLM.")
    os.environ[V2_RUNNER] = "0"


def run_vllm_serve(argv: list[str]) -> int:
    """vLLM's own ``vllm serve`` command (its argument parser, checks and launch) on ``argv`` (``["serve", MODEL,
    ...]``); the installed ``vllm`` script is not used because some builds ship it broken."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    try:  # vLLM >= 0.28 moved these
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.entrypoints.utils import cli_env_setup
        from vllm.utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)
    command.validate(args)
    command.cmd(args)
    return 0
