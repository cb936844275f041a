"""llava-hf folder <-> MindSpore .ckpt, streamed one chunk at a time and written atomically.

A plan is made (and checked with `check`) before anything is written; writing goes through NAME.tmp-<pid> files
that are renamed only when everything is complete and re-read. convert_weight.py is the command line over it.
"""
import math
import os
import shutil

import checkpoint_io as io
import weight_map
from llava_errors import LlavaError
from weights.matching import check, check_scale, expected_shapes, hf_names

SHARD_BYTES = 5 * 10 ** 9     # transformers' default max_shard_size ("5GB") of save_pretrained
HF_CONFIG = "config.json"


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix_str(self, *a, **k):
        pass


def _converted(chunks, src, dst, overflows, name):
    for raw in chunks:
        data, n = io.convert_chunk(raw, src, dst)
        if n:
            overflows[name] = overflows.get(name, 0) + n
        yield data


# ---------------------------------------------------------------------------------------------- hf -> ckpt

class CkptPlan:
    """What a llava-hf folder -> .ckpt conversion writes: `rows` [(name, TensorInfo, dtype, bytes)] in file
    order, their `total` bytes, and the `skipped` buffers."""

    def __init__(self, rows, skipped):
        self.rows, self.skipped = rows, skipped
        self.total = sum(r[3] for r in rows)


def plan_ckpt(tensors, config, what, dtype=None):
    """The CkptPlan for a llava-hf folder's tensors (name -> TensorInfo) and its LlavaConfig; LlavaError
    "`what` does not match the LLaVA config: ..." unless every weight is there with its shape. `dtype`: the
    output dtype (default: each tensor's stored one)."""
    named, skipped = hf_names(tensors)
    check_scale(named, config, f"{what} does not match the LLaVA config")
    expected = expected_shapes(config)
    check(named, expected, f"{what} does not match the LLaVA config")
    rows = []
    for name in expected:
        t = named[name]
        out = dtype or io.SF_TO_DTYPE[t.dtype]
        rows.append((name, t, out, math.prod(t.shape) * io.ITEMSIZE[out]))
    rows.sort(key=lambda r: (r[1].path, r[1].offset))   # sequential reads; the order means nothing to MindSpore
    return CkptPlan(rows, skipped)


def write_ckpt(plan, output_path, progress=None):
    """Write the CkptPlan to `output_path` atomically; returns {name: values that overflowed the dtype}."""
    progress = progress or _NoProgress()
    overflows, files = {}, {}
    try:
        with io.AtomicFile(output_path) as out:
            writer = io.CkptWriter(out.f)
            for i, (name, t, dtype, nbytes) in enumerate(plan.rows, 1):
                f = files.get(t.path) or files.setdefault(t.path, open(t.path, "rb"))
                pieces = _converted(io.iter_chunks(f, t.segments, io.SF_ITEMSIZE[t.dtype]),
                                    io.SF_TO_DTYPE[t.dtype], dtype, overflows, t.name)
                writer.write_tensor(name, t.shape, dtype, nbytes, pieces, progress)
                progress.set_postfix_str(f"{i}/{len(plan.rows)} tensors", refresh=False)
            out.f.flush()
            _verify_ckpt(out.tmp, {name: (t.shape, dtype, nbytes) for name, t, dtype, nbytes in plan.rows})
            out.commit()
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or output_path}: {e.strerror or e}") from e
    finally:
        for f in files.values():
            f.close()
    return overflows


def _verify_ckpt(path, want):
    """Re-read the written checkpoint's entries (not the data) and compare them with what was meant."""
    got = io.scan_ckpt(path)
    if set(got) != set(want):
        raise LlavaError(f"internal error: {path} does not hold the expected tensors")
    for name, (shape, dtype, nbytes) in want.items():
        t = got[name]
        if t.shape != tuple(shape) or io.MS_TO_DTYPE.get(t.dtype) != dtype or t.nbytes != nbytes:
            raise LlavaError(f"internal error: {path}: {name} was not written as intended")


# ---------------------------------------------------------------------------------------------- ckpt -> hf

class HfPlan:
    """What a .ckpt -> safetensors conversion writes: `rows` {hf name: (dtype, TensorInfo, bytes)}, `shards`
    [(file name, [hf names])] and their `total` bytes."""

    def __init__(self, rows, shards):
        self.rows, self.shards = rows, shards
        self.total = sum(r[2] for r in rows.values())

    @property
    def files(self):
        """The file names written (the index too when sharded; config.json is separate)."""
        return [f for f, _ in self.shards] + ([io.SAFETENSORS_INDEX] if len(self.shards) > 1 else [])


