"""Files from outside, checked where they come in: the file type, and JSON and YAML parsed within bounds.

* A path that should be a file must be a regular file: a FIFO would block every reader until some other
  process writes to it, a device (/dev/zero, /dev/urandom) never ends. `open_regular` opens without blocking,
  checks the type of what it opened (no window between the check and the open) and only then reads.
* JSON (config.json, the safetensors index and headers) is parsed only when its nesting depth is within
  JSON_MAX_DEPTH: the parser recurses once per level and would stop with a RecursionError.
* YAML (the predict config) is read within a size cap, then composed by a loader that counts nesting depth
  while composing and refuses recursive aliases and documents whose aliases expand beyond YAML_MAX_NODES
  ("billion laughs": a few hundred bytes that expand to 10^9 nodes when the result is copied or walked).

Every limit is an environment variable (LLAVA_<NAME>) holding a positive integer, read when it is used;
docs/errors.md, "Limits on files", lists them. Every refusal is one LlavaError naming the file.
"""
import json
import os
import re
import stat

import numpy as np
import yaml

from llava_errors import LlavaError

DEFAULTS = {
    "JSON_MAX_DEPTH": 32,              # config.json and index need 3, a safetensors header 3
    "JSON_MAX_BYTES": 16 * 1024 * 1024,   # config.json / model.safetensors.index.json (headers: their own cap)
    "YAML_MAX_BYTES": 1024 * 1024,     # the predict yamls are about 5 KB
    "YAML_MAX_DEPTH": 10,              # mappings and lists; MindFormers refuses mappings deeper than 10 too
    "YAML_MAX_NODES": 100_000,         # nodes after alias expansion (the predict yamls have about 200)
}


def limit(name):
    """The value of limit `name` (DEFAULTS), or of the environment variable LLAVA_<name> when set."""
    env = "LLAVA_" + name
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise LlavaError(f"{env}={raw!r} must be a positive integer")
    return value


# ---------------------------------------------------------------------------------------------- file types

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode):
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def _label(path, what):
    return f"{what} {path}" if what else str(path)


