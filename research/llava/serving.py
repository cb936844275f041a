"""Continuous batching of many clients' requests onto one engine: the scheduler behind `--run_mode serve`.

A request is a prompt already turned into ids (`<image>` expanded), its images' pixel values, its generation
settings and stop strings. Requests wait in a bounded queue (FCFS). One worker thread owns the engine and
loops, one engine step per turn:

1. rows that ended at the last step boundary leave (eos or max_tokens: the engine's stop rule; a stop
   string; a client gone): their blocks are free at once;
2. waiting requests join while the engine has a free row and blocks for their prompt + max_tokens
   (`Engine.fits`; a request that could never fit was refused by `check` before it waited);
3. the plan (`plan`, the one place for the step budget): one token of every decoding row, then prompt chunks
   of joining rows in arrival order up to `prefill_chunk` tokens in all, so a long prompt never freezes the
   other streams for its whole prefill; the chunk and the decode tokens go through one forward pass
   (the weights are read once for both);
4. `Engine.step(plan)`; each picked token's text goes to its request.

The scheduler only plans and hands out text: rows, blocks, token selection and the stop rule are the
engine's. Under tensor parallelism rank 0 plans and the other ranks run the same plan (lockstep.Lockstep).

Events a request receives, in order, through its `emit` callback (called on the worker thread):
  ("delta", text)                          new text of the answer; with Request.top_logprobs set:
  ("delta", text, entries)                 entries: generation.token_logprobs(...) of the tokens behind it
  ("done", finish_reason, prompt_tokens, completion_tokens, cached_tokens)   finish_reason: "stop" or "length"
                                           cached_tokens: prompt tokens taken from the prefix cache
  ("error", message)                       its row failed; the request is over
"""
import itertools
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from generation import GenerationSettings, TextDeltas
from llava_errors import LlavaError

# Prompt tokens a step takes at most (beside one token of every decoding row): large enough that a prompt's
# prefill runs near full speed (a 256-row matmul is compute-bound), small enough that a decoding row waits
# at most one such chunk between two of its tokens.
PREFILL_CHUNK = 256


class QueueFull(LlavaError):
    """More requests are waiting than the queue holds."""


