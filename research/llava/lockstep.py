"""Serving under tensor parallelism: the other ranks follow rank 0's batches step by step.

Every rank holds a share of the model, so every rank must run the same `Engine.stream` calls with the same
inputs and end the same rows at the same steps. Rank 0 (which serves HTTP) tells the others, over the job's
own collective group (all-reduce with zeros from every rank but 0, so the sum is rank 0's data):

* before each batch: a header (idle / batch / quit, sizes), the ids and masks, the pixels, and every row's
  generation settings. Settings travel as numbers and rank 0 runs with the values it sent, so that every
  rank's token selector (and its seeded random generator: rank 0 draws a seed for rows without one) is the same;
* after each step: which rows end now (stop strings and clients that went away are only known to rank 0).

Rank 0's scheduler sends an idle header about once a second when it has no work, so the others never wait in
a collective for long, and a quit header when the server stops.
"""
import numpy as np

from generation import GenerationSettings
from llava_errors import LlavaError

IDLE, BATCH, QUIT = 0, 1, 2
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
    def send(self, kind, ids=None, mask=None, pixels=None, settings=None):
        """Rank 0: announce a batch (or idle / quit). Returns the settings as every rank will use them."""
        rows, width = (0, 0) if ids is None else ids.shape
        images = 0 if pixels is None else pixels.shape[0]
        self._share(np.array([kind, rows, width, images], np.int32), (4,), np.int32)
        if kind != BATCH:
            return None
        return self._payload(ids, mask, pixels, settings, rows, width, images)[3]

    def stop(self, ended):
        """Rank 0: which rows end after this step (the same mask on every rank)."""
        return self._share(np.asarray(ended, np.int32), (len(ended),), np.int32).astype(bool)

    # ------------------------------------------------------------------ every rank
    def _payload(self, ids, mask, pixels, settings, rows, width, images):
        ints = floats = None
        if self.leader:
            ints = np.array([[s.max_new_tokens, s.do_sample, s.top_k,
                              int(self._rng.integers(0, 2 ** 63 - 1)) if s.seed is None else s.seed]
                             for s in settings], np.int64)
            floats = np.array([[s.temperature, s.top_p, s.repetition_penalty] for s in settings], np.float32)
        ids = self._share(ids, (rows, width), np.int32)
        mask = self._share(mask, (rows, width), np.int32)
        pixels = self._share(pixels, (images,) + self.image_shape, np.float32) if images else None
        ints = self._share(ints, (rows, len(_INT_FIELDS)), np.int64)
        floats = self._share(floats, (rows, len(_FLOAT_FIELDS)), np.float32)
        settings = []
        for i, f in zip(ints.tolist(), floats.tolist()):
            values = dict(zip(_INT_FIELDS, i), **dict(zip(_FLOAT_FIELDS, f)))
            values["do_sample"] = bool(values["do_sample"])
            settings.append(GenerationSettings(**{**self.defaults.__dict__, **values}))
        return ids, mask, pixels, settings

    def follow(self, engine):
        """Ranks > 0: run rank 0's batches until it says quit."""
        while True:
            kind, rows, width, images = self._share(None, (4,), np.int32).tolist()
            if kind == QUIT:
                return
            if kind != BATCH:
                continue
            ids, mask, pixels, settings = self._payload(None, None, None, None, rows, width, images)
            try:
                for _ in engine.stream(ids, pixels, mask, settings,
                                       stop=lambda running: self._share(None, (rows,), np.int32).astype(bool)):
                    pass
            except LlavaError:
                pass       # rank 0 meets the same error before any collective of the batch and reports it

