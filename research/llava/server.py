"""`--run_mode serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one loaded model.

    POST /v1/chat/completions   OpenAI's chat-completions schema: messages (system / user / assistant; content
                                a string or text / image_url parts, images by http(s) or data: URL), max_tokens
                                or max_completion_tokens, temperature, top_p, seed, stop, stream, n=1; extra
                                fields top_k and repetition_penalty
    GET  /v1/models             the one model served
    GET  /health                liveness and queue length (never needs a key)
    GET  /metrics               Prometheus text format (serve_metrics.py)
    GET  /                      the chat page (research/llava/web/, its files under /static/)
    GET  /limits                the image and body byte limits, for the page to check before sending

Conversations are rendered with llava-hf's chat template (LlavaProcessor.encode_chat). Requests are batched by
serving.Scheduler. Errors are OpenAI's error object with the right status: 400 for a bad request (the message
names the field; an unknown or unsupported parameter too, as OpenAI does), 401 without a valid key, 403 for a
foreign Origin, 413 for a body or an image over its limit, 415 for a body that is not application/json, 429
when the queue is full, 500 for a failure while generating; never a traceback.

What a network client can make the server do (docs/serving.md has the threat model), decided in one place each:
* `Gate` (ASGI, before any route): the Host header (`--allowed_hosts`, against DNS rebinding), the Origin of a
  browser's POST (`--allowed_origins`, CORS off without it), the API key (`--api_key`, `--api_key_file`).
* `_body`: only `application/json` bodies (a web page can send text/plain or a form to any address without a
  CORS preflight), at most max_body_bytes, nesting depth and lone surrogates refused.
* `ChatRequest`: every field known, or a 400 naming it.
* image URLs: fetched under `ServeOptions.policy` (media_policy.py: public addresses only by default), in a
  worker thread per request, never on the event loop or the model's thread. Every refused or failed fetch
  gets the same answer (the reason goes to the log), so the server cannot be used to scan ports. Only URLs are
  read (http(s) and data:): a client cannot make the server open its local files.
"""
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from generation import MAX_TOP_LOGPROBS, GenerationSettings
from image_loading import display_name, load_image
from llava_errors import LimitError, LlavaError
from media_policy import MAX_REDIRECTS, FetchError, MediaPolicy
from serve_metrics import CONTENT_TYPE as METRICS_TYPE, Metrics
from serving import PREFILL_CHUNK, QueueFull, Request as GenerationRequest, prepare_engine

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")   # the chat page, shipped with the package
MAX_JSON_DEPTH = 64      # a chat body nests ~6 levels; far deeper is an attack on the parser, not a request
_SURROGATE = re.compile("[\ud800-\udfff]")     # JSON's "\ud800" escapes decode to lone surrogates
# what a browser may load without a key: the page asks for the key itself; /health is for load balancers
OPEN_PATHS = ("/health", "/", "/favicon.ico")
LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
CHARS_PER_TOKEN = 32     # no SentencePiece token of LLaMA's vocabulary is longer: more text cannot fit the context
SHUTDOWN = "the server is shutting down"
FETCH_FAILED = ("could not be fetched (the server's media policy refused its address, or the download failed; "
                "the server's log has the reason)")


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, headers


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(data: bytes):
    """The body as JSON; 400 for what is not JSON, nests deeper than MAX_JSON_DEPTH or holds a lone UTF-16
    surrogate (valid JSON, not valid Unicode: the tokenizer could not encode it)."""
    try:
        body = json.loads(data)
    except RecursionError:
        raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None
    stack = [(body, 1)]
    while stack:        # iterative: a deep body must not recurse here either
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ApiError(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                    "escape): not valid Unicode text")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep")
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        for key, item in items:
            if key is not None:
                stack.append((key, depth))
            stack.append((item, depth + 1))
    return body


def _number(body, key, kind, low=None, high=None, low_open=False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = "" if low is None else f" {'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}{bounds}, got {value!r}",
                       key)
    return kind(value)


