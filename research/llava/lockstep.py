"""Serving under tensor parallelism: the other ranks follow rank 0's steps.

Every rank holds a share of the model, so every rank must hold the same rows and run the same steps with the
same inputs. Rank 0 (which serves HTTP and plans) tells the others before each step, over the job's own
collective group (all-reduce with zeros from every rank but 0, so the sum is rank 0's data):

* a header: idle / step / quit and the counts that follow;
* the lanes of the rows that left since the last step (released in the same order on every rank, so the
  engines' free lanes and blocks stay the same);
* each joining row: its ids, its pixels, its generation settings as numbers (rank 0 runs with the values
  it sent, drawing a seed for rows without one, so that every rank's token selector picks the same tokens)
  and how many of its blocks come from the prefix cache (rank 0 decides; each rank holds its share of every
  cached block, and takes the same ones);
* the plan: (lane, tokens) per entry.

Rank 0's scheduler sends an idle header about once a second when it has no work, so the others never wait in
a collective for long, and a quit header when the server stops.
"""
import numpy as np

from generation import GenerationSettings
from llava_errors import LlavaError

IDLE, STEP, QUIT = 0, 1, 2
_INT_FIELDS = ("max_new_tokens", "do_sample", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty")


class Lockstep:
    def __init__(self, tp, defaults: GenerationSettings, image_shape):
        from parallel import AllReduceSum
        self.tp = tp
        self.defaults = defaults
        self.image_shape = tuple(image_shape)        # (channels, size, size)
        self._sum = AllReduceSum(tp)
        self._rng = np.random.default_rng()

    @property
    def leader(self):
        return self.tp.rank == 0

    def _share(self, data, shape, dtype):
        """Rank 0's array, on every rank. MindSpore's CPU AllReduce takes floating point only: integers
        (non-negative, up to 2**64) travel as four 16-bit limbs in float32, which holds them exactly."""
        import mindspore as ms
        if not self.leader or data is None:
            data = np.zeros(shape, dtype)
        data = np.ascontiguousarray(data, dtype=dtype).reshape(shape)
        if dtype == np.float32:
            return self._sum(ms.Tensor(data)).asnumpy()
        words = data.astype(np.uint64)
        limbs = np.stack([(words >> np.uint64(16 * i)) & np.uint64(0xFFFF) for i in range(4)]).astype(np.float32)
        limbs = self._sum(ms.Tensor(limbs)).asnumpy().astype(np.uint64)
        return sum(limbs[i] << np.uint64(16 * i) for i in range(4)).astype(dtype)

    # ------------------------------------------------------------------ rank 0
    def settings_for(self, s):
        """Rank 0: the settings a joining row runs with on every rank (a drawn seed when it has none)."""
        if s.seed is not None:
            return s
        return GenerationSettings(**{**s.__dict__, "seed": int(self._rng.integers(0, 2 ** 63 - 1))})

    def send(self, kind):
        self._share(np.array([kind, 0, 0, 0], np.int32), (4,), np.int32)

    def send_idle(self):
        self.send(IDLE)

    def send_step(self, released, joined, steps):
        """Rank 0, before a step: the lanes released since the last one, the joining (request, row)s, the plan."""
        self._share(np.array([STEP, len(released), len(joined), len(steps)], np.int32), (4,), np.int32)
        self._lanes(released, len(released))
        for request, row in joined:
            self._row(request.ids, request.pixel_values, request.settings, row.cached_blocks)
        self._plan([(row.lane, n) for row, n in steps], len(steps))

    # ------------------------------------------------------------------ every rank
    def _lanes(self, lanes, n):
        return self._share(None if lanes is None else np.asarray(lanes, np.int32), (n,), np.int32).tolist()

    def _plan(self, pairs, n):
        return self._share(None if pairs is None else np.asarray(pairs, np.int32).reshape(n, 2), (n, 2),
                           np.int32).tolist()

    def _row(self, ids=None, pixels=None, settings=None, prefix=0):
        head = None
        if self.leader:
            head = np.array([len(ids), 0 if pixels is None else pixels.shape[0], prefix], np.int32)
        n_ids, images, prefix = self._share(head, (3,), np.int32).tolist()
        ints = floats = None
        if self.leader:
            s = settings
            ints = np.array([s.max_new_tokens, s.do_sample, s.top_k, s.seed], np.int64)
            floats = np.array([s.temperature, s.top_p, s.repetition_penalty], np.float32)
        ids = self._share(None if ids is None else np.asarray(ids), (n_ids,), np.int32).tolist()
        pixels = self._share(pixels, (images,) + self.image_shape, np.float32) if images else None
        ints = self._share(ints, (len(_INT_FIELDS),), np.int64).tolist()
        floats = self._share(floats, (len(_FLOAT_FIELDS),), np.float32).tolist()
        values = dict(zip(_INT_FIELDS, ints), **dict(zip(_FLOAT_FIELDS, floats)))
        values["do_sample"] = bool(values["do_sample"])
        return ids, pixels, GenerationSettings(**{**self.defaults.__dict__, **values}), prefix

    def follow(self, engine):
        """Ranks > 0: hold the same rows and run rank 0's steps until it says quit."""
        rows = {}
        while True:
            kind, n_released, n_joined, n_steps = self._share(None, (4,), np.int32).tolist()
            if kind == QUIT:
                return
            if kind != STEP:
                continue
            for lane in self._lanes(None, n_released):
                engine.release(rows.pop(lane))
            for _ in range(n_joined):
                ids, pixels, settings, prefix = self._row()
                try:
                    row = engine.add(ids, pixels, settings, prefix=prefix)
                    rows[row.lane] = row
                except LlavaError:
                    pass      # rank 0 met the same error before the step and did not plan the row
            steps = self._plan(None, n_steps)
            if steps:
                engine.step([(rows[lane], n) for lane, n in steps])
