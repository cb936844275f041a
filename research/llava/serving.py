"""Batching many clients' requests onto one engine: the scheduler behind `--run_mode serve`.

A request is a prompt already turned into ids (`<image>` expanded), its images' pixel values, its generation
settings and stop strings. Requests wait in a bounded queue; one worker thread owns the engine and runs them
in batches: it takes the oldest waiting request and every other one that fits beside it (up to `max_batch`
rows, and the left-padded batch plus the longest answer must fit `seq_length`), runs `Engine.stream` with one
settings per row, and hands each row's text to its request as it grows. A request that is cancelled (its
client went away) or hits a stop string stops its row at the next step; the batch ends when every row has.

Events a request receives, in order, through its `emit` callback (called on the worker thread):
  ("delta", text)                          new text of the answer
  ("done", finish_reason, prompt_tokens, completion_tokens)   finish_reason: "stop" or "length"
  ("error", message)                       the batch failed; the request is over
"""
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from generation import GenerationSettings, TextDeltas
from llava_errors import LlavaError


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

    def cancel(self):
        self.cancelled.set()


def batch_rows(n, max_batch):
    """Rows a batch of n requests runs with: n rounded up to a power of two (at most max_batch). Every new
    batch size compiles its own prefill and decode graphs (seconds each); filler rows (one token, a one-step
    answer, never shown) cost less than compiling for 3, 5, 6 and 7 rows as well."""
    rows = 1
    while rows < n:
        rows *= 2
    return max(n, min(rows, max_batch))


def pooled_rows(max_batch):
    """KV-cache rows a server holds at most: the engine keeps one cache per batch size it has run, and
    batches run with batch_rows(n) rows for n = 1..max_batch."""
    return sum({batch_rows(n, max_batch) for n in range(1, max_batch + 1)})


class Scheduler:
    def __init__(self, engine, tokenizer, max_batch=8, max_queue=64, lockstep=None):
        if max_batch < 1 or max_queue < 1:
            raise LlavaError(f"serve: max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.seq_length = engine.config.seq_length
        self.pad_token_id = engine.config.text_config.pad_token_id
        self.max_batch = max_batch
        self.lockstep = lockstep         # under tensor parallelism: the other ranks follow each batch
        self._queue = queue.Queue(maxsize=max_queue)
        self._held = None                # a request taken from the queue that did not fit the last batch
        self._stopping = False
        self.batches = 0                 # for /health: batches run, the largest one, rows whose client left
        self.largest_batch = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="llava-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ clients
    def check(self, n_ids, settings):
        """LlavaError unless a prompt of n_ids tokens and its answer fit seq_length on their own."""
        if n_ids + settings.max_new_tokens > self.seq_length:
            raise LlavaError(f"the prompt is {n_ids} tokens; + max_tokens={settings.max_new_tokens} = "
                             f"{n_ids + settings.max_new_tokens} > the model's context of {self.seq_length} tokens")

    def submit(self, request):
        self.check(len(request.ids), request.settings)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self._queue.maxsize} requests are waiting; retry later") from None

    @property
    def waiting(self):
        return self._queue.qsize() + (self._held is not None)

    def close(self):
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _take(self, block):
        if self._held is not None:
            request, self._held = self._held, None
            return request
        try:
            # with followers waiting in a collective, wake up every second to tell them there is no work
            return self._queue.get(block=block, timeout=1.0 if block and self.lockstep else None)
        except queue.Empty:
            return None

    def _next_batch(self):
        first = self._take(block=True)
        if first is None:
            return []
        batch = [first]
        while len(batch) < self.max_batch:
            request = self._take(block=False)
            if request is None:
                break
            width = max(len(r.ids) for r in batch + [request])
            longest = max(r.settings.max_new_tokens for r in batch + [request])
            if width + longest > self.seq_length:
                self._held = request         # first in line for the next batch
                break
            batch.append(request)
        return [r for r in batch if not r.cancelled.is_set()]

    def _run(self):
        from lockstep import IDLE, QUIT
        while not self._stopping:
            batch = self._next_batch()
            if not batch:
                if self.lockstep is not None and not self._stopping:
                    self.lockstep.send(IDLE)
                continue
            try:
                self._generate(batch)
            except LlavaError as e:
                for r in batch:
                    r.emit(("error", str(e)))
            except Exception as e:  # noqa: BLE001  a bug must not kill the worker: report it, keep serving
                import traceback
                traceback.print_exc()
                for r in batch:
                    r.emit(("error", f"internal error ({type(e).__name__})"))
        if self.lockstep is not None:
            self.lockstep.send(QUIT)

    def _rows(self, n):
        return batch_rows(n, self.max_batch)

    def _generate(self, batch):
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        width = max(len(r.ids) for r in batch)
        rows = self._rows(len(batch))
        ids = np.full((rows, width), self.pad_token_id, np.int64)
        mask = np.zeros((rows, width), np.int64)
        for i, r in enumerate(batch):
            ids[i, width - len(r.ids):] = r.ids
            mask[i, width - len(r.ids):] = 1
        ids[len(batch):, -1] = batch[0].ids[-1]
        mask[len(batch):, -1] = 1
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        pixels = np.concatenate(pixels) if pixels else None
        filler = GenerationSettings(**{**batch[0].settings.__dict__, "max_new_tokens": 1, "do_sample": False})
        settings = [r.settings for r in batch] + [filler] * (rows - len(batch))
        if self.lockstep is not None:
            from lockstep import BATCH
            settings = self.lockstep.send(BATCH, ids, mask, pixels, settings)
        texts = [TextDeltas(self.tokenizer, r.stop) for r in batch]
        counts = [0] * len(batch)
        eos = [set(s.eos_token_id) for s in settings]
        ended = [None] * len(batch)           # finish reason once a row is over

        def stop(running):
            ended_now = np.zeros(rows, dtype=bool)
            for row in np.nonzero(running[:len(batch)])[0]:
                if batch[row].cancelled.is_set():
                    self.cancelled += 1
                if batch[row].cancelled.is_set() or texts[row].stopped:
                    ended[row] = ended[row] or "stop"
                    ended_now[row] = True
            return ended_now if self.lockstep is None else self.lockstep.stop(ended_now)

        for tokens, real in self.engine.stream(ids, pixels, mask, settings, stop=stop):
            for row in np.nonzero(real[:len(batch)])[0]:
                token = int(tokens[row])
                counts[row] += 1
                if token in eos[row]:
                    ended[row] = "stop"
                    continue
                delta = texts[row].add(token)
                if delta:
                    batch[row].emit(("delta", delta))
        for row, r in enumerate(batch):
            if r.cancelled.is_set():
                continue
            rest = texts[row].finish()
            if rest:
                r.emit(("delta", rest))
            reason = ended[row] or ("stop" if texts[row].stopped else "length")
            r.emit(("done", reason, len(r.ids), counts[row]))


_ids = itertools.count()


def next_id(prefix="chatcmpl"):
    return f"{prefix}-{next(_ids)}"