def _zero(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


# The chat-completions fields this server implements (null means the default, as OpenAI treats it)
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "top_k", "repetition_penalty", "logprobs", "top_logprobs"}
# OpenAI fields it does not implement, accepted at their neutral value only (clients send them as defaults);
# any other value is a 400 naming the field, never a silently ignored request
NEUTRAL = {"frequency_penalty": _zero, "presence_penalty": _zero,
           "response_format": lambda v: v == {"type": "text"},
           "tools": lambda v: v == [], "tool_choice": lambda v: v == "none", "functions": lambda v: v == [],
           "function_call": lambda v: v == "none", "parallel_tool_calls": lambda v: isinstance(v, bool),
           "logit_bias": lambda v: v == {}, "user": lambda v: isinstance(v, str), "store": lambda v: v is False,
           "metadata": lambda v: v == {}, "service_tier": lambda v: v in ("auto", "default"),
           "modalities": lambda v: v == ["text"]}


def check_fields(body, model_name):
    """400 naming the first field this server does not know, or knows but does not implement; an unknown model."""
    for key, value in body.items():
        if key in FIELDS or (key in NEUTRAL and value is None):
            continue
        if key in NEUTRAL:
            if NEUTRAL[key](value):
                continue
            raise ApiError(400, f"'{key}' is not supported by this server (got {_short(value)})", key,
                           code="unsupported_parameter")
        name = key if len(key) <= 60 else key[:55] + "..."
        raise ApiError(400, f"unknown parameter '{name}'", name, code="unknown_parameter")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(400, f"the model {_short(model)} does not exist here: this server serves '{model_name}' "
                            f"(GET /v1/models)", "model", code="model_not_found")


def _short(value, limit=80):
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ChatRequest:
    """A validated /v1/chat/completions body: the conversation (image URLs pulled out, in prompt order), the
    generation settings and the stop strings."""

    def __init__(self, body, defaults: GenerationSettings, model_name=None):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if model_name is not None:
            check_fields(body, model_name)
        self.stream = body.get("stream")
        if self.stream is None:                 # null: the default, false
            self.stream = False
        if not isinstance(self.stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {self.stream!r}", "stream")
        options = body.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), (bool, type(None))):
            raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        self.include_usage = options.get("include_usage") is True
        n = _number(body, "n", int, 1, 1)
        if n not in (None, 1):
            raise ApiError(400, "'n' must be 1", "n")
        self.messages, self.image_urls = self._messages(body.get("messages"))
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ApiError(400, f"'logprobs' must be true or false, got {_short(logprobs)}", "logprobs")
        top = _number(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        # None: no log-probabilities; k: each token's and its k most likely alternatives (OpenAI's fields)
        self.top_logprobs = (top or 0) if logprobs else None
        max_tokens = _number(body, "max_completion_tokens", int, 1)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", int, 1)
        self.max_tokens_given = max_tokens is not None
        temperature = _number(body, "temperature", float, 0, 2)
        top_p = _number(body, "top_p", float, 0, 1, low_open=True)
        top_k = _number(body, "top_k", int, 0)
        penalty = _number(body, "repetition_penalty", float, 0, low_open=True)
        seed = _number(body, "seed", int, 0)
        do_sample = defaults.do_sample if temperature is None else temperature > 0
        values = {"max_new_tokens": max_tokens or defaults.max_new_tokens, "do_sample": do_sample,
                  "temperature": temperature if temperature else defaults.temperature,
                  "top_p": defaults.top_p if top_p is None else top_p,
                  "top_k": defaults.top_k if top_k is None else top_k,
                  "repetition_penalty": defaults.repetition_penalty if penalty is None else penalty,
                  "seed": defaults.seed if seed is None else seed}
        self.settings = GenerationSettings(**{**defaults.__dict__, **values})
        try:
            self.settings.validate()
        except LlavaError as e:
            raise ApiError(400, str(e)) from None
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
        self.stop = stop

    @staticmethod
    def _messages(messages):
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        out, urls = [], []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise ApiError(400, f"'{where}' must be an object", where)
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"'{where}.role' must be system, user or assistant, got {role!r}", f"{where}.role")
            if isinstance(content, str):
                out.append({"role": role, "content": [{"type": "text", "text": content}]})
                continue
            if not isinstance(content, list):
                raise ApiError(400, f"'{where}.content' must be a string or a list of parts", f"{where}.content")
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str) or not url:
                        raise ApiError(400, f"'{at}.image_url.url' must be a URL string", f"{at}.image_url.url")
                    if role != "user":
                        raise ApiError(400, f"'{at}': only user messages can hold images", at)
                    parts.append({"type": "image"})
                    urls.append((at, url))
                else:
                    raise ApiError(400, f"'{at}' must be a text part with a string 'text' or an image_url part", at)
            out.append({"role": role, "content": parts})
        return out, urls