@dataclass
class Request:
    ids: List[int]
    pixel_values: Optional[np.ndarray]        # [n, 3, S, S] for the n images of the prompt, or None
    settings: GenerationSettings
    emit: Callable
    stop: List[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    top_logprobs: Optional[int] = None        # None: no log-probabilities; k: each token's and its top k

    def cancel(self):
        self.cancelled.set()


class _Active:
    """A request with its row in the engine."""

    def __init__(self, request, row, tokenizer):
        self.request, self.row = request, row
        self.text = TextDeltas(tokenizer, request.stop)
        self.eos = set(request.settings.eos_token_id)
        self.reason = None
        self.logprobs = []               # the tokens' log-probabilities not yet sent with a delta

    def delta(self, text):
        """The "delta" event for `text`: with the log-probabilities of the tokens behind it when asked."""
        if self.request.top_logprobs is None:
            return ("delta", text)
        entries, self.logprobs = self.logprobs, []
        return ("delta", text, entries)


def plan(active_rows, prefill_chunk):
    """The step plan [(row, n)]: 1 token for every decoding row (not finished), then prompt chunks of
    prefilling rows in the given (arrival) order until prefill_chunk prompt tokens are planned."""
    steps = [(r, 1) for r in active_rows if not r.prefilling and not r.finished]
    budget = prefill_chunk
    for r in active_rows:
        if r.prefilling and budget > 0:
            n = min(r.pending, budget)
            steps.append((r, n))
            budget -= n
    return steps


class Scheduler:
    def __init__(self, engine, tokenizer, max_batch=8, max_queue=64, lockstep=None, prefill_chunk=PREFILL_CHUNK):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise LlavaError(f"serve: max_batch, max_queue and prefill_chunk must be >= 1, got {max_batch}, "
                             f"{max_queue}, {prefill_chunk}")
        if engine.pool is None or engine.lanes < max_batch:
            engine.reserve(max_batch)
        self.engine = engine
        self.tokenizer = tokenizer
        self.seq_length = engine.config.seq_length
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.lockstep = lockstep         # under tensor parallelism: the other ranks follow each step
        self.max_queue = max_queue
        self._queue = queue.Queue()
        self._waiting = deque()          # taken from the queue, not yet admitted (FCFS)
        # Requests submitted and not yet admitted, wherever they are (queue or waiting line): the one
        # count the queue bound applies to, so moving a request between the two does not free a place.
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._active = []
        self._released = []              # lanes released since the last step (lockstep)
        self._stopping = False
        self.steps = 0                   # for /health
        self.largest_batch = 0
        self.cancelled = 0
        self.completed = 0
        self._thread = threading.Thread(target=self._run, name="llava-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ clients
    def check(self, n_ids, settings):
        """LlavaError unless a prompt of n_ids tokens and its answer fit the context and the KV pool."""
        if n_ids + settings.max_new_tokens > self.seq_length:
            raise LlavaError(f"the prompt is {n_ids} tokens; + max_tokens={settings.max_new_tokens} = "
                             f"{n_ids + settings.max_new_tokens} > the model's context of {self.seq_length} tokens")
        self.engine.check_request(n_ids, settings)

    def submit(self, request):
        self.check(len(request.ids), request.settings)
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests are waiting; retry later")
            self._pending += 1
        self._queue.put(request)

    def _left_waiting(self):
        with self._pending_lock:
            self._pending -= 1

    @property
    def waiting(self):
        return self._pending

    @property
    def running(self):
        return len(self._active)

    def close(self):
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _pull(self, block):
        """Move queued requests to the waiting line; block (up to a second with followers waiting in a
        collective, so they hear there is no work) when nothing is running or waiting."""
        try:
            while True:
                wait = block and not self._waiting and not self._active
                timeout = 1.0 if wait and self.lockstep else None
                request = self._queue.get(block=wait, timeout=timeout)
                if request is None:
                    return
                self._waiting.append(request)
                block = False
        except queue.Empty:
            return

    def _admit(self):
        """Waiting requests join, in order, while the engine has room for the next one."""
        joined = []
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                self._left_waiting()
                continue
            if not self.engine.fits(len(request.ids), request.settings):
                break
            self._waiting.popleft()
            self._left_waiting()
            try:
                if self.lockstep is not None:
                    request.settings = self.lockstep.settings_for(request.settings)
                row = self.engine.add(request.ids, request.pixel_values, request.settings,
                                      top_logprobs=request.top_logprobs)
            except LlavaError as e:
                request.emit(("error", str(e)))
                continue
            self._active.append(_Active(request, row, self.tokenizer))
            joined.append((request, row))
        return joined

    def _run(self):
        from lockstep import QUIT
        while not self._stopping:
            self._pull(block=True)
            if self._stopping:
                break
            if self.lockstep is not None and not self._active and not self._waiting:
                self.lockstep.send_idle()
                continue
            try:
                joined = self._admit()
                steps = plan([a.row for a in self._active], self.prefill_chunk)
                if self.lockstep is not None:
                    self.lockstep.send_step(self._released, joined, steps)
                self._released = []
                if steps:
                    self._step(steps)
            except LlavaError as e:
                self._fail(str(e))
            except Exception as e:  # noqa: BLE001  a bug must not kill the worker: report it, keep serving
                import traceback
                traceback.print_exc()
                self._fail(f"internal error ({type(e).__name__})")
        if self.lockstep is not None:
            self.lockstep.send(QUIT)

    def _fail(self, message):
        for a in self._active:
            a.request.emit(("error", message))
            self._leave(a)
        self._active = []

    def _leave(self, a):
        self.engine.release(a.row)
        self._released.append(a.row.lane)

    def _step(self, steps):
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(steps))
        by_row = {id(a.row): a for a in self._active}
        for row, token in self.engine.step(steps):
            a = by_row[id(row)]
            if token in a.eos:
                continue
            if a.request.top_logprobs is not None:
                a.logprobs.append(row.logprobs[-1])
            delta = a.text.add(token)
            if delta:
                a.request.emit(a.delta(delta))
        still = []
        for a in self._active:
            request, row = a.request, a.row
            if request.cancelled.is_set():
                self.cancelled += 1
                self._leave(a)
                continue
            if not row.finished and not a.text.stopped:
                still.append(a)
                continue
            rest = a.text.finish()
            if rest or a.logprobs:
                request.emit(a.delta(rest))
            reason = "stop" if a.text.stopped else row.finish_reason
            self.completed += 1
            request.emit(("done", reason, len(request.ids), len(row.generated), row.cached))
            self._leave(a)
        self._active = still


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



_ids = itertools.count()


def next_id(prefix="chatcmpl"):
    return f"{prefix}-{next(_ids)}"
