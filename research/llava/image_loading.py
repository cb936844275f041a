"""Image loading with limits, for LlavaProcessor and for run_mindformer.py's early input check.

`load_image(source)`: a local path, an http(s) URL (a wall-clock deadline for the whole download, headers included,
and a byte cap; the addresses it may connect to are `policy`'s, media_policy.MediaPolicy, every address for the
command line's own inputs) or a `data:image/...;base64,` URL (no other scheme; `allow_paths=False` refuses local
paths, for images that come from a network client), decoded by Pillow with its decompression-bomb guard plus an explicit pixel cap,
fully loaded so truncation is caught. Only the photo formats in ALLOWED_FORMATS are decoded, recognised by their
content, never by the file name: Pillow's other plugins include EPS, which runs Ghostscript on the file. Every
failure is a `LlavaError` naming the input; a URL is named with its user-info and query masked (`mask_url`). EXIF
orientation is not applied (as in llava-hf's and the original LLaVA's examples, which feed `Image.open(...)` as is).

This module imports neither MindSpore nor MindFormers, so the predict command checks every image (downloads
included) in a second, before its ~7 s of framework imports.
"""
import io
import os
import re
import socket
import threading
import warnings
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_errors import LimitError, LlavaError
from media_policy import TRUSTED, FetchError, MediaPolicy

DEFAULT_TIMEOUT = 10.0                 # seconds, whole download
DEFAULT_MAX_BYTES = 64 * 1024 * 1024   # encoded size of one image (file or download)
DEFAULT_MAX_PIXELS = 89_478_485        # Pillow's own default decompression-bomb limit (width * height)
# Pillow format names (their content decides, never the name); Pillow's JPEG plugin also yields "MPO", the
# multi-picture JPEG that phone cameras write.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_USER_AGENT = "llava-mindspore/0.1 (+image loader)"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_KNOWN_SCHEMES = {"http", "https", "file", "ftp", "ftps", "data", "sftp", "s3", "gs", "hdfs", "obs"}


def _name(source) -> str:
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 160 else text[:150] + "...(" + str(len(text)) + " chars)"


def display_name(source) -> str:
    """How errors name an image source: a path as given, a URL masked (mask_url), long text shortened."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if _scheme(text) not in (None, "data"):
            return _name(mask_url(text))
    return _name(source)


def mask_url(url: str) -> str:
    """`url` with its user-info and its query/fragment replaced by `***` (they may hold credentials or tokens):
    https://user:pass@host/a.jpg?sig=abc -> https://***@host/a.jpg?***"""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:          # e.g. an unclosed IPv6 bracket: keep nothing after the scheme
        return url.split(":", 1)[0] + "://***"
    if "@" not in netloc and not parts.query and not parts.fragment:
        return url
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((url[:len(parts.scheme)], netloc, parts.path, "***" if parts.query else "",
                       "***" if parts.fragment else ""))


def _scheme(text: str) -> Optional[str]:
    m = _SCHEME.match(text)
    if not m:
        return None
    scheme = m.group(1).lower()
    if text[m.end():].startswith("//") or scheme in _KNOWN_SCHEMES:
        return scheme
    return None


def load_image(source, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, allow_paths: bool = True,
               policy: MediaPolicy = TRUSTED) -> Image.Image:
    """A fully decoded PIL image from a local path, an http(s) or data: URL, or a PIL image; LlavaError
    otherwise (FetchError when an http(s) URL could not be fetched or its address is refused by `policy`)."""
    if isinstance(source, Image.Image):
        _check_pixels(source, _name("<PIL image>"), max_pixels)
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise LlavaError(f"image {_name(source)}: expected a file path, an http(s) URL or a PIL image, "
                         f"got {type(source).__name__}")
    text = os.fspath(source)
    if not text.strip():
        raise LlavaError("image '': empty path")
    scheme = _scheme(text)
    name = display_name(text)
    if scheme in ("http", "https"):
        if not policy.urls:
            raise LlavaError(f"image {name}: http(s) image URLs are turned off on this server "
                             f"(--allow_media_urls False): send the image as a data:image/...;base64, URL")
        data = _read_url(text, name, timeout, max_bytes, policy)
        what = "response"
    elif scheme == "data":
        data = _read_data_url(text, name, max_bytes)
        what = "data URL"
    elif scheme is not None:
        raise LlavaError(f"image {name}: unsupported scheme '{scheme}:' (give a local path, an http(s) URL or a "
                         f"data:image/...;base64, URL)")
    elif not allow_paths:
        raise LlavaError(f"image {name}: not a URL (give an http(s) URL or a data:image/...;base64, URL)")
    else:
        data = _read_file(text, name, max_bytes)
        what = "file"
    return _decode(data, name, max_pixels, what)