@dataclass
class ServeOptions:
    """What the server lets a network client do: the run_mindformer.py serve flags, checked before anything
    loads (`from_args`)."""
    policy: MediaPolicy = field(default_factory=MediaPolicy)   # image URLs: public addresses only
    api_keys: Tuple[str, ...] = ()        # none: no key needed
    allowed_origins: Tuple[str, ...] = ()  # browser origins other than the server's own (CORS); none: CORS off
    allowed_hosts: Tuple[str, ...] = ()   # Host header names; () = LOCAL_NAMES and the bound host; "*" = any
    bound_host: str = "127.0.0.1"
    shutdown_grace_s: float = 10.0        # SIGTERM / Ctrl-C: running answers may finish for this long
    image_workers: int = 4                # image downloads and decodes at once (their own pool)

    @classmethod
    def from_args(cls, args):
        keys = [k for k in (getattr(args, "api_key", None) or [])]
        path = getattr(args, "api_key_file", None)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                raise LlavaError(f"--api_key_file {path}: no such file") from None
            except (OSError, UnicodeDecodeError) as e:
                raise LlavaError(f"--api_key_file {path}: cannot read ({getattr(e, 'strerror', None) or e})") \
                    from None
            found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not found:
                raise LlavaError(f"--api_key_file {path}: holds no key (one key a line; # starts a comment)")
            keys += found
        for key in keys:
            if not key or any(c.isspace() for c in key) or not key.isprintable():
                raise LlavaError("--api_key / --api_key_file: a key must be printable text without spaces")
        origins = []
        for entry in getattr(args, "allowed_origins", None) or []:
            for origin in entry.split(","):
                origin = origin.strip().rstrip("/")
                if origin and origin != "*" and not re.match(r"^https?://[^/?#]+$", origin):
                    raise LlavaError(f"--allowed_origins: {origin!r} is not an origin like https://example.com")
                if origin:
                    origins.append(origin.lower())
        hosts = [h.strip().lower().rstrip(".") for entry in getattr(args, "allowed_hosts", None) or []
                 for h in entry.split(",") if h.strip()]
        redirects = getattr(args, "media_redirects", None)
        policy = MediaPolicy.from_args(allow_urls=getattr(args, "allow_media_urls", True),
                                       allow_private=getattr(args, "allow_private_media", False),
                                       domains=getattr(args, "allowed_media_domains", None),
                                       redirects=MAX_REDIRECTS if redirects is None else redirects)
        grace = getattr(args, "shutdown_grace_s", None)
        grace = 10.0 if grace is None else grace
        workers = getattr(args, "image_workers", None) or 4
        if grace < 0 or workers < 1:
            raise LlavaError(f"serve: --shutdown_grace_s must be >= 0 and --image_workers >= 1, got {grace}, "
                             f"{workers}")
        return cls(policy=policy, api_keys=tuple(keys), allowed_origins=tuple(origins), allowed_hosts=tuple(hosts),
                   bound_host=getattr(args, "host", "127.0.0.1"), shutdown_grace_s=float(grace),
                   image_workers=int(workers))

    # ------------------------------------------------------------------ the rules
    def host_ok(self, header):
        """The Host header names this server: an IP address (a DNS-rebinding page's Host is its own name, never
        an address), a local name, the bound host or an --allowed_hosts name. No header (HTTP/1.0): allowed."""
        if header is None or "*" in self.allowed_hosts:
            return True
        host = header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        host = host.rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        names = self.allowed_hosts or (*LOCAL_NAMES, self.bound_host.lower())
        return host in names

    def origin_ok(self, origin, host_header):
        """A browser's Origin is the server's own (the page it served) or one --allowed_origins names."""
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        own = origin.split("://", 1)[-1]
        return host_header is not None and own == host_header.strip().lower()

    def key_ok(self, authorization):
        if not self.api_keys:
            return True
        if not authorization or not authorization[:7].lower() == "bearer ":
            return False
        given = authorization[7:].strip().encode()
        # compare with every key, in constant time, so timing does not tell how much of a key was right
        return sum(hmac.compare_digest(given, k.encode()) for k in self.api_keys) > 0


