"""The memory a run needs, estimated from the model config before anything is allocated, against what the
machine has: absurd yaml sizes (`seq_length: 1000000000`, `batch_size: 1000000`) are refused with the figures
instead of a MemoryError after the weights have loaded.

The estimate for one process (one rank under tensor parallelism):

* weights: every parameter of `weight_map.expected_params` (this rank's share of the split ones) in
  `param_init_type` bytes, except the linear layers that `model_config.weight_dtype` stores in low precision
  (LOWBIT_WEIGHT: int8 with a float32 scale per output row, int4 with a float16 scale per 32 inputs and lm_head
  int8 (weights/quantize.py), or float16 / bfloat16);
* KV pool: num_layers * 2 (keys, values) * rows * (n_kv_heads / world) * seq_length * head_dim *
  `compute_dtype` bytes for rows = the run's batch (the server's max_batch), at least the yaml's `batch_size`:
  the engine holds one pool for all rows. A server may take a smaller pool when that is what fits
  (`check(..., shrink_kv=True)`: its rows then share fewer positions, and it says so);
* activations (an allowance, float32): a prompt step's hidden states, batch * seq_length * (2 * hidden_size +
  2 * intermediate_size / world) values, plus one block of attention scores, batch * num_heads / world *
  min(QUERY_BLOCK, seq_length) * seq_length values, plus the logits, batch * vocab_size values;
* RUNTIME_BYTES for MindSpore, MindFormers and Python themselves.

On CPU the weights and the cache live in host memory: the need is compared with MemAvailable (psutil) and,
in a container, the cgroup's limit minus its usage, whichever is smaller. On Ascend/GPU they live in device
memory, which is compared only when the yaml's `context.max_device_memory` (e.g. "58GB") says how much.
"""
import re
from dataclasses import dataclass

from llava_errors import LlavaError

GIB = 1024 ** 3
RUNTIME_BYTES = 1 * GIB
QUERY_BLOCK = 128            # llama_text's prompt query block (tokens)
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# The weights llava_layers.linear() builds (the decoder's and the vision tower's linear layers and lm_head; not
# the embeddings, the patch convolution, the norms or the projector). tests/test_lowbit.py checks this against
# a model built with each weight_dtype.
LOWBIT_WEIGHT = re.compile(r"(\.layers\.\d+\.(self_attn\.(q|k|v|o|out)_proj|mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))"
                           r"|^language_model\.lm_head)\.weight$")
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),                 # cgroup v2
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


@dataclass
class Estimate:
    weights: int
    kv_cache: int
    activations: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self):
        return self.weights + self.kv_cache + self.activations + self.runtime


def gib(n):
    return f"{n / GIB:.1f} GiB"


def weight_bytes(config, world=1):
    """Bytes of this rank's weights: split parameters (column/row/vocab) hold 1/world of their elements."""
    import weight_map
    total = 0
    lowbit = getattr(config, "weight_dtype", "float32")
    for name, (shape, split) in weight_map.expected_params(config).items():
        n = 1
        for d in shape:
            n *= d
        n = n // world if split != "replicated" else n
        if lowbit != "float32" and LOWBIT_WEIGHT.search(name):
            from weights.quantize import FORMATS, layer_dtype, stored_bytes
            stored = layer_dtype(lowbit, head=name.endswith("lm_head.weight"))
            rows = shape[0] // world if split in ("column", "vocab") else shape[0]
            if stored in FORMATS:
                total += stored_bytes(stored, rows, n // rows)
            else:
                total += n * DTYPE_BYTES[stored]
        else:
            total += n * DTYPE_BYTES[config.param_init_type]
    return total


def kv_cache_bytes(config, batch, world=1):
    """layers * 2 * batch * kv_heads_per_rank * seq_length * head_dim * compute_dtype bytes."""
    tc = config.text_config
    return (tc.num_layers * 2 * batch * (tc.n_kv_heads // world) * config.seq_length * tc.head_dim
            * DTYPE_BYTES[config.compute_dtype])


def activation_bytes(config, batch, world=1):
    tc = config.text_config
    seq = config.seq_length
    hidden = batch * seq * (2 * tc.hidden_size + 2 * tc.intermediate_size // world)
    scores = batch * (tc.num_heads // world) * min(QUERY_BLOCK, seq) * seq
    logits = batch * tc.vocab_size
    return (hidden + scores + logits) * FLOAT32


def estimate(config, batch=None, world=1, cache_bytes=0):
    """Estimate for `config` (a LlavaConfig) running `batch` inputs at once (default: the yaml's batch_size);
    `cache_bytes`: the KV pool's room for cached prefixes beyond the rows' (on this rank)."""
    largest = max(config.batch_size, batch or 0)
    return Estimate(weight_bytes(config, world), kv_cache_bytes(config, largest, world) + int(cache_bytes),
                    activation_bytes(config, largest, world))


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None      # cgroup v2 says "max" when there is no limit


def host_available():
    """(bytes, where) the host can still give this process: MemAvailable, or the cgroup's room if smaller."""
    import psutil
    best = (psutil.virtual_memory().available, "available (MemAvailable)")
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:    # v1's "no limit" is ~2**63
            room = max(limit - usage, 0)
            if room < best[0]:
                best = (room, f"available in this container (cgroup limit {gib(limit)})")
            break
    return best


def parse_size(text):
    """MindSpore's max_device_memory, e.g. "58GB" / "1024MB" -> bytes (GB = 2**30, as MindSpore reads it)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GM])B\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    return int(float(m.group(1)) * (GIB if m.group(2).upper() == "G" else 1024 ** 2))


def check(config, batch=None, world=1, device_target="CPU", max_device_memory=None, available=None,
          shrink_kv=False, cache_bytes=0, extra_bytes=0):
    """LlavaError when the estimate is more than the memory this run can use; returns the Estimate. With
    `shrink_kv` a KV pool smaller than `batch` full-length rows, but at least one, is taken when that is what
    fits: the returned Estimate's kv_cache is then the pool to allocate.

    `available`: (bytes, description) instead of asking the machine (tests)."""
    need = estimate(config, batch, world, cache_bytes)
    need.runtime += int(extra_bytes)          # host-side caches (the image cache's budget)
    if available is None:
        if str(device_target).upper() == "CPU":
            available = host_available()
        else:
            size = parse_size(max_device_memory) if max_device_memory is not None else None
            if size is None:
                return need           # device memory: MindSpore's to report, nothing known here
            available = (size, f"device memory (context.max_device_memory={max_device_memory})")
    have, where = available
    one_row = kv_cache_bytes(config, 1, world)
    if shrink_kv and need.total > have and need.total - need.kv_cache + one_row <= have:
        need.kv_cache = have - (need.total - need.kv_cache)
    if need.total > have:
        rank = f" per rank ({world} ranks)" if world > 1 else ""
        raise LlavaError(
            f"this run needs ~{gib(need.total)}{rank} (weights {gib(need.weights)} + KV cache {gib(need.kv_cache)} "
            f"+ activations {gib(need.activations)} + runtime {gib(need.runtime)}; model_config.seq_length="
            f"{config.seq_length}, batch_size={max(config.batch_size, batch or 0)}), {gib(have)} {where}: "
            f"lower seq_length or batch_size")
    return need
