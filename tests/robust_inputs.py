"""Builders of bad inputs for tests/test_robustness.py: broken images, decompression bombs, a malicious pickle,
unrelated / truncated / reshaped MindSpore checkpoints, and a local HTTP server with misbehaving URLs.

Everything is small on disk and bounded in time: the server's slow answers stop after SLOW_LIMIT seconds even if
the client never hangs up.
"""
import http.server
import os
import pickle
import socket
import struct
import threading
import time
import zlib

SLOW_LIMIT = 20.0   # seconds a misbehaving URL keeps its connection open at most


# --------------------------------------------------------------------------------------------------- images
def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path, width=20000, height=20000):
    """A PNG whose IHDR claims width x height RGB pixels, with no pixel data at all (a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    return path


def png_bomb(path, side=10000):
    """A valid 1-bit grayscale side x side PNG of zeros: ~12 KB on disk, side**2 pixels when decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
                + _png_chunk(b"IEND", b""))
    return path


def truncated_copy(src, dst, fraction=0.5):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------------------------------- pickle
class _OpensSentinel:
    """Unpickling this object calls open(sentinel, "w"): the sentinel file appearing proves a pickle ran."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def evil_pickle(path, sentinel):
    """A pickle (protocol 2, as torch.save's legacy format) that creates `sentinel` when it is loaded."""
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _OpensSentinel(sentinel)}, f, protocol=2)
    assert not os.path.exists(sentinel)
    return path


# ----------------------------------------------------------------------------------------------- checkpoints
def unrelated_ckpt(path):
    """A valid MindSpore checkpoint of some other network (mindspore.save_checkpoint)."""
    import mindspore as ms
    import numpy as np
    ms.save_checkpoint([{"name": "backbone.conv1.weight", "data": ms.Tensor(np.ones((8, 3, 3, 3), np.float32))},
                        {"name": "head.fc.bias", "data": ms.Tensor(np.zeros((10,), np.float32))}], path)
    return path


def reshaped_ckpt(src, path, name="multi_modal_projector.linear_2.bias"):
    """`src` with one weight cut to another shape (saved by mindspore.save_checkpoint)."""
    import mindspore as ms
    params = ms.load_checkpoint(src)
    value = params[name].asnumpy()
    items = [{"name": k, "data": (ms.Tensor(value[:-1]) if k == name else v)} for k, v in params.items()]
    ms.save_checkpoint(items, path)
    return path


# ---------------------------------------------------------------------------------------------- HTTP server
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"   # close-delimited bodies: no Content-Length means "read until close"
    image_bytes = b""

    def log_message(self, *args):
        pass

    def _head(self, code, ctype, length=None, extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_GET(self):  # noqa: N802 (http.server's name)
        try:
            self._serve(self.path.split("?")[0])
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass

    def _serve(self, path):
        end = time.monotonic() + SLOW_LIMIT
        if path == "/cat.jpg":
            self._head(200, "image/jpeg", len(self.image_bytes))
            self.wfile.write(self.image_bytes)
        elif path == "/missing.jpg":
            body = b"<html><body>404 Not Found</body></html>"
            self._head(404, "text/html", len(body))
            self.wfile.write(body)
        elif path == "/page.jpg":                 # a 200 answer that is an HTML page (login wall, error page)
            body = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>"
            self._head(200, "text/html; charset=utf-8", len(body))
            self.wfile.write(body)
        elif path == "/stall.jpg":                # accepts the connection, never answers
            while time.monotonic() < end:
                time.sleep(0.1)
        elif path == "/trickle.jpg":              # answers, then sends one byte now and then, forever
            self._head(200, "image/jpeg", 50_000)
            self.wfile.write(self.image_bytes[:16])
            self.wfile.flush()
            i = 16
            while time.monotonic() < end:
                self.wfile.write(self.image_bytes[i:i + 1] or b"\0")
                self.wfile.flush()
                i += 1
                time.sleep(0.2)
        elif path == "/huge.jpg":                 # announces 100 MB
            self._head(200, "image/jpeg", 100_000_000)
            self.wfile.write(self.image_bytes[:1024])
        elif path == "/endless.jpg":              # no Content-Length: a body that does not stop
            self._head(200, "image/jpeg")
            chunk = self.image_bytes[:65536].ljust(65536, b"\0")
            sent = 0
            while time.monotonic() < end and sent < 256 * 1024 * 1024:
                self.wfile.write(chunk)
                sent += len(chunk)
        elif path == "/loop.jpg":
            self._head(302, "text/plain", 0, {"Location": "/loop.jpg"})
        elif path == "/to_file.jpg":
            self._head(302, "text/plain", 0, {"Location": "file:///etc/passwd"})
        else:
            self._head(404, "text/plain", 0)


class ImageServer:
    """http://127.0.0.1:PORT/... in a daemon thread; close() stops it."""

    def __init__(self, image_path):
        with open(image_path, "rb") as f:
            handler = type("Handler", (_Handler,), {"image_bytes": f.read()})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