class Gate:
    """ASGI middleware in front of every route: Host, Origin and API key, in that order, each refusal an
    OpenAI error body; and every answer's status counted for /metrics. Plain ASGI (not BaseHTTPMiddleware), so
    a streaming answer and a client's disconnect pass through untouched."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        path, method = scope.get("path", ""), scope.get("method", "GET")
        metrics = self.server.metrics

        async def counted(message):
            if message["type"] == "http.response.start" and metrics is not None:
                metrics.request(path, message["status"])
            await send(message)

        opts = self.server.options
        refusal = None
        host = headers.get("host")
        if self.server.draining and path != "/health":
            refusal = ApiError(503, f"{SHUTDOWN}: no new requests", kind="server_error", code="shutting_down")
        elif not opts.host_ok(host):
            refusal = ApiError(400, f"the Host header {host[:100]!r} does not name this server (--allowed_hosts)",
                               code="invalid_host")
        elif method not in ("GET", "HEAD", "OPTIONS") and "origin" in headers and \
                not opts.origin_ok(headers["origin"], host):
            refusal = ApiError(403, f"requests from the web page at {headers['origin'][:100]!r} are not allowed "
                                    f"(--allowed_origins)", code="origin_not_allowed")
        elif path not in OPEN_PATHS and not path.startswith("/static/") and method != "OPTIONS" and \
                not opts.key_ok(headers.get("authorization")):
            given = headers.get("authorization")
            message = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'." if not given else
                       "Incorrect API key provided. This server's keys are given by --api_key / --api_key_file.")
            refusal = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if refusal is not None:
            response = JSONResponse(error_body(refusal.message, refusal.kind, refusal.param, refusal.code),
                                    status_code=refusal.status, headers=refusal.headers)
            return await response(scope, receive, counted)
        return await self.app(scope, receive, counted)


class Server:
    """The FastAPI app around a processor, a scheduler and the job's default settings."""

    def __init__(self, processor, scheduler, defaults, model_name, max_body_bytes, on_ready=None, options=None):
        self.on_ready = on_ready
        self.options = options or ServeOptions()
        self.metrics = Metrics(scheduler)
        self.open = {}              # id(job) -> (job, its event queue): the answers in flight, for the drain
        self.draining = False
        # image downloads and decodes in their own bounded pool: a text-only request never waits behind them
        self.image_pool = ThreadPoolExecutor(max_workers=self.options.image_workers,
                                             thread_name_prefix="llava-images")
        self.processor = processor
        self.scheduler = scheduler
        self.defaults = defaults
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.app = self._app()

    def _app(self):
        @contextlib.asynccontextmanager
        async def lifespan(_):
            if self.on_ready is not None:
                self.on_ready()
            yield

        app = FastAPI(title="llava-mindspore", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        @app.exception_handler(ApiError)
        async def api_error(_, e: ApiError):
            return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status,
                                headers=e.headers)

        @app.exception_handler(404)
        async def not_found(request, _):
            return JSONResponse(error_body(f"no route {request.method} {request.url.path}"), status_code=404)

        @app.exception_handler(405)
        async def not_allowed(request, _):
            return JSONResponse(error_body(f"method {request.method} is not allowed on {request.url.path}"),
                                status_code=405)

        @app.exception_handler(Exception)
        async def internal(_, e: Exception):
            return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)

        @app.get("/health")
        async def health():
            s = self.scheduler
            if self.draining:      # load balancers stop sending work here
                return JSONResponse({"status": "draining", "waiting": s.waiting, "running": s.running},
                                    status_code=503)
            return {"status": "ok", "waiting": s.waiting, "running": s.running, "steps": s.steps,
                    "largest_batch": s.largest_batch, "completed": s.completed, "cancelled": s.cancelled,
                    **s.engine.cache_stats()}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=METRICS_TYPE)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "llava-mindspore"}]}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.chat_completions(request)

        @app.get("/")
        async def page():
            return FileResponse(os.path.join(WEB, "index.html"))

        @app.get("/limits")
        async def limits():
            return {"max_image_bytes": self.processor.max_bytes, "max_body_bytes": self.max_body_bytes}

        app.mount("/static", StaticFiles(directory=WEB), name="static")
        app.add_middleware(Gate, server=self)
        if self.options.allowed_origins:   # outermost: a preflight is answered before the Gate asks for a key
            from starlette.middleware.cors import CORSMiddleware
            app.add_middleware(CORSMiddleware, allow_origins=list(self.options.allowed_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        return app

    async def _body(self, request):
        kind = request.headers.get("content-type", "")
        if kind.split(";", 1)[0].strip().lower() != "application/json":
            # a web page can POST text/plain or a form to any address without asking (no CORS preflight)
            raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json', got "
                                f"{kind[:60]!r}" if kind else "the request body must be sent as 'Content-Type: "
                                "application/json' (no Content-Type given)", code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes, more than the limit of {self.max_body_bytes}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise ApiError(413, f"the request body is more than the limit of {self.max_body_bytes} bytes")
        # a large body takes a while to parse and check: not on the event loop, which every stream shares
        return await run_in_threadpool(parse_json, bytes(data))

    def _pixels(self, urls):
        """Fetch and preprocess the images (runs in a worker thread)."""
        p = self.processor
        pixels = []
        for where, url in urls:
            try:   # preprocessing too: an intermediate image over max_pixels is the request's fault
                image = load_image(url, timeout=p.timeout, max_bytes=p.max_bytes, max_pixels=p.max_pixels,
                                   allow_paths=False, policy=self.options.policy)
                pixels.append(p.pixels([image], names=[display_name(url)]))
            except FetchError as e:
                # one answer for every refusal and failure (a closed port, an open one, a slow one, an address
                # the policy refuses): the reason only in the log
                print(f"serve: image fetch refused or failed: {e}", file=sys.stderr, flush=True)
                raise ApiError(400, f"image {display_name(url)}: {FETCH_FAILED}", f"{where}.image_url.url",
                               code="image_fetch_failed") from None
            except LimitError as e:
                raise ApiError(413, str(e), f"{where}.image_url.url") from None
            except LlavaError as e:
                raise ApiError(400, str(e), f"{where}.image_url.url") from None
        return np.concatenate(pixels) if pixels else None

    def _encode(self, messages):
        """The conversation's token ids (runs in a worker thread: a long text takes a while to tokenize)."""
        try:
            return self.processor.encode_chat(messages)
        except LlavaError as e:
            raise ApiError(400, str(e), "messages") from None

    async def chat_completions(self, request):
        timing = self.metrics.timing()
        chat = ChatRequest(await self._body(request), self.defaults, self.model_name)
        chars = sum(len(part.get("text", "")) for m in chat.messages for part in m["content"])
        limit = CHARS_PER_TOKEN * self.scheduler.seq_length
        if chars > limit:     # before tokenizing it: such a text could never fit the context
            raise ApiError(400, f"the conversation's text is {chars} characters, more than a context of "
                                f"{self.scheduler.seq_length} tokens can hold (at most {limit})", "messages")
        ids = await run_in_threadpool(self._encode, chat.messages)
        if not chat.max_tokens_given:   # the default answer length, as far as the context allows
            room = self.scheduler.seq_length - len(ids)
            chat.settings.max_new_tokens = max(1, min(chat.settings.max_new_tokens, room))
        try:
            self.scheduler.check(len(ids), chat.settings)
        except LlavaError as e:
            raise ApiError(400, str(e), "max_tokens" if chat.max_tokens_given else "messages") from None
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self.image_pool, self._pixels, chat.image_urls) \
            if chat.image_urls else None
        events = asyncio.Queue()
        job = GenerationRequest(ids=ids, pixel_values=pixels, settings=chat.settings, stop=chat.stop,
                                emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                top_logprobs=chat.top_logprobs)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except LlavaError as e:
            raise ApiError(400, str(e)) from None
        self.open[id(job)] = (job, events)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(self._sse(job, events, reply_id, created, chat.include_usage, timing),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            text, logprobs = [], None if chat.top_logprobs is None else []
            while True:
                event = await _next(events, gone)
                if event is None:          # the client went away: its row is freed below
                    return Response(status_code=499)
                if event[0] == "delta":
                    timing.piece()
                    text.append(event[1])
                    if logprobs is not None:
                        logprobs += self._logprobs(event[2])
                elif event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                elif event[0] == "shutdown":
                    raise ApiError(503, event[1], kind="server_error", code="shutting_down")
                else:
                    _, reason, prompt_tokens, completion_tokens, cached = event
                    timing.done(prompt_tokens, completion_tokens, cached)
                    break
        finally:
            gone.cancel()
            self.open.pop(id(job), None)
            job.cancel()       # a client that went away frees its row; a finished one is not affected
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None if logprobs is None else {"content": logprobs},
                             "finish_reason": reason}],
                "usage": _usage(prompt_tokens, completion_tokens, cached)}

    def _logprobs(self, entries):
        """OpenAI's logprobs.content items for generation.token_logprobs entries: each token's text, its
        UTF-8 bytes and log-probability, and its top alternatives the same way."""
        tok = self.processor.tokenizer

        def item(token, logprob):
            # ids past the tokenizer (llava-hf's 32064-row embedding, 32002 tokens) have no text
            text = tok.convert_ids_to_tokens(token).replace("\u2581", " ") if token < len(tok) else ""
            raw = bytes([int(text[3:5], 16)]) if len(text) == 6 and text.startswith("<0x") else text.encode()
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        return [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                for token, logprob, top in entries]

    async def _sse(self, job, events, reply_id, created, include_usage, timing):
        def chunk(delta, reason=None, usage=None, logprobs=None):
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": reason}]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "delta":
                    timing.piece()
                    yield chunk({"content": event[1]},
                                logprobs={"content": self._logprobs(event[2])} if len(event) > 2 else None)
                elif event[0] in ("error", "shutdown"):
                    code = "shutting_down" if event[0] == "shutdown" else None
                    yield f"data: {json.dumps(error_body(event[1], 'server_error', code=code))}\n\n"
                    break
                else:
                    _, reason, prompt_tokens, completion_tokens, cached = event
                    timing.done(prompt_tokens, completion_tokens, cached)
                    yield chunk({}, reason)
                    if include_usage:
                        yield chunk(None, usage=_usage(prompt_tokens, completion_tokens, cached))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.open.pop(id(job), None)
            job.cancel()       # runs when the client disconnects mid-stream, too

    async def drain(self, uv):
        """SIGTERM / Ctrl-C: answer 503 to new requests, let the running (and already queued) answers finish
        within shutdown_grace_s, end every answer still open with an error (streams: an error event and
        `data: [DONE]`), then let uvicorn close."""
        self.draining = True
        grace = self.options.shutdown_grace_s
        print(f"serve: shutting down: new requests get 503; answers in flight have {grace:g} s to finish",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + grace
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.open:
            print(f"serve: {len(self.open)} answer(s) ended unfinished", file=sys.stderr, flush=True)
        for job, events in list(self.open.values()):
            job.cancel()
            events.put_nowait(("shutdown", f"{SHUTDOWN}: the answer was cut off"))
        for _ in range(100):            # the streams write their last event
            if not self.open:
                break
            await asyncio.sleep(0.02)
        uv.should_exit = True


async def _disconnected(request):
    """Returns when the client closes its connection (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(events, gone):
    """The next event of an answer, or None once the client is gone."""
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return None


def _usage(prompt_tokens, completion_tokens, cached_tokens):
    """OpenAI's usage object; cached_tokens: prompt tokens taken from the prefix cache, not computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def serve(job, host="127.0.0.1", port=8000, max_batch=8, max_queue=64, model_name="llava", lockstep=None,
          prefill_chunk=PREFILL_CHUNK, options=None):
    """Serve the loaded job (its engine's KV pool reserved and warm) until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn
    from serving import Scheduler
    scheduler = Scheduler(job.engine, job.tokenizer, max_batch=max_batch, max_queue=max_queue, lockstep=lockstep,
                          prefill_chunk=prefill_chunk)
    processor = job.processor

    options = options or ServeOptions(bound_host=host)

    def ready():
        print(f"serving '{model_name}' on http://{host}:{port} (OpenAI API: /v1/chat/completions; Ctrl-C stops)",
              file=sys.stderr, flush=True)
        keys = f"{len(options.api_keys)} API key(s)" if options.api_keys else "no API key (anyone who reaches the port)"
        cors = f"CORS for {', '.join(options.allowed_origins)}" if options.allowed_origins else "CORS off"
        print(f"access: {keys}; {cors}; {options.policy.describe()}", file=sys.stderr, flush=True)

    # a request body holds at most about one image of processor.max_bytes as base64, plus the conversation
    server = Server(processor, scheduler, job.settings, model_name,
                    max_body_bytes=(processor.max_bytes * 4) // 3 + (1 << 20), on_ready=ready, options=options)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        _uvicorn_server()(config, server).run()
    finally:
        server.image_pool.shutdown(wait=False, cancel_futures=True)
        scheduler.close()


def _uvicorn_server():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn, whose first SIGTERM / SIGINT starts Server.drain instead of closing the connections at once
        (uvicorn would cut the streams after its own 5 s, without an error event or [DONE]); a second signal
        stops at once. The signal is not raised again afterwards, so a drained server exits 0."""

        def __init__(self, config, app_server):
            super().__init__(config)
            self.app_server = app_server
            self.loop = None

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame):
            if self.app_server.draining or self.loop is None:
                self.should_exit = True
                self.force_exit = self.app_server.draining
                return
            self.app_server.draining = True
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.app_server.drain(self)))

    return Uvicorn