def plan_hf(tensors, config, what, dtype=None, shard_bytes=SHARD_BYTES, file_name=None):
    """The HfPlan for a .ckpt's tensors (name -> TensorInfo) and a LlavaConfig, with the llava-hf key names:
    model.safetensors, or shards of at most `shard_bytes` when it is bigger; one file `file_name` if given."""
    check_scale(tensors, config, f"{what} does not match the LLaVA config")
    expected = expected_shapes(config)
    check(tensors, expected, f"{what} does not match the LLaVA config")
    rows = {}
    for name in expected:
        t = tensors[name]
        out = dtype or io.MS_TO_DTYPE[t.dtype]
        rows[weight_map.ms_to_hf(name)] = (out, t, math.prod(t.shape) * io.ITEMSIZE[out])
    rows = dict(sorted(rows.items()))
    if file_name:
        shards = [(file_name, list(rows))]
    else:
        shards = io.shard_files([(k, r[2]) for k, r in rows.items()], shard_bytes)
    return HfPlan(rows, shards)


def stale_files(plan, folder):
    """Weight files in `folder` that the plan's files would not replace (transformers would read them)."""
    if not os.path.isdir(folder):
        return []
    ours = set(plan.files)
    return sorted(n for n in os.listdir(folder) if n not in ours and (
        n in (io.SAFETENSORS_FILE, io.SAFETENSORS_INDEX) or (n.startswith("model-") and n.endswith(".safetensors"))))


def write_hf(plan, ckpt_path, folder, config_bytes=None, progress=None):
    """Write the HfPlan from the .ckpt `ckpt_path` into `folder` (created if missing, removed again on failure),
    with config.json when `config_bytes` is given. Every file goes through NAME.tmp-<pid>; the final names
    appear only once all are complete. Returns {name: values that overflowed the dtype}."""
    progress = progress or _NoProgress()
    created = not os.path.isdir(folder)
    overflows, pending, done = {}, [], False
    try:
        if created:
            os.mkdir(folder)

        def start(name):
            out = io.AtomicFile(os.path.join(folder, name)).__enter__()
            pending.append(out)
            return out

        done_rows = [0, len(plan.rows)]
        with open(ckpt_path, "rb") as src:
            for fname, names in plan.shards:
                _write_safetensors(start(fname), [(n,) + plan.rows[n] for n in names], src, overflows, progress,
                                   done_rows)
        if len(plan.shards) > 1:
            start(io.SAFETENSORS_INDEX).f.write(io.safetensors_index(plan.shards, plan.total))
        if config_bytes is not None:
            start(HF_CONFIG).f.write(config_bytes)
        for out in pending:
            out.commit()
        done = True
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or folder}: {e.strerror or e}") from e
    finally:
        for out in pending:
            out.__exit__(None, None, None)
        if created and not done:
            shutil.rmtree(folder, ignore_errors=True)
    return overflows


def _write_safetensors(out, rows, src, overflows, progress, done_rows):
    """One safetensors file: the header, then each tensor streamed (and cast) from the open .ckpt `src`;
    done_rows: [tensors written so far, of all files]."""
    out.f.write(io.safetensors_header([(hf, io.DTYPE_TO_SF[dt], t.shape, n) for hf, dt, t, n in rows]))
    for hf, dtype, t, nbytes in rows:
        written = 0
        src_dtype = io.MS_TO_DTYPE[t.dtype]
        for data in _converted(io.iter_chunks(src, t.segments, io.ITEMSIZE[src_dtype]), src_dtype, dtype,
                               overflows, hf):
            out.f.write(data)
            n = len(memoryview(data).cast("B"))
            written += n
            progress.update(n)
        if written != nbytes:
            raise LlavaError(f"internal error: {hf} got {written} of {nbytes} bytes")
        done_rows[0] += 1
        progress.set_postfix_str(f"{done_rows[0]}/{done_rows[1]} tensors", refresh=False)
    out.f.flush()
    got = io.read_safetensors_header(out.tmp)
    if {k: (v.dtype, v.shape) for k, v in got.items()} != \
            {hf: (io.DTYPE_TO_SF[dt], tuple(t.shape)) for hf, dt, t, _ in rows}:
        raise LlavaError(f"internal error: {out.tmp} was not written as intended")


# ---------------------------------------------------------------------------------------- hf -> pre-quantized

