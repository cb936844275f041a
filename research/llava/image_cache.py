"""The image-feature cache: an image's vision-tower + projector output, by the content of its pixels.

A repeated image (a follow-up turn, a new question about the same photo, a batch asking several things about
one picture) skips CLIP even when the text before it differs. The key is `image_key`: a digest of the
preprocessed pixel values (what the vision tower sees), so two files that decode and resize to the same pixels
share an entry and any difference in pixels does not. The same digest names the image in the prefix cache's
block keys (kv_pool.block_keys), so a KV hit never crosses images either.

Entries are numpy arrays in host memory, least recently used evicted first, within a byte budget.
"""
import hashlib
from collections import OrderedDict

import numpy as np


def image_key(pixels):
    """The digest of one image's preprocessed pixel values [C, S, S] (as float32, with its shape)."""
    a = np.ascontiguousarray(pixels, dtype=np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(a.shape, np.int64).tobytes())
    h.update(a.tobytes())
    return h.digest()


class ImageCache:
    """LRU of image key -> features [num_image_tokens, text_hidden] within `budget` bytes (0 = off)."""

    def __init__(self, budget):
        self.budget = max(0, int(budget))
        self._entries = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self):
        return len(self._entries)

    def get(self, key):
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key, features):
        features = np.asarray(features)
        if features.nbytes > self.budget or key in self._entries:
            return
        self._entries[key] = features
        self.bytes += features.nbytes
        while self.bytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def stats(self):
        return {"image_cache_hits": self.hits, "image_cache_misses": self.misses,
                "image_cache_evictions": self.evictions, "image_cache_entries": len(self._entries),
                "image_cache_bytes": self.bytes}
