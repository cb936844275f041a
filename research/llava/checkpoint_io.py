"""MindSpore .ckpt and safetensors formats (single files, and Hugging Face's sharded folders with an index),
streamed: one tensor (or one chunk) in memory at a time. No torch, no pickle: both formats are parsed from their
headers. The weights layer (weights.py) and convert_weight.py read and write through this module.
"""
import json
import math
import os
import signal
import struct

import numpy as np

from file_checks import load_json, open_regular, parse_json
from llava_errors import LlavaError

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# safetensors dtype codes: byte size of every code the format defines; only the float ones can be weights.
SF_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SF_TO_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_TO_SF = {v: k for k, v in SF_TO_DTYPE.items()}
# MindSpore checkpoint tensor_type strings (str(mindspore.float32) etc.).
MS_TO_DTYPE = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16"}
DTYPE_TO_MS = {v: k for k, v in MS_TO_DTYPE.items()}

CHUNK_BYTES = 16 * 1024 * 1024          # bytes read (and converted) at a time
CKPT_SLICE_BYTES = 512 * 1024 * 1024    # largest tensor_content per checkpoint entry, as MindSpore's SLICE_SIZE
MAX_HEADER_BYTES = 100 * 1024 * 1024    # safetensors' own limit on the JSON header
LIST_LIMIT = 5                          # names shown in an error message before "and N more"