def run(args, root):
    """`run_mindformer.py --run_mode serve`: load once, then serve."""
    from llava_predict import Job
    chunk = args.prefill_chunk or PREFILL_CHUNK
    if args.max_batch < 1 or args.max_queue < 1 or chunk < 1:      # before anything loads
        raise LlavaError(f"serve: --max_batch, --max_queue and --prefill_chunk must be >= 1, got "
                         f"{args.max_batch}, {args.max_queue}, {chunk}")
    options = ServeOptions.from_args(args)                         # a bad key file fails before loading too
    # one KV pool of max_batch rows; a single process takes a smaller one when that is what fits (every rank
    # of a tensor-parallel job must hold the same pool, so they do not)
    job = Job(args, root).load(batch=args.max_batch, shrink_kv=not _tp_requested(args))
    prepare_engine(job, args.max_batch, chunk)
    lock = None
    if job.tp.enabled:   # rank 0 serves HTTP; the other ranks run its steps with it
        from lockstep import Lockstep
        vc = job.model_config.vision_config
        lock = Lockstep(job.tp, job.settings, (vc.num_channels, vc.image_size, vc.image_size))
        if not lock.leader:
            lock.follow(job.engine)
            return 0
    name = args.served_model_name or os.path.splitext(os.path.basename(os.path.normpath(job.checkpoint.path)))[0]
    serve(job, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue, model_name=name,
          lockstep=lock, prefill_chunk=chunk, options=options)
    return 0


def _tp_requested(args):
    return bool(getattr(args, "use_parallel", False))
