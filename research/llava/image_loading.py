"""Image loading with limits, for LlavaProcessor and for run_mindformer.py's early input check.

`load_image(source)`: a local path, an http(s) URL (streamed with connect/read timeouts, a whole-download deadline
and a byte cap) or a `data:image/...;base64,` URL (no other scheme; `allow_paths=False` refuses local paths, for
images that come from a network client), decoded by Pillow with its decompression-bomb guard plus an explicit pixel cap,
fully loaded so truncation is caught. Every failure is a `LlavaError` naming the input. EXIF orientation is not
applied (as in llava-hf's and the original LLaVA's examples, which feed `Image.open(...)` as is).

This module imports neither MindSpore nor MindFormers, so the predict command checks every image (downloads
included) in a second, before its ~7 s of framework imports.
"""
import io
import os
import re
import time
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_errors import LimitError, LlavaError

DEFAULT_TIMEOUT = 10.0                 # seconds, whole download
DEFAULT_MAX_BYTES = 64 * 1024 * 1024   # encoded size of one image (file or download)
DEFAULT_MAX_PIXELS = 89_478_485        # Pillow's own default decompression-bomb limit (width * height)
_USER_AGENT = "llava-mindspore/0.1 (+image loader)"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_KNOWN_SCHEMES = {"http", "https", "file", "ftp", "ftps", "data", "sftp", "s3", "gs", "hdfs", "obs"}


def _name(source) -> str:
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 160 else text[:150] + "...(" + str(len(text)) + " chars)"


def _scheme(text: str) -> Optional[str]:
    m = _SCHEME.match(text)
    if not m:
        return None
    scheme = m.group(1).lower()
    if text[m.end():].startswith("//") or scheme in _KNOWN_SCHEMES:
        return scheme
    return None


def load_image(source, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, allow_paths: bool = True) -> Image.Image:
    """A fully decoded PIL image from a local path, an http(s) or data: URL, or a PIL image; LlavaError
    otherwise."""
    if isinstance(source, Image.Image):
        _check_pixels(source, _name("<PIL image>"), max_pixels)
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise LlavaError(f"image {_name(source)}: expected a file path, an http(s) URL or a PIL image, "
                         f"got {type(source).__name__}")
    text = os.fspath(source)
    name = _name(text)
    if not text.strip():
        raise LlavaError("image '': empty path")
    scheme = _scheme(text)
    if scheme in ("http", "https"):
        data = _read_url(text, name, timeout, max_bytes)
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


def _read_url(url: str, name: str, timeout: float, max_bytes: int) -> bytes:
    """GET with connect/read timeouts, a whole-download deadline and a byte cap (no compressed transfer)."""
    import socket

    import requests  # imported here: only URL inputs need them
    import urllib3

    deadline = time.monotonic() + timeout
    try:
        with requests.Session() as session:
            session.max_redirects = 5
            with session.get(url, stream=True, timeout=(timeout, timeout), allow_redirects=True,
                             headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity",
                                      "Accept": "image/*"}) as resp:
                if not 200 <= resp.status_code < 300:
                    raise LlavaError(f"image {name}: HTTP {resp.status_code} {resp.reason or ''}".rstrip())
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise LimitError(f"image {name}: response is {int(length)} bytes, more than the limit of "
                                     f"{max_bytes} bytes")
                # read1: return as soon as some bytes arrive, so the deadline and the cap are checked
                # while a slow or endless body is still coming in (iter_content would block for a full chunk).
                raw = resp.raw
                read = raw.read1 if hasattr(raw, "read1") else raw.read
                buf = bytearray()
                while True:
                    chunk = read(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise LimitError(f"image {name}: response is more than the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise LlavaError(f"image {name}: download timed out after {timeout:g} s")
                return bytes(buf)
    except LlavaError:
        raise
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout):
        raise LlavaError(f"image {name}: download timed out after {timeout:g} s") from None
    except requests.exceptions.TooManyRedirects:
        raise LlavaError(f"image {name}: too many redirects") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise LlavaError(f"image {name}: download failed ({type(e).__name__})") from None


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
            img = Image.open(io.BytesIO(data))
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
            head = data[:64].lstrip().lower()
            hint = " (looks like HTML/text)" if head.startswith((b"<", b"{")) else ""
            raise LlavaError(f"image {name}: not an image Pillow can read{hint}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise LlavaError(f"image {name}: corrupt or truncated image ({_short(e)})") from None
    return img


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
