"""`--run_mode serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one loaded model.

    POST /v1/chat/completions   OpenAI's chat-completions schema: messages (system / user / assistant; content
                                a string or text / image_url parts, images by http(s) or data: URL), max_tokens
                                or max_completion_tokens, temperature, top_p, seed, stop, stream, n=1; extra
                                fields top_k and repetition_penalty
    GET  /v1/models             the one model served
    GET  /health                liveness and queue length
    GET  /                      the chat page (research/llava/web/, its files under /static/)
    GET  /limits                the image and body byte limits, for the page to check before sending

Conversations are rendered with llava-hf's chat template (LlavaProcessor.encode_chat). Requests are batched by
serving.Scheduler. Errors are OpenAI's error object with the right status: 400 for a bad request (the message
names the field), 413 for a body or an image over its limit, 429 when the queue is full, 500 for a failure
while generating; never a traceback.

Images are fetched in a worker thread per request, never on the event loop or the model's thread, so one slow
download stalls nobody else. Only URLs are read (http(s) and data:): a client cannot make the server open
its local files. Fetching an http(s) URL makes the server a client of that address: serve on a trusted
network, or put a proxy in front that allows data: URLs only.
"""
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid

import numpy as np

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from generation import GenerationSettings
from image_loading import display_name, load_image
from llava_errors import LimitError, LlavaError
from serving import PREFILL_CHUNK, QueueFull, Request as GenerationRequest

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")   # the chat page, shipped with the package


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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


class ChatRequest:
    """A validated /v1/chat/completions body: the conversation (image URLs pulled out, in prompt order), the
    generation settings and the stop strings."""

    def __init__(self, body, defaults: GenerationSettings):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {self.stream!r}", "stream")
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        n = _number(body, "n", int, 1, 1)
        if n not in (None, 1):
            raise ApiError(400, "'n' must be 1", "n")
        self.messages, self.image_urls = self._messages(body.get("messages"))
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