def check_type(path, what="", folder_ok=False):
    """Raise LlavaError unless `path` exists and is a regular file (or a folder when `folder_ok`); symlinks
    are followed. Returns the os.stat result."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LlavaError(f"{_label(path, what)}: no such file" + (" or folder" if folder_ok else "")) from None
    except OSError as e:
        raise LlavaError(f"{_label(path, what)}: cannot read ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    raise LlavaError(f"{_label(path, what)} is not a regular file{' or folder' if folder_ok else ''} "
                     f"(it is {_kind(st.st_mode)})")


def open_regular(path, what=""):
    """`path` opened for binary reading, if it is a regular file (LlavaError otherwise). The open does not
    block on a FIFO, and the type is checked on the opened file itself."""
    check_type(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise LlavaError(f"{_label(path, what)}: cannot read ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LlavaError(f"{_label(path, what)} is not a regular file (it is {_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path, max_bytes, what="", limit_name=None):
    """The bytes of regular file `path`; LlavaError when it holds more than `max_bytes`."""
    with open_regular(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        hint = f" (limit LLAVA_{limit_name})" if limit_name else ""
        raise LlavaError(f"{_label(path, what)} is larger than {max_bytes} bytes{hint}")
    return data


# ---------------------------------------------------------------------------------------------------- JSON

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20


def json_depth(raw, stop_above=None):
    """(deepest nesting of arrays and objects in JSON text `raw` (bytes), strings ignored; whether all of it was
    counted). Exact for valid JSON, and a bound the parser cannot exceed for anything else. Memory: a copy of
    `raw` and a few bytes per bracket, counted in chunks; with `stop_above`, counting stops after the first
    chunk that goes deeper."""
    brackets = _JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_CHUNK, len(brackets) - start), offset=start)
        running = depth + np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1))
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
        if stop_above is not None and deepest > stop_above:
            return deepest, start + _CHUNK >= len(brackets)
    return deepest, True


def parse_json(raw, what):
    """JSON text (bytes) -> the value, with its depth checked first; LlavaError naming `what` when it is not
    JSON or nests deeper than LLAVA_JSON_MAX_DEPTH."""
    max_depth = limit("JSON_MAX_DEPTH")
    depth, complete = json_depth(raw, stop_above=max_depth)
    if depth > max_depth:
        raise LlavaError(f"{what} nests {'' if complete else 'at least '}{depth} levels deep "
                         f"(limit {max_depth}, LLAVA_JSON_MAX_DEPTH)")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise LlavaError(f"{what} is not UTF-8 text") from None
    except ValueError as e:
        raise LlavaError(f"{what} is not valid JSON ({e})") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def load_json(path, what=""):
    """The JSON value in regular file `path`, within LLAVA_JSON_MAX_BYTES and LLAVA_JSON_MAX_DEPTH."""
    raw = read_capped(path, limit("JSON_MAX_BYTES"), what, "JSON_MAX_BYTES")
    return parse_json(raw, _label(path, what))


# ---------------------------------------------------------------------------------------------------- YAML

class _Refused(yaml.YAMLError):
    pass


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past `max_depth` levels (before the recursion gets deep)."""

    max_depth = DEFAULTS["YAML_MAX_DEPTH"]

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self.max_depth + 1:     # +1: the scalar leaves of the deepest collection
                mark = self.peek_event().start_mark
                raise _Refused(f"nests deeper than {self.max_depth} levels (line {mark.line + 1}; limit "
                               f"LLAVA_YAML_MAX_DEPTH)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root, max_nodes, max_depth):
    """Nodes and depth of the composed graph with every alias expanded, refusing cycles (a recursive alias)
    and totals over the limits; iterative, memoized per node, so a compact bomb costs little to measure."""
    done = {}                       # id(node) -> (nodes, depth of collections)
    active = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in done and not children_done:
            continue
        if isinstance(node, yaml.ScalarNode):
            done[key] = (1, 0)
            continue
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not children_done:
            if key in active:
                raise _Refused("has a recursive alias (a node that contains itself)")
            active.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in done)
            continue
        active.discard(key)
        nodes = 1 + sum(done[id(c)][0] for c in children)
        depth = 1 + max((done[id(c)][1] for c in children), default=0)
        if nodes > max_nodes:
            raise _Refused(f"expands to more than {max_nodes} nodes through its aliases (limit "
                           f"LLAVA_YAML_MAX_NODES)")
        if depth > max_depth:
            raise _Refused(f"nests deeper than {max_depth} levels through its aliases (limit "
                           f"LLAVA_YAML_MAX_DEPTH)")
        done[key] = (nodes, depth)
    return done[id(root)]


def load_yaml(path, what=""):
    """The one YAML reader: regular file `path`, at most LLAVA_YAML_MAX_BYTES, safe types only, nested at
    most LLAVA_YAML_MAX_DEPTH levels and at most LLAVA_YAML_MAX_NODES nodes with its aliases expanded.
    LlavaError naming the file otherwise."""
    label = _label(path, what)
    raw = read_capped(path, limit("YAML_MAX_BYTES"), what, "YAML_MAX_BYTES")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LlavaError(f"{label}: not UTF-8 text") from None
    max_depth = limit("YAML_MAX_DEPTH")
    loader = type("Loader", (BoundedLoader,), {"max_depth": max_depth})(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, limit("YAML_MAX_NODES"), max_depth)
        return loader.construct_document(node)
    except _Refused as e:
        raise LlavaError(f"{label}: {e}") from None
    except yaml.YAMLError as e:
        raise LlavaError(f"{label}: not valid YAML ({str(e).splitlines()[0]})") from None
    finally:
        loader.dispose()