def _read_file(path: str, name: str, max_bytes: int) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LlavaError(f"image {name}: no such file") from None
    except OSError as e:
        raise LlavaError(f"image {name}: cannot access ({e.strerror or e})") from None
    if os.path.isdir(path):
        raise LlavaError(f"image {name}: is a directory, not an image file")
    if not os.path.isfile(path):
        raise LlavaError(f"image {name}: not a regular file")
    if st.st_size == 0:
        raise LlavaError(f"image {name}: empty file")
    if st.st_size > max_bytes:
        raise LimitError(f"image {name}: file is {st.st_size} bytes, more than the limit of {max_bytes} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise LlavaError(f"image {name}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise LimitError(f"image {name}: file is more than the limit of {max_bytes} bytes")
    return data


def _read_data_url(url: str, name: str, max_bytes: int) -> bytes:
    """RFC 2397 `data:[<media type>][;base64],<data>`, base64 only (an image is binary)."""
    import base64
    import binascii

    header, sep, payload = url.partition(",")
    params = header[len("data:"):].split(";")
    if not sep or "base64" not in params[1:]:
        raise LlavaError(f"image {name}: a data URL must be data:image/...;base64,<data>")
    if params[0] and not params[0].lower().startswith("image/"):
        raise LlavaError(f"image {name}: data URL media type {params[0]!r} is not an image type")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise LimitError(f"image {name}: data URL is more than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise LlavaError(f"image {name}: data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise LimitError(f"image {name}: data URL is more than the limit of {max_bytes} bytes")
    return data


def _read_url(url: str, name: str, timeout: float, max_bytes: int, policy: MediaPolicy = TRUSTED) -> bytes:
    """GET within `timeout` seconds of wall-clock time for the whole download (connection, headers, body), with a
    byte cap and no compressed transfer.

    requests' own timeout bounds each socket read, so a server that sends a byte now and then (headers or body)
    would hold the request forever: the download runs in a worker thread, and at the deadline its sockets are
    shut down (so the worker ends at once) and the caller gets the time-out."""
    watch = _SocketWatch()
    box = {}

    def work():
        try:
            box["data"] = _fetch(url, name, timeout, max_bytes, watch, policy)
        except BaseException as e:  # noqa: B036 (handed to the caller)
            box["error"] = e

    worker = threading.Thread(target=work, name="image-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        watch.expire()
        worker.join(1.0)
        raise FetchError(f"image {name}: download timed out after {timeout:g} s (processor.timeout, the limit for "
                         f"the whole download)")
    if "error" in box:
        raise box["error"]
    return box["data"]


class _SocketWatch:
    """The sockets one download opened; expire() shuts them down, so a read blocked on one returns at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sockets = []
        self.expired = False

    def add(self, sock):
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            self._shut(sock)

    def expire(self):
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock):
        try:   # the plain socket's shutdown (for TLS too): it wakes a read blocked in another thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError):
            pass


def _watched_adapter(watch: _SocketWatch, policy: MediaPolicy = TRUSTED):
    """A requests adapter whose connections report their socket to `watch` once connected (directly or through
    an HTTP proxy; a SOCKS proxy's are not watched, the caller's deadline still holds). Under a restricting
    `policy` every connection (each redirect hop opens its own) is made by `policy.connect` to the address
    it checked, from the host name urllib3 itself parsed (no second URL parser to disagree with)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                watch.add(self.sock)

            if policy.restricted:
                def _new_conn(self):
                    try:
                        return policy.connect(self._dns_host, self.port, self.timeout, self.source_address,
                                              self.socket_options)
                    except socket.timeout:
                        raise FetchError(f"connection to {self.host}:{self.port} timed out") from None
                    except OSError as e:
                        raise FetchError(f"cannot connect to {self.host}:{self.port} "
                                         f"({e.strerror or type(e).__name__})") from None
        return Connection

    pools = {"http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": watched(HTTPConnection)}),
             "https": type("Pool", (HTTPSConnectionPool,), {"ConnectionCls": watched(HTTPSConnection)})}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):
                manager.pool_classes_by_scheme = pools
            return manager

    return Adapter()