class Server:
    """The FastAPI app around a processor, a scheduler and the job's default settings."""

    def __init__(self, processor, scheduler, defaults, model_name, max_body_bytes, on_ready=None):
        self.on_ready = on_ready
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
            return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status)

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
            return {"status": "ok", "waiting": s.waiting, "running": s.running, "steps": s.steps,
                    "largest_batch": s.largest_batch, "completed": s.completed, "cancelled": s.cancelled,
                    **s.engine.cache_stats()}

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
        return app

    async def _body(self, request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes, more than the limit of {self.max_body_bytes}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise ApiError(413, f"the request body is more than the limit of {self.max_body_bytes} bytes")
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def _pixels(self, urls):
        """Fetch and preprocess the images (runs in a worker thread)."""
        p = self.processor
        pixels = []
        for where, url in urls:
            try:   # preprocessing too: an intermediate image over max_pixels is the request's fault
                image = load_image(url, timeout=p.timeout, max_bytes=p.max_bytes, max_pixels=p.max_pixels,
                                   allow_paths=False)
                pixels.append(p.pixels([image], names=[display_name(url)]))
            except LimitError as e:
                raise ApiError(413, str(e), f"{where}.image_url.url") from None
            except LlavaError as e:
                raise ApiError(400, str(e), f"{where}.image_url.url") from None
        return np.concatenate(pixels) if pixels else None

    async def chat_completions(self, request):
        chat = ChatRequest(await self._body(request), self.defaults)
        try:
            ids = self.processor.encode_chat(chat.messages)
        except LlavaError as e:
            raise ApiError(400, str(e), "messages") from None
        if not chat.max_tokens_given:   # the default answer length, as far as the context allows
            room = self.scheduler.seq_length - len(ids)
            chat.settings.max_new_tokens = max(1, min(chat.settings.max_new_tokens, room))
        try:
            self.scheduler.check(len(ids), chat.settings)
        except LlavaError as e:
            raise ApiError(400, str(e), "max_tokens" if chat.max_tokens_given else "messages") from None
        pixels = await run_in_threadpool(self._pixels, chat.image_urls)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        job = GenerationRequest(ids=ids, pixel_values=pixels, settings=chat.settings, stop=chat.stop,
                                emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except LlavaError as e:
            raise ApiError(400, str(e)) from None
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(self._sse(job, events, reply_id, created, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text = []
            while True:
                event = await events.get()
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                else:
                    _, reason, prompt_tokens, completion_tokens, cached = event
                    break
        finally:
            job.cancel()       # a client that went away frees its row; a finished one is not affected
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": reason}],
                "usage": _usage(prompt_tokens, completion_tokens, cached)}

    async def _sse(self, job, events, reply_id, created, include_usage):
        def chunk(delta, reason=None, usage=None):
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": reason}]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                elif event[0] == "error":
                    yield f"data: {json.dumps(error_body(event[1], 'server_error'))}\n\n"
                    break
                else:
                    _, reason, prompt_tokens, completion_tokens, cached = event
                    yield chunk({}, reason)
                    if include_usage:
                        yield chunk(None, usage=_usage(prompt_tokens, completion_tokens, cached))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()       # runs when the client disconnects mid-stream, too


def _usage(prompt_tokens, completion_tokens, cached_tokens):
    """OpenAI's usage object; cached_tokens: prompt tokens taken from the prefix cache, not computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def serve(job, host="127.0.0.1", port=8000, max_batch=8, max_queue=64, model_name="llava", lockstep=None,
          prefill_chunk=PREFILL_CHUNK):
    """Serve the loaded job (its engine's KV pool reserved and warm) until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn
    from serving import Scheduler
    scheduler = Scheduler(job.engine, job.tokenizer, max_batch=max_batch, max_queue=max_queue, lockstep=lockstep,
                          prefill_chunk=prefill_chunk)
    processor = job.processor

    def ready():
        print(f"serving '{model_name}' on http://{host}:{port} (OpenAI API: /v1/chat/completions; Ctrl-C stops)",
              file=sys.stderr, flush=True)

    # a request body holds at most about one image of processor.max_bytes as base64, plus the conversation
    server = Server(processor, scheduler, job.settings, model_name,
                    max_body_bytes=(processor.max_bytes * 4) // 3 + (1 << 20), on_ready=ready)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.close()


def prepare_engine(job, max_batch, prefill_chunk):
    """The server's KV pool, once: max_batch rows of seq_length positions, or the blocks that fit the memory
    there is (the estimate before loading, memory_budget.check(shrink_kv=True)); then every step shape the
    scheduler can plan is compiled, so no request waits for a compile. Says what it took on stderr."""
    import time as clock
    import memory_budget
    engine = job.engine
    blocks = None
    wanted = memory_budget.kv_cache_bytes(job.model_config, max_batch, job.tp.world) + \
        engine.cache_blocks * engine.pool_bytes(1)
    if job.memory.kv_cache < wanted:
        blocks = 1 + max(engine.max_blocks, job.memory.kv_cache // engine.pool_bytes(1))
    engine.reserve(max_batch, blocks)
    pool = engine.pool
    rows = pool.usable * pool.block_size / job.model_config.seq_length
    if blocks is not None:
        note = f" (all the memory there is: {rows:.1f} full-length rows, not {max_batch}"
        note += ", no room kept for cached prefixes beyond idle rows')" if engine.cache_blocks else ")"
    elif engine.cache_blocks:
        note = f" ({engine.cache_blocks} blocks of them for cached prefixes)"
    else:
        note = ""
    print(f"KV pool: {pool.usable} blocks of {pool.block_size} positions = "
          f"{engine.pool_bytes(pool.blocks) / 2 ** 30:.2f} GiB{note}, up to {max_batch} rows at once; "
          f"prefix cache {'on' if pool.cache else 'off'}, image cache "
          f"{engine.image_cache.budget / 2 ** 20:.0f} MiB", file=sys.stderr, flush=True)
    start = clock.monotonic()
    engine.warmup(prefill_chunk + max_batch)
    print(f"compiled the step shapes in {clock.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def run(args, root):
    """`run_mindformer.py --run_mode serve`: load once, then serve."""
    from llava_predict import Job
    chunk = args.prefill_chunk or PREFILL_CHUNK
    if args.max_batch < 1 or args.max_queue < 1 or chunk < 1:      # before anything loads
        raise LlavaError(f"serve: --max_batch, --max_queue and --prefill_chunk must be >= 1, got "
                         f"{args.max_batch}, {args.max_queue}, {chunk}")
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
          lockstep=lock, prefill_chunk=chunk)
    return 0


def _tp_requested(args):
    return bool(getattr(args, "use_parallel", False))
