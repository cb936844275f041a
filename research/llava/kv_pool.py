"""The KV pool's block accounting: which blocks are free, and how many a row needs.

The pool itself (one k_cache / v_cache Parameter per layer, `llama_text.cache_shape`) is allocated once by the
engine from `rows x seq_length` (or a memory budget) and never reallocated while rows are in flight; this
module only owns the block numbers. Block 0 is scratch: a step's padding tokens write their keys/values there
and no row ever reads it, so a bucketed step needs no special case for its filler tokens.
"""
from llava_errors import LlavaError

# Positions per block: small enough that a row wastes little of its last block (and, for a prefix cache,
# that a follow-up turn recomputes at most 15 tokens), large enough that the attention kernel walks
# contiguous runs of 16 keys (8 KiB per head at head_dim 128 in float32).
BLOCK_SIZE = 16
SCRATCH = 0


def blocks_for(positions, block_size=BLOCK_SIZE):
    return -(-int(positions) // block_size)


class KVPool:
    """`blocks` blocks of `block_size` positions (block 0 scratch, the rest for rows)."""

    def __init__(self, blocks, block_size=BLOCK_SIZE):
        if blocks < 2:
            raise LlavaError(f"a KV pool needs at least 2 blocks (one scratch), got {blocks}")
        self.blocks = int(blocks)
        self.block_size = int(block_size)
        self._free = list(range(self.blocks - 1, SCRATCH, -1))     # pop() hands out low numbers first

    @property
    def free(self):
        return len(self._free)

    @property
    def usable(self):
        return self.blocks - 1

    def needed(self, positions):
        return blocks_for(positions, self.block_size)

    def allocate(self, n):
        if n > len(self._free):
            raise LlavaError(f"the KV pool has {len(self._free)} free blocks, {n} needed")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks):
        self._free.extend(reversed(blocks))
