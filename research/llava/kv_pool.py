"""The KV pool's blocks: which are free, which rows hold them, and which hold a known prefix (the prefix cache).

The pool itself (one k_cache / v_cache Parameter per layer, `llama_text.cache_shape`) is allocated once by the
engine from `rows x seq_length` plus the prefix cache's budget (or a memory budget) and never reallocated
while rows are in flight; this module only owns the block numbers and their keys. Block 0 is scratch: a
step's padding tokens write their keys/values there and no row ever reads it, so a bucketed step needs no
special case for its filler tokens.

The prefix cache lives in the same blocks, with no copy (as vLLM's block manager): a block whose positions
are all computed gets a key (`block_keys`: the chain of its row's tokens up to it, image positions named by
the image's content); a new row whose first blocks have the same keys takes those blocks (a reference count)
and computes only the rest. A block no row holds any more stays in the pool with its contents, kept in a
least-recently-used line, and is handed out again (its key dropped) only when no never-used block is left.
Rows only write positions past their cached prefix, into their own blocks, so a shared block never changes.
"""
import hashlib
from collections import OrderedDict

import numpy as np

from llava_errors import LlavaError

# Positions per block: small enough that a row wastes little of its last block (and that a follow-up turn
# recomputes at most 15 tokens of what is cached), large enough that the attention kernel walks contiguous
# runs of 16 keys (8 KiB per head at head_dim 128 in float32).
BLOCK_SIZE = 16
SCRATCH = 0


def blocks_for(positions, block_size=BLOCK_SIZE):
    return -(-int(positions) // block_size)


def block_keys(tokens, images, block_size, start=0, parent=b""):
    """The keys of the full blocks of a token sequence from block `start` on (`parent`: the key of block
    start - 1). A block's key digests its parent's key, its token ids and, for every position that shows an
    image, that image's content key (image_cache.image_key) and the position's offset in the image: two
    prompts share a key exactly when their tokens and the images behind their image positions agree up to
    the block's end. Identical placeholder tokens of different images never share one.

    tokens: the row's ids (image positions hold the image token id); images: per position (image key,
    offset) or None for text, at least as long as the prompt (positions past it are text)."""
    keys = []
    tokens = np.asarray(tokens, np.int64)
    for b in range(start, len(tokens) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        lo = b * block_size
        h.update(tokens[lo:lo + block_size].tobytes())
        for p in range(lo, min(lo + block_size, len(images))):
            if images[p] is not None:
                key, offset = images[p]
                h.update(p.to_bytes(4, "little") + key + int(offset).to_bytes(4, "little"))
        parent = h.digest()
        keys.append(parent)
    return keys


class KVPool:
    """`blocks` blocks of `block_size` positions (block 0 scratch, the rest for rows and cached prefixes).
    With `cache=False` no block keeps a key: every block a row releases is plain free again."""

    def __init__(self, blocks, block_size=BLOCK_SIZE, cache=True):
        if blocks < 2:
            raise LlavaError(f"a KV pool needs at least 2 blocks (one scratch), got {blocks}")
        self.blocks = int(blocks)
        self.block_size = int(block_size)
        self.cache = bool(cache)
        self._free = list(range(self.blocks - 1, SCRATCH, -1))     # never keyed; pop() hands out low first
        self._refs = [0] * self.blocks
        self._key_of = {}                 # block -> key
        self._block_of = {}               # key -> block
        self._idle = OrderedDict()        # keyed blocks no row holds, least recently used first
        self.hits = 0                     # rows that took at least one cached block
        self.hit_tokens = 0               # positions rows took from the cache
        self.evictions = 0                # keyed blocks handed out again (their key dropped)

    @property
    def free(self):
        """Blocks a row can be given now: never used, or keyed but held by no row."""
        return len(self._free) + len(self._idle)

    @property
    def usable(self):
        return self.blocks - 1

    @property
    def cached(self):
        return len(self._key_of)

    def needed(self, positions):
        return blocks_for(positions, self.block_size)

    def allocate(self, n):
        if n > self.free:
            raise LlavaError(f"the KV pool has {self.free} free blocks, {n} needed")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks):
        """A row lets its blocks go, last first: its keyed blocks stay cached (the last ones are handed out
        again first, so a later eviction leaves the start of the chain), the others are free."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._key_of:
                self._idle[b] = None          # most recently used; this row's last block nearest eviction
            else:
                self._free.append(b)

    def lookup(self, keys):
        """The cached blocks of the longest prefix of `keys` (they are not taken: see `take`)."""
        out = []
        for key in keys if self.cache else ():
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, blocks):
        """A row holds these cached blocks too (from lookup): most recently used now."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
        if blocks:
            self.hits += 1
            self.hit_tokens += len(blocks) * self.block_size

    def register(self, block, key):
        """A block a row holds is full and computed: it keeps `key` (unless another block already holds that
        prefix: the first one stays the cached copy)."""
        if not self.cache or key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def stats(self):
        return {"prefix_hits": self.hits, "prefix_cached_tokens": self.hit_tokens,
                "prefix_evictions": self.evictions, "prefix_cached_blocks": self.cached,
                "kv_blocks_free": self.free, "kv_blocks": self.usable}
