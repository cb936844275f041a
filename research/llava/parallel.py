"""Tensor parallelism as explicit weight splits plus collectives (gpt-fast's tp.py, in MindSpore).

MindSpore's semi-auto parallel (`shard` strategies) does not compile on CPU ("Invalid backend: CPU"), so the
LLaMA decoder is split by hand, Megatron-style, and the same code runs on Ascend:

* attention: q/k/v column-split (each rank owns num_heads / N query heads and n_kv_heads / N KV heads, and
  their KV cache), o_proj row-split, then one all-reduce;
* MLP: gate/up column-split, down row-split, then one all-reduce;
* embed_tokens: vocabulary-split rows; a rank looks up the ids in its range, zeros the rest, all-reduce;
* lm_head: vocabulary-split rows; the logits of all ranks are all-gathered, so every rank sees the full
  vocabulary and picks the same token;
* the CLIP vision tower and the projector are replicated: they are ~0.3B of 7B parameters and run once per
  request, so splitting them would add two collectives per vision layer for little memory saved.

Which parameter is split how is `weight_map.split_rule` (one table); this file holds the rank/world pair and
the collective cells.
"""
import mindspore as ms
from mindspore import nn, ops

from llava_errors import LlavaError


class TensorParallel:
    """This process's place in the tensor-parallel group (rank 0 of 1 when not parallel)."""

    def __init__(self, rank=0, world=1):
        if not 0 <= rank < world:
            raise LlavaError(f"rank {rank} is outside a tensor-parallel group of {world}")
        self.rank, self.world = rank, world

    @property
    def enabled(self):
        return self.world > 1

    def shape(self, name, config):
        """This rank's shape of weight `name` (a checkpoint name or a template with "{i}" for the layer): the
        cells size their layers with it, so the split rules live in weight_map's table only."""
        import weight_map
        return weight_map.local_shape(name, config, self.world)

    @classmethod
    def from_communication(cls):
        """Rank and group size from mindspore.communication (initialised by build_context under msrun)."""
        from mindspore.communication import get_group_size, get_rank
        return cls(get_rank(), get_group_size())

    def __repr__(self):
        return f"TensorParallel(rank={self.rank}, world={self.world})"


class AllReduceSum(nn.Cell):
    """Sum of the partial results of all ranks (identity when not parallel)."""

    def __init__(self, tp):
        super().__init__()
        self.enabled = tp.enabled
        if self.enabled:
            self.reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x):
        if self.enabled:
            return self.reduce(x)
        return x


class GatherLastDim(nn.Cell):
    """[rows, cols / N] on every rank -> [rows, cols] (rank order) on every rank."""

    def __init__(self, tp):
        super().__init__()
        self.world = tp.world
        if self.world > 1:
            self.gather = ops.AllGather()

    def construct(self, x, rows, part):
        if self.world == 1:
            return x
        g = self.gather(x)                                               # world * rows, part
        g = ops.transpose(ops.reshape(g, (self.world, rows, part)), (1, 0, 2))
        return ops.reshape(g, (rows, self.world * part))


def vocab_range(tp, local_rows):
    """[start, end) of the vocabulary rows this rank owns when it holds `local_rows` of them."""
    return tp.rank * local_rows, (tp.rank + 1) * local_rows


def mask_to_range(ids, start, end):
    """Local row ids for the ids in [start, end) and a 0/1 float mask of which ids are in range."""
    valid = ops.logical_and(ids >= start, ids < end)
    local = ops.select(valid, ids - start, ops.zeros_like(ids))
    return local, ops.cast(valid, ms.float32)