class QuantPlan:
    """What a llava-hf folder -> pre-quantized folder conversion writes (weights/quantize.py's format): `units`
    [(model name, TensorInfo, fmt or None, [(hf name, sf dtype, shape, bytes)])] in file order (a quantized
    weight's unit is it and its scales: they share a shard), `shards` [(file name, [model names])], `total`."""

    def __init__(self, units, shards, weight_dtype):
        self.units, self.shards, self.weight_dtype = units, shards, weight_dtype
        self.total = sum(e[3] for u in units for e in u[3])

    @property
    def files(self):
        return [f for f, _ in self.shards] + ([io.SAFETENSORS_INDEX] if len(self.shards) > 1 else [])


def plan_quantized(tensors, config, what, weight_dtype, shard_bytes=SHARD_BYTES):
    """The QuantPlan for a llava-hf folder's tensors (name -> TensorInfo) quantized for weight_dtype (int8 |
    int4); LlavaError "`what` does not match the LLaVA config: ..." unless every weight is there with its shape."""
    from weights.quantize import STORED, layer_dtype, quantized_names, scale_name, stored_shapes
    named, _ = hf_names(tensors)
    check_scale(named, config, f"{what} does not match the LLaVA config")
    expected = expected_shapes(config)
    check(named, expected, f"{what} does not match the LLaVA config")
    quantized = set(quantized_names(expected))
    units = []
    for name in expected:
        t = named[name]
        hf = weight_map.ms_to_hf(name)
        if name not in quantized:
            units.append((name, t, None, [(hf, t.dtype, t.shape, t.nbytes)]))
            continue
        fmt = layer_dtype(weight_dtype, head=name.endswith("lm_head.weight"))
        (w_shape, s_shape), (w_code, s_code) = stored_shapes(fmt, *t.shape), STORED[fmt]
        units.append((name, t, fmt, [(hf, w_code, w_shape, math.prod(w_shape) * io.SF_ITEMSIZE[w_code]),
                                     (scale_name(hf), s_code, s_shape,
                                      math.prod(s_shape) * io.SF_ITEMSIZE[s_code])]))
    shards = io.shard_files([(u[0], sum(e[3] for e in u[3])) for u in units], shard_bytes)
    return QuantPlan(units, shards, weight_dtype)


def write_quantized(plan, folder, config_bytes, progress=None):
    """Write the QuantPlan into `folder` (created if missing, removed again on failure) with config.json
    (`config_bytes`): every file through NAME.tmp-<pid>, renamed only when all are complete and re-read. One
    float tensor in memory at a time (read, quantized, written)."""
    from weights.quantize import quantize_int4, quantize_int8
    progress = progress or _NoProgress()
    by_name = {u[0]: u for u in plan.units}
    created = not os.path.isdir(folder)
    pending, files, done = [], {}, False
    try:
        if created:
            os.mkdir(folder)

        def start(name):
            out = io.AtomicFile(os.path.join(folder, name)).__enter__()
            pending.append(out)
            return out

        hf_shards = []
        for i, (fname, names) in enumerate(plan.shards, 1):
            out = start(fname)
            entries = [e for n in names for e in by_name[n][3]]
            hf_shards.append((fname, [e[0] for e in entries]))
            out.f.write(io.safetensors_header(entries, {"format": "pt", "llava_weight_dtype": plan.weight_dtype}))
            for n in names:
                _, t, fmt, unit = by_name[n]
                f = files.get(t.path) or files.setdefault(t.path, open(t.path, "rb"))
                if fmt is None:
                    for data in io.iter_chunks(f, t.segments, io.SF_ITEMSIZE[t.dtype]):
                        out.f.write(data)
                else:
                    array = io.read_array(f, t)
                    for part in (quantize_int8(array) if fmt == "int8" else quantize_int4(array)):
                        out.f.write(memoryview(part).cast("B"))
                    del array
                progress.update(sum(e[3] for e in unit))
            progress.set_postfix_str(f"{i}/{len(plan.shards)} files", refresh=False)
            out.f.flush()
            got = io.read_safetensors_header(out.tmp)
            if {k: (v.dtype, v.shape) for k, v in got.items()} != {e[0]: (e[1], tuple(e[2])) for e in entries}:
                raise LlavaError(f"internal error: {out.tmp} was not written as intended")
        if len(plan.shards) > 1:
            start(io.SAFETENSORS_INDEX).f.write(io.safetensors_index(hf_shards, plan.total))
        start(HF_CONFIG).f.write(config_bytes)
        for out in pending:
            out.commit()
        done = True
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or folder}: {e.strerror or e}") from e
    finally:
        for f in files.values():
            f.close()
        for out in pending:
            out.__exit__(None, None, None)
        if created and not done:
            shutil.rmtree(folder, ignore_errors=True)