def _fetch(url: str, name: str, timeout: float, max_bytes: int, watch: _SocketWatch,
           policy: MediaPolicy = TRUSTED) -> bytes:
    import requests  # imported here: only URL inputs need them
    import urllib3

    try:
        with requests.Session() as session:
            # a restricting policy judges the address itself: an environment proxy would resolve the name
            # where the check cannot see it, and .netrc credentials are not for hosts a client picks
            session.trust_env = not policy.restricted
            # with redirects off requests still builds the next hop's request (never sent), and counts it
            session.max_redirects = max(policy.redirects, 1)
            adapter = _watched_adapter(watch, policy)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with session.get(url, stream=True, timeout=(timeout, timeout), allow_redirects=policy.redirects > 0,
                             headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity",
                                      "Accept": "image/*"}) as resp:
                if resp.is_redirect:     # redirects off (policy.redirects == 0)
                    raise FetchError(f"image {name}: HTTP {resp.status_code} redirect, not followed "
                                     f"(--media_redirects 0)")
                if not 200 <= resp.status_code < 300:
                    raise FetchError(f"image {name}: HTTP {resp.status_code} {resp.reason or ''}".rstrip())
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise LimitError(f"image {name}: response is {int(length)} bytes, more than the limit of "
                                     f"{max_bytes} bytes")
                # read1: return as soon as some bytes arrive, so the cap is checked while an endless body is
                # still coming in (iter_content would block for a full chunk).
                raw = resp.raw
                read = raw.read1 if hasattr(raw, "read1") else raw.read
                buf = bytearray()
                while not watch.expired:
                    chunk = read(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise LimitError(f"image {name}: response is more than the limit of {max_bytes} bytes")
                return bytes(buf)
    except FetchError as e:
        if str(e).startswith("image "):
            raise
        raise FetchError(f"image {name}: {e}") from None     # the policy's refusal, from inside a connect
    except LlavaError:
        raise
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout):
        raise FetchError(f"image {name}: download timed out after {timeout:g} s") from None
    except requests.exceptions.TooManyRedirects:
        raise FetchError(f"image {name}: too many redirects") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise FetchError(f"image {name}: download failed ({type(e).__name__})") from None


def _check_pixels(img: Image.Image, name: str, max_pixels: int):
    w, h = img.size
    if w <= 0 or h <= 0:
        raise LlavaError(f"image {name}: has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise LimitError(f"image {name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels} "
                         f"(decompression-bomb guard)")


def _decode(data: bytes, name: str, max_pixels: int, what: str = "file") -> Image.Image:
    if not data:
        raise LlavaError(f"image {name}: empty {what}")
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above. The warning is left to the
        # explicit cap (_check_pixels, with the image's size in its message), so that a max_pixels above Pillow's
        # default works; beyond twice that default Pillow refuses whatever max_pixels says.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_pixels(img, name, max_pixels)
            img.load()
        except LlavaError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            count = re.search(r"\((\d+) pixels\)", str(e))   # Pillow: "Image size (N pixels) exceeds limit..."
            count = f"{count.group(1)} pixels" if count else "the image"
            raise LimitError(f"image {name}: {count} is more than the limit of {max_pixels} "
                             f"(decompression-bomb guard)") from None
        except UnidentifiedImageError:
            found = _detect_format(data)
            if found:
                raise LlavaError(f"image {name}: the content looks like {found}, not one of the accepted formats "
                                 f"({ALLOWED_NAMES}; recognised by content, not by the file name)") from None
            head = data[:64].lstrip().lower()
            hint = " (looks like HTML/text)" if head.startswith((b"<", b"{")) else ""
            raise LlavaError(f"image {name}: not an image Pillow can read{hint} (accepted: {ALLOWED_NAMES})") \
                from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise LlavaError(f"image {name}: corrupt or truncated image ({_short(e)})") from None
    return img


def _detect_format(data: bytes) -> Optional[str]:
    """The format Pillow would take `data` for, from its signature checks alone (no plugin opens it), e.g.
    "EPS (Encapsulated Postscript)"; None when no signature matches."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            result = accept is not None and accept(prefix)
            matched = bool(result) and not isinstance(result, str)   # a string is a plugin's warning
        except Exception:  # noqa: BLE001 (a plugin's signature check failing means "not this format")
            matched = False
        if matched:
            about = getattr(factory, "format_description", None)
            return f"{fmt} ({about})" if about and about != fmt else fmt
    return None


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        img = Image.fromarray(arr)
        _check_pixels(img, "<array>", max_pixels)
        return img
    raise LlavaError(f"image <array>: expected uint8 [H, W], [H, W, 3] or [H, W, 4], "
                     f"got {arr.dtype} {list(arr.shape)}")


def _short(exc) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]