def short_list(items, limit=LIST_LIMIT):
    """'a, b, c (and N more)': the first `limit` names of a problem list."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def mb(nbytes):
    return f"{nbytes / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------------------
# dtype conversion of raw little-endian chunks (no torch; bfloat16 by bit manipulation)

def _to_f32(raw, src):
    if src == "float32":
        return np.frombuffer(raw, dtype="<f4")
    if src == "float16":
        return np.frombuffer(raw, dtype="<f2").astype("<f4")
    if src == "bfloat16":
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4")
    raise LlavaError(f"unsupported dtype {src}")


def _from_f32(x, dst):
    if dst == "float32":
        return x
    if dst == "float16":
        with np.errstate(over="ignore"):
            return x.astype("<f2")
    if dst == "bfloat16":
        # round to nearest even, NaN -> canonical quiet NaN (as torch / c10::BFloat16 do)
        u = x.view("<u4")
        out = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")
        nan = np.isnan(x)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    raise LlavaError(f"unsupported dtype {dst}")


def convert_chunk(raw, src, dst):
    """Raw bytes of `src` elements -> (bytes-like of `dst` elements, number of finite values that overflowed)."""
    if src == dst:
        return raw, 0
    x = _to_f32(raw, src)
    y = _from_f32(x, dst)
    overflow = 0
    if dst == "float16":
        overflow = int(np.count_nonzero(np.isinf(y) & np.isfinite(x)))
    elif dst == "bfloat16":
        overflow = int(np.count_nonzero(((y & 0x7FFF) == 0x7F80) & np.isfinite(x)))
    return memoryview(np.ascontiguousarray(y)).cast("B"), overflow


# ----------------------------------------------------------------------------------------------------------
# safetensors: header parsing and streaming reads (the format is an 8-byte length, a JSON header, raw data)

class TensorInfo:
    """One tensor in a file: where its bytes are, and what they are."""
    __slots__ = ("name", "path", "dtype", "shape", "offset", "nbytes", "segments")

    def __init__(self, name, path, dtype, shape, offset, nbytes, segments=None):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, tuple(shape)
        self.offset, self.nbytes = offset, nbytes
        self.segments = segments if segments is not None else [(offset, nbytes)]


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_entry(path, name, info):
    """(dtype, shape, begin, stop) of one safetensors header entry, its JSON types checked."""
    if not isinstance(info, dict):
        raise LlavaError(f"{path}: malformed header entry for {name!r} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise LlavaError(f"{path}: malformed header entry for {name!r} (dtype is not a string)")
    if dtype not in SF_ITEMSIZE:
        raise LlavaError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise LlavaError(f"{path}: malformed header entry for {name!r} (shape is not a list of sizes)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(d) for d in offsets) \
            or offsets[0] > offsets[1]:
        raise LlavaError(f"{path}: malformed header entry for {name!r} (data_offsets is not [begin, end])")
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors_header(path):
    """name -> TensorInfo for every tensor of a .safetensors file, from its header; no tensor data is read.

    Checks what the format requires, as the safetensors library does: a regular file; a JSON header of at most
    MAX_HEADER_BYTES whose entries have a known dtype, a shape and data_offsets that agree; and the tensors'
    byte ranges, in offset order, tile the data area exactly (no overlap, no gap, nothing past the end). An
    overlap would make two weights share bytes. Every problem is a LlavaError naming the file.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise LlavaError(f"{path} is not a safetensors file or is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise LlavaError(f"{path} is not a safetensors file or is truncated "
                                 f"(header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise LlavaError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) != n:
        raise LlavaError(f"{path} is truncated (its header ended early)")
    header = parse_json(raw, f"{path} is not a safetensors file: its header")
    if not isinstance(header, dict):
        raise LlavaError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LlavaError(f"{path}: malformed header (__metadata__ is not an object of strings)")
    data_start = 8 + n
    data_size = size - data_start
    tensors, ranges = {}, []
    for name, info in header.items():
        dtype, shape, begin, stop = _header_entry(path, name, info)
        nbytes = math.prod(shape) * SF_ITEMSIZE[dtype]
        if stop - begin != nbytes:
            raise LlavaError(f"{path}: tensor {name} has {stop - begin} bytes for shape {list(shape)} "
                             f"of {dtype} ({nbytes} expected); the header is corrupt")
        ranges.append((begin, stop, name))
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    _check_tiling(path, sorted(ranges), data_size)
    return tensors


def _check_tiling(path, ranges, data_size):
    """`ranges` [(begin, end, name)] sorted must cover [0, data_size) exactly, each starting where the last
    one ended."""
    pos, last = 0, None
    for begin, stop, name in ranges:
        if begin < pos:
            raise LlavaError(f"{path}: the data of tensors {last} and {name} overlap (bytes {begin}..{pos}); "
                             f"the header is corrupt")
        if begin > pos:
            raise LlavaError(f"{path}: {begin - pos} bytes before tensor {name} belong to no tensor "
                             f"(offset {pos}); the header is corrupt")
        pos, last = stop, name
    if pos > data_size:
        raise LlavaError(f"{path} is truncated: its header describes {pos} bytes of tensor data, "
                         f"the file holds {max(data_size, 0)}")
    if pos < data_size:
        raise LlavaError(f"{path}: {data_size - pos} bytes after the last tensor belong to no tensor; "
                         f"the header is corrupt")


def iter_chunks(f, segments, itemsize, chunk_bytes=None):
    """Yield the bytes of (offset, nbytes) segments of open file `f`, in pieces of whole elements."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    carry = b""
    for offset, nbytes in segments:
        f.seek(offset)
        left = nbytes
        while left:
            data = f.read(min(step, left))
            if not data:
                raise LlavaError(f"{f.name} ended early (truncated while reading)")
            left -= len(data)
            if carry:
                data, carry = carry + data, b""
            cut = len(data) - len(data) % itemsize
            if cut < len(data):
                carry = data[cut:]
                data = data[:cut]
            if data:
                yield data
    if carry:
        raise LlavaError(f"{f.name}: tensor data is not a whole number of elements")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def refuse_pickle(path):
    raise LlavaError(f"{path}: PyTorch pickle files are not read (loading a pickle can run code); "
                     f"use the model's safetensors files (model.safetensors or model-*.safetensors with "
                     f"model.safetensors.index.json) in a folder with config.json")


def read_safetensors_folder(folder):
    """name -> TensorInfo over a Hugging Face folder's model.safetensors or its index's shards (headers only).

    The index must agree with the shards (every listed shard exists and holds the keys mapped to it, and every
    key is listed); a folder with only pickles (.bin/.pt) is refused without opening them."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    single = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.lexists(index_path):
        index = load_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LlavaError(f"{index_path} is not a safetensors index (no 'weight_map' of file names)")
        odd = sorted({v for v in weight_map.values()
                      if os.path.basename(v) != v or v in ("", ".", "..") or not v.endswith(".safetensors")})
        if odd:
            raise LlavaError(f"{index_path} names shard(s) that are not .safetensors files of the folder: "
                             f"{short_list(odd)}")
        files = sorted(set(weight_map.values()))
        absent = [n for n in files if not os.path.lexists(os.path.join(folder, n))]
        if absent:
            raise LlavaError(f"{index_path} lists shard file(s) that do not exist: {short_list(absent)}")
        tensors = {}
        for name in files:
            for key, info in read_safetensors_header(os.path.join(folder, name)).items():
                if key in tensors:
                    raise LlavaError(f"{key} is stored twice: in {tensors[key].path} and {info.path}")
                tensors[key] = info
        not_there = [k for k, v in weight_map.items()
                     if k not in tensors or os.path.basename(tensors[k].path) != v]
        not_listed = [k for k in tensors if k not in weight_map]
        if not_there:
            raise LlavaError(f"{index_path} maps key(s) to shards that do not hold them: {short_list(not_there)}")
        if not_listed:
            raise LlavaError(f"{index_path} does not list key(s) found in its shards: {short_list(not_listed)}")
        return tensors
    if os.path.lexists(single):
        return read_safetensors_header(single)
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        refuse_pickle(os.path.join(folder, pickles[0]))
    raise LlavaError(f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")


def shard_files(sizes, max_bytes):
    """[(name, nbytes)] in order -> [(file name, [names])]: one model.safetensors when everything fits in
    `max_bytes`, else model-0000i-of-0000N.safetensors filled in order, as transformers' save_pretrained
    splits (a tensor larger than `max_bytes` gets a shard of its own)."""
    groups, current, size = [], [], 0
    for name, nbytes in sizes:
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [(SAFETENSORS_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{i:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def safetensors_index(shards, total_size):
    """The bytes of model.safetensors.index.json for [(file name, [names])], as transformers writes it."""
    weight_map = {name: fname for fname, names in shards for name in names}
    return (json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                       indent=2) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------------------
# MindSpore .ckpt: protobuf `Checkpoint { repeated Value value = 1; }`, written one entry at a time.
#   Value { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
#   TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }
# Concatenated serialized `Checkpoint` messages parse as one message whose `value` list is their union, which is
# how mindspore.save_checkpoint itself writes (one message per slice of at most SLICE_SIZE); load_checkpoint
# joins consecutive entries with the same tag. Nothing follows the entries (MindSpore's optional CRC footer
# 'crc_num'+10 bytes is only written with crc_check=True and is optional on load).

def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ckpt_entry_header(tag, dims, tensor_type, content_len):
    """Serialized bytes of `Checkpoint{value: [Value{tag, tensor{dims, tensor_type, tensor_content}}]}`
    up to (not including) the `content_len` bytes of tensor_content, which the caller writes next."""
    tag_b = tag.encode("utf-8")
    type_b = tensor_type.encode("ascii")
    tensor_head = b"".join(b"\x08" + _varint(int(d)) for d in dims)
    tensor_head += b"\x12" + _varint(len(type_b)) + type_b + b"\x1a" + _varint(content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = b"\x0a" + _varint(len(tag_b)) + tag_b + b"\x12" + _varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return b"\x0a" + _varint(value_len) + value_head + tensor_head


class CkptWriter:
    """Appends tensors to an open binary file in MindSpore's .ckpt format, streaming their bytes."""

    def __init__(self, f, slice_bytes=CKPT_SLICE_BYTES):
        self.f = f
        self.slice_bytes = slice_bytes
        self.written = 0

    def write_tensor(self, name, dims, dtype, nbytes, chunks, progress=None):
        """`chunks` yields bytes-like pieces (whole elements) that add up to `nbytes`."""
        itemsize = ITEMSIZE[dtype]
        per_slice = max(itemsize, self.slice_bytes - self.slice_bytes % itemsize)
        tag = DTYPE_TO_MS[dtype]
        left_total = nbytes
        left_slice = 0
        if nbytes == 0:
            self._write(ckpt_entry_header(name, dims, tag, 0))
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while len(view):
                if left_slice == 0:
                    left_slice = min(per_slice, left_total)
                    self._write(ckpt_entry_header(name, dims, tag, left_slice))
                piece = view[:left_slice]
                self._write(piece)
                n = len(piece)
                view = view[n:]
                left_slice -= n
                left_total -= n
                if progress is not None:
                    progress.update(n)
        if left_total or left_slice:
            raise LlavaError(f"internal error: {name} got {nbytes - left_total} of {nbytes} bytes")

    def _write(self, data):
        self.f.write(data)
        self.written += len(data)


MAX_TAG_BYTES = 64 * 1024     # a parameter name; real ones are under 200 bytes
MAX_TYPE_BYTES = 64           # a tensor_type string ("Float32", "BFloat16", "str")
MAX_DIMS = 64                 # MindSpore tensors have at most 8


class _CkptReader:
    """Reads the protobuf fields of an open .ckpt, every read bounded by the end of the message it is in:
    a length is compared with the bytes left in its message (and so in the file) before it is used."""

    def __init__(self, f, where):
        self.f, self.where = f, where

    def bad(self, what):
        return LlavaError(f"{self.where} is not a MindSpore checkpoint or is truncated ({what} at byte "
                          f"{self.f.tell()})")

    def varint(self, end):
        f, shift, result = self.f, 0, 0
        while True:
            if f.tell() >= end:
                raise self.bad("a number runs past the end of its entry")
            b = f.read(1)
            if not b:
                raise self.bad("the file ended inside a number")
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise self.bad("a number longer than 10 bytes")

    def length(self, end, what, cap=None):
        """A length-delimited field's length, checked against `end` (and `cap`); -> (start, stop)."""
        n = self.varint(end)
        start = self.f.tell()
        if n > end - start:
            raise self.bad(f"{what} of {n} bytes runs past the end of its entry ({end - start} bytes left)")
        if cap is not None and n > cap:
            raise self.bad(f"{what} of {n} bytes (at most {cap} expected)")
        return start, start + n

    def string(self, end, what, cap, encoding):
        start, stop = self.length(end, what, cap)
        data = self.f.read(stop - start)
        if len(data) != stop - start:
            raise self.bad(f"the file ended inside {what}")
        return data.decode(encoding, "replace")

    def skip(self, wire, end, what):
        if wire == 0:
            self.varint(end)
            return
        if wire == 2:
            start, stop = self.length(end, what)
        elif wire in (1, 5):
            start = self.f.tell()
            stop = start + (8 if wire == 1 else 4)
            if stop > end:
                raise self.bad(f"{what} runs past the end of its entry")
        else:
            raise self.bad(f"wire type {wire}")
        self.f.seek(stop)


def _ckpt_tensor(r, end, dims):
    """The fields of one TensorProto ending at `end` -> (tensor_type, (content offset, length)); dims appended."""
    ttype = content = None
    while r.f.tell() < end:
        key = r.varint(end)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dims.append(r.varint(end))
        elif field == 1 and wire == 2:       # packed dims
            _, packed_end = r.length(end, "the dims")
            while r.f.tell() < packed_end:
                dims.append(r.varint(packed_end))
        elif field == 2 and wire == 2:
            ttype = r.string(end, "the tensor type", MAX_TYPE_BYTES, "ascii")
        elif field == 3 and wire == 2:
            start, stop = r.length(end, "the tensor data")
            content = (start, stop - start)
            r.f.seek(stop)
        else:
            r.skip(wire, end, f"field {field}")
        if len(dims) > MAX_DIMS:
            raise r.bad(f"more than {MAX_DIMS} dims")
    return ttype, content


def scan_ckpt(path):
    """name -> TensorInfo (dtype name, dims, content segments) of a MindSpore .ckpt, without reading tensor data.

    Entries split into several slices (consecutive entries with the same tag) are joined. String entries
    (save_checkpoint's append_dict) are skipped; map tensors are refused. The file must be a regular file;
    every length in it is checked against the end of its entry before it is used, so a damaged or crafted file
    is one LlavaError naming it, whatever its bytes.
    """
    with open_regular(path) as f:
        try:
            return _scan_ckpt(f, path, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise LlavaError(f"cannot read {path}: {e.strerror or e}") from e


def _scan_ckpt(f, path, size):
    where = path
    r = _CkptReader(f, where)
    end = size
    if size >= 17:
        f.seek(size - 17)
        if f.read(7) == b"crc_num":
            end = size - 17
    f.seek(0)
    tensors, last = {}, None
    while f.tell() < end:
        key = r.varint(end)
        if key != 0x0A:
            raise LlavaError(f"{where} is not a MindSpore checkpoint (unexpected field {key >> 3})")
        _, value_end = r.length(end, "an entry")
        tag, dims, ttype, content, is_map = None, [], None, None, False
        while f.tell() < value_end:
            key = r.varint(value_end)
            field, wire = key >> 3, key & 7
            if field == 1 and wire == 2:
                tag = r.string(value_end, "the tag", MAX_TAG_BYTES, "utf-8")
            elif field == 2 and wire == 2:
                _, tensor_end = r.length(value_end, "the tensor")
                ttype, content = _ckpt_tensor(r, tensor_end, dims)
            elif field == 3 and wire == 2:
                is_map = True
                r.skip(wire, value_end, "a map tensor")
            else:
                r.skip(wire, value_end, f"field {field}")
        if tag is None:
            raise LlavaError(f"{where} is not a MindSpore checkpoint (an entry has no tag)")
        if is_map:
            raise LlavaError(f"{where}: entry {tag} is a map tensor, which is not a model weight")
        if ttype == "str":
            last = None
            continue
        if ttype is None or content is None:
            raise LlavaError(f"{where}: entry {tag} has no tensor data")
        if tag == last:
            t = tensors[tag]
            if list(t.shape) != dims or t.dtype != ttype:
                raise LlavaError(f"{where}: slices of {tag} disagree on shape or dtype")
            t.segments.append(content)
            t.nbytes += content[1]
            continue
        if tag in tensors:
            raise LlavaError(f"{where}: {tag} appears twice")
        tensors[tag] = TensorInfo(tag, path, ttype, dims, content[0], content[1], [content])
        last = tag
    for t in tensors.values():
        if t.dtype in MS_TO_DTYPE:
            expect = math.prod(t.shape) * ITEMSIZE[MS_TO_DTYPE[t.dtype]]
            if expect != t.nbytes:
                raise LlavaError(f"{where}: {t.name} holds {t.nbytes} bytes, its shape {list(t.shape)} "
                                 f"of {t.dtype} needs {expect}")
    return tensors


def float_dtype(code):
    """"float32" / "float16" / "bfloat16" for a safetensors or .ckpt dtype code, None for any other dtype."""
    return SF_TO_DTYPE.get(code) or MS_TO_DTYPE.get(code)


def read_array(f, info, rows=None):
    """The tensor `info` (a TensorInfo of open file `f`) as a numpy array; only dim-0 rows `rows` (a slice)
    are read when given. float32 and float16 come back as stored, bfloat16 as float32 (numpy has no bfloat16;
    the widening is exact). Memory: the rows read, once (twice for bfloat16 while widening)."""
    dtype = float_dtype(info.dtype)
    if dtype is None:
        raise LlavaError(f"{info.path}: {info.name} has dtype {info.dtype}; only float tensors are supported")
    shape = list(info.shape)
    start, length = 0, info.nbytes
    if rows is not None and shape:
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        first, stop, _ = rows.indices(shape[0])
        shape[0] = max(stop - first, 0)
        start, length = first * row_bytes, shape[0] * row_bytes
    buf = bytearray(length)
    view, pos, base = memoryview(buf), 0, 0
    for offset, nbytes in info.segments:          # the byte range [start, start+length) over the segments
        lo, hi = max(start, base), min(start + length, base + nbytes)
        if lo < hi:
            f.seek(offset + lo - base)
            if f.readinto(view[pos:pos + hi - lo]) != hi - lo:
                raise LlavaError(f"{info.path} is truncated")
            pos += hi - lo
        base += nbytes
    del view
    if dtype == "bfloat16":
        return _to_f32(buf, "bfloat16").reshape(shape)
    return np.frombuffer(buf, dtype="<f4" if dtype == "float32" else "<f2").reshape(shape)


def load_ckpt_lean(path):
    """name -> mindspore.Parameter for a plain .ckpt, like `mindspore.load_checkpoint(path)`, but read one
    tensor at a time: peak memory is the weights once plus one tensor. (load_checkpoint reads the whole file
    into memory and then copies every tensor out of it: about twice the checkpoint size at its peak.)"""
    import mindspore as ms
    out = {}
    with open(path, "rb") as f:
        for name, t in scan_ckpt(path).items():
            array = read_array(f, t)
            if MS_TO_DTYPE[t.dtype] == "bfloat16":
                tensor = ms.Tensor(array).astype(ms.bfloat16)
            else:
                tensor = ms.Tensor.from_numpy(array)
            out[name] = ms.Parameter(tensor, name=name)
            del array
    return out


def check_ckpt_crc(path):
    """If the checkpoint ends with MindSpore's 'crc_num' footer, check it (streaming); True if one was checked."""
    import binascii
    size = os.path.getsize(path)
    if size < 17:
        return False
    with open(path, "rb") as f:
        f.seek(size - 17)
        tail = f.read(17)
        if tail[:7] != b"crc_num":
            return False
        want = int.from_bytes(tail[7:], "big")
        f.seek(0)
        crc, left = 0, size - 17
        while left:
            data = f.read(min(CHUNK_BYTES, left))
            if not data:
                break
            crc = binascii.crc32(data, crc)
            left -= len(data)
    if crc != want:
        raise LlavaError(f"{path} is damaged: its CRC footer does not match its content")
    return True


# ----------------------------------------------------------------------------------------------------------
# safetensors writer (reversed direction)

def safetensors_header(entries, metadata=None):
    """Header bytes (length prefix + JSON padded to 8 bytes) for [(name, sf_dtype, shape, nbytes)] in order."""
    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, sf_dtype, shape, nbytes in entries:
        header[name] = {"dtype": sf_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# ----------------------------------------------------------------------------------------------------------
# atomic output

class AtomicFile:
    """Write `path` through `path.tmp-<pid>`; `commit()` fsyncs and renames; otherwise the temp file is removed."""

    def __init__(self, path):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.f = None
        self.committed = False

    def __enter__(self):
        try:
            self.f = open(self.tmp, "wb")
        except OSError as e:
            raise LlavaError(f"cannot write {self.tmp}: {e.strerror or e}") from e
        return self

    def commit(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        self.committed = True
        try:
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def __exit__(self, *exc):
        if not self.committed:
            # a second Ctrl-C must not stop the cleanup half-way
            old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                if self.f is not None:
                    self.f.close()
                try:
                    os.unlink(self.tmp)
                except FileNotFoundError:
                    pass
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        return False
