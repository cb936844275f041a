"""[N] Hostile inputs, second round: images that would start a program, aspect-ratio bombs, servers that trickle,
URLs that carry credentials, sampling numbers that vanish in float32.

The faults are data tables, one per class, each row a crafted input and what the refusal must say:

* FORMATS: files in formats other than the accepted photo formats, under photo file names (an EPS named .jpg).
  They run in one fresh subprocess whose PATH starts with a fake `gs` that would create a marker file; the
  same subprocess then opens the EPS with plain Pillow, which must create the marker: so the fake would have
  been seen had our loader started Ghostscript.
* ASPECT: images whose decoded size is small but whose padded or resized copy would not be; the figures in
  the messages are computed here by hand from the CLIP rule (short side -> image_size, long side scaled).
* SLOW_SERVERS: real local sockets that trickle the status line, the headers or the body one byte at a time;
  the whole download must end at the time-out, and the server side must see its connection closed.
* MASKED_URLS: URLs with user-info and a query in every kind of URL failure.
* SAMPLING: temperature / top_p / repetition_penalty that are 0, subnormal or infinite in float32.

A representative subset runs through `run_mindformer.py --run_mode predict` from an empty folder (CLI_CASES),
each asserting exit code 2, the one-line `run_mindformer.py: error: ...` naming the input, no traceback, an
empty stdout, nothing written in the output folder or outside it, and no external program started; the served
tiny model answers the same inputs with OpenAI-style 400 / 413 errors.
"""
import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from helpers import IMAGES, PLUGIN, RUN, TOKENIZER_MODEL, ImageServer, free_port, image_part, png_bytes, text_part, \
    yaml_for
from image_loading import load_image
from llava_errors import LimitError, LlavaError

CAT = os.path.join(IMAGES, "chelsea.jpg")
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, TIFF"
MAX_PIXELS = 89_478_485          # processor.max_pixels' default (Pillow's decompression-bomb limit)
NET_TIMEOUT = 2                  # processor.timeout in the CLI's URL yaml (seconds)
SECRETS = ("s3cret", "tok3n", "fr4g")
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def secret_url(base):
    """`base` (http://host:port/path) with a user:password and a query and a fragment holding secrets."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://alice:s3cret@{rest}?sig=tok3n&x=1#fr4g"


def masked(base):
    """How the error must name secret_url(base): user-info and query replaced by ***."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://***@{rest}?***#***"


def one_line(message):
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ------------------------------------------------------------------------------------------- crafted files
def _pattern(width=40, height=30):
    return (np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)


def _saved(fmt, mode="RGB", **kw):
    from PIL import Image
    img = Image.fromarray(_pattern()).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def eps_dos_binary():
    """A DOS EPS binary file: the C5 D0 D3 C6 header, then the PostScript section it points at."""
    import struct
    header = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff"
    return header + EPS


def zeros_png(width, height):
    """A valid RGB PNG of zeros (a few KB even for 400000 rows): Pillow decodes it completely."""
    return png_bytes(width, height, idat=zlib.compress(b"\0" * ((1 + 3 * width) * height), 9))


# (case, file name, bytes, words the error must contain): every one named like a photo
FORMATS = [
    ("eps_named_jpg", "holiday.jpg", lambda: EPS, ["holiday.jpg", "EPS", ACCEPTED]),
    ("eps_dos_binary_named_png", "scan.png", eps_dos_binary, ["scan.png", "EPS", ACCEPTED]),
    ("eps_written_by_pillow", "photo.jpeg", lambda: _saved("EPS"), ["photo.jpeg", "EPS", ACCEPTED]),
    ("ppm", "a.jpg", lambda: _saved("PPM"), ["a.jpg", "PPM", ACCEPTED]),
    ("ico", "b.png", lambda: _saved("ICO"), ["b.png", "ICO", ACCEPTED]),
    ("pcx", "c.jpg", lambda: _saved("PCX"), ["c.jpg", "PCX", ACCEPTED]),
    ("sgi", "d.webp", lambda: _saved("SGI"), ["d.webp", "SGI", ACCEPTED]),
    ("xbm", "e.gif", lambda: _saved("XBM", mode="1"), ["e.gif", "XBM", ACCEPTED]),
    ("qoi", "f.bmp", lambda: _saved("QOI"), ["f.bmp", "QOI", ACCEPTED]),
    ("pdf", "g.tiff", lambda: _saved("PDF"), ["g.tiff", "not an image Pillow can read", ACCEPTED]),
]

_PROBE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from image_loading import load_image
from llava_errors import LlavaError
cases, marker, eps = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {}
for name, source in cases:
    try:
        load_image(source, timeout=10)
        out[name] = ["loaded", os.path.exists(marker)]
    except LlavaError as e:
        out[name] = [str(e), os.path.exists(marker)]
from PIL import Image   # the control: plain Pillow on the same EPS file
try:
    Image.open(eps).load()
except Exception as e:
    pass
out["_control_marker"] = os.path.exists(marker)
print(json.dumps(out))
"""


def fake_gs(folder):
    """folder/bin/gs: a `gs` that creates folder/gs-ran when started; (the bin folder, the marker path)."""
    bin_dir, marker = os.path.join(folder, "bin"), os.path.join(folder, "gs-ran")
    os.makedirs(bin_dir, exist_ok=True)
    with open(os.path.join(bin_dir, "gs"), "w") as f:
        f.write(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    os.chmod(os.path.join(bin_dir, "gs"), 0o755)
    return bin_dir, marker


@pytest.fixture(scope="module")
def format_results(tmp_path_factory):
    """Every FORMATS file, the EPS as a URL (served as image/jpeg at /cat.jpg) and as a data:image/jpeg URL,
    loaded in one subprocess with the fake gs first on PATH: name -> (message, marker existed after it)."""
    d = str(tmp_path_factory.mktemp("formats"))
    cases = []
    for name, filename, make, _ in FORMATS:
        path = os.path.join(d, name + "-" + filename)
        with open(path, "wb") as f:
            f.write(make())
        cases.append((name, path))
    eps = os.path.join(d, "eps_named_jpg-holiday.jpg")
    server = ImageServer(eps)
    cases.append(("eps_url", server.url("/cat.jpg")))
    cases.append(("eps_data_url", "data:image/jpeg;base64," + base64.b64encode(EPS).decode()))
    bin_dir, marker = fake_gs(d)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], NO_PROXY="127.0.0.1")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, PLUGIN, json.dumps(cases), marker, eps], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    results["_server_url"] = server.url("/cat.jpg")
    return results


def test_the_fake_gs_would_have_been_seen(format_results):
    """Plain Pillow runs `gs` on the EPS file: the marker exists after the control, so the fault cases'
    missing marker means our loader started no program."""
    assert format_results["_control_marker"] is True


@pytest.mark.parametrize("name,filename,make,words", FORMATS, ids=[c[0] for c in FORMATS])
def test_other_formats_are_refused_by_content(name, filename, make, words, format_results):
    message, marker = format_results[name]
    assert marker is False, "an external program was started"
    one_line(message)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("name,words", [("eps_url", ["/cat.jpg", "EPS", ACCEPTED]),
                                        ("eps_data_url", ["data:image/jpeg;base64,", "EPS", ACCEPTED])])
def test_eps_behind_a_url_is_refused(name, words, format_results):
    message, marker = format_results[name]
    assert marker is False, "an external program was started"
    one_line(message)
    for word in words:
        assert word in message, (word, message)


# (format, Pillow save options, lossless): the accepted formats, saved under a misleading name
ACCEPTED_FORMATS = [("JPEG", {"quality": 95}, False), ("PNG", {}, True), ("WEBP", {"lossless": True}, True),
                    ("GIF", {}, False), ("BMP", {}, True), ("TIFF", {}, True)]


@pytest.mark.parametrize("fmt,options,lossless", ACCEPTED_FORMATS, ids=[c[0] for c in ACCEPTED_FORMATS])
def test_accepted_formats_load_whatever_their_name(fmt, options, lossless, tmp_path):
    path = tmp_path / "named_like_postscript.eps"
    path.write_bytes(_saved(fmt, **options))
    img = load_image(str(path))
    assert img.format in (fmt, "MPO") and img.size == (40, 30)
    if lossless:
        assert np.array_equal(np.asarray(img.convert("RGB")), _pattern())


# ------------------------------------------------------------------------------ intermediate image sizes
# (case, width, height, image_size, aspect ratio, max_pixels, the figures the refusal must give); the
# intermediate sizes by hand: crop resizes the short side to S and the long one to int(S * long / short); pad
# first makes a square of the long side.
ASPECT = [
    ("tall_1x400000_crop", 1, 400000, 336, "crop", MAX_PIXELS,
     ["1x400000", "336x134400000 = 45158400000 pixels", f"limit of {MAX_PIXELS}", "processor.max_pixels"]),
    ("wide_20000x1_crop", 20000, 1, 336, "crop", MAX_PIXELS,
     ["20000x1", "6720000x336 = 2257920000 pixels", f"limit of {MAX_PIXELS}"]),
    ("tall_1x400000_pad", 1, 400000, 336, "pad", MAX_PIXELS,
     ["1x400000", "padded to a square", "400000x400000 = 160000000000 pixels"]),
    ("wide_20000x1_pad", 20000, 1, 336, "pad", MAX_PIXELS, ["20000x20000 = 400000000 pixels"]),
    ("panorama_pad", 12000, 300, 336, "pad", MAX_PIXELS, ["12000x300", "12000x12000 = 144000000 pixels"]),
    ("wide_300x1_lower_limit", 300, 1, 336, "crop", 1_000_000, ["100800x336 = 33868800 pixels", "limit of 1000000"]),
    ("tiny_model_tall", 1, 50000, 112, "crop", MAX_PIXELS, ["112x5600000 = 627200000 pixels"]),
]


def _clip_pixels():
    from llava_processor import clip_pixels
    return clip_pixels


@pytest.mark.parametrize("name,width,height,size,aspect,limit,words", ASPECT, ids=[c[0] for c in ASPECT])
def test_intermediate_images_are_bounded(name, width, height, size, aspect, limit, words, tmp_path):
    path = tmp_path / f"{name}.png"
    path.write_bytes(zeros_png(width, height))
    img = load_image(str(path), max_pixels=limit)       # the decoded image itself is within the limit
    assert img.size == (width, height)
    clip_pixels = _clip_pixels()
    start = time.monotonic()
    with pytest.raises(LimitError) as err:
        clip_pixels([img], size, aspect, max_pixels=limit, names=[str(path)])
    assert time.monotonic() - start < 0.5
    message = one_line(str(err.value))
    for word in [str(path), *words]:
        assert word in message, (word, message)


@pytest.mark.parametrize("width,height,aspect", [(336, 20000, "crop"), (20000, 336, "crop"), (4000, 3000, "pad")])
def test_long_but_bounded_images_still_work(width, height, aspect, tmp_path):
    """A 1:60 strip resizes to 336 x 20000 (6.7 M pixels): within the limit, processed as before."""
    path = tmp_path / "strip.png"
    path.write_bytes(zeros_png(width, height))
    out = _clip_pixels()([load_image(str(path))], 336, aspect)
    assert out.shape == (1, 3, 336, 336) and np.isfinite(out).all()


_MEMORY_PROBE = r"""
import resource, sys, time, zlib, struct
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
from helpers import png_bytes
from image_loading import load_image
from llava_errors import LimitError
from llava_processor import clip_pixels
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, width, height, aspect = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
with open(path, "wb") as f:
    f.write(png_bytes(width, height, idat=zlib.compress(b"\0" * ((1 + 3 * width) * height), 9)))
before, start = peak(), time.monotonic()
try:
    clip_pixels([load_image(path)], 336, aspect)
    print("accepted")
except LimitError as e:
    print(time.monotonic() - start, peak() - before, e)
"""


@pytest.mark.parametrize("width,height,aspect", [(1, 400000, "crop"), (20000, 1, "crop"), (20000, 1, "pad")])
def test_aspect_bombs_are_refused_cheaply(width, height, aspect, tmp_path):
    """In a fresh process: the peak memory grows by less than 64 MB and the refusal takes under a second (the
    unbounded resize took 3.4 GB and 46 s for 20000 x 1, and 12.7 GB for 1 x 400000)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, PLUGIN, tests, str(tmp_path / "bomb.png"),
                           str(width), str(height), aspect], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, GLOG_v="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, grown, message = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert float(seconds) < 1.0 and int(grown) < 64 * 2 ** 20, (seconds, grown)
    assert f"{width}x{height}" in message and "processor.max_pixels" in message


# ------------------------------------------------------------------------------------------- slow servers
class TrickleServer:
    """127.0.0.1: each connection reads the request, sends `head` at once, then one byte of `tail` every `gap`
    seconds (for at most `limit` seconds). `held` records, per connection, how long it stayed open until the
    client closed it (a send failed) or the trickle ended."""

    def __init__(self, head, tail, gap=0.2, limit=15.0):
        self.head, self.tail, self.gap, self.limit = head, tail, gap, limit
        self.held = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        start = time.monotonic()
        try:
            conn.recv(65536)
            conn.sendall(self.head)
            for i in range(len(self.tail)):
                if time.monotonic() - start > self.limit:
                    break
                time.sleep(self.gap)
                conn.sendall(self.tail[i:i + 1])
        except OSError:
            pass
        finally:
            self.held.append(time.monotonic() - start)
            conn.close()

    def close(self):
        self.sock.close()


JPEG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
# (case, bytes sent at once, bytes trickled one at a time)
SLOW_SERVERS = [
    ("status_line_trickled", b"", b"HTTP/1.1 200 OK\r\n" + b"X" * 500),
    ("headers_trickled", b"HTTP/1.1 200 OK\r\n", b"X-Padding: " + b"a" * 1000),
    ("header_lines_trickled", b"HTTP/1.1 200 OK\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(200))),
    ("body_trickled", JPEG_HEAD, b"\xff\xd8\xff" + b"\0" * 1000),
    ("body_without_length_trickled", b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n", b"\xff\xd8" * 500),
]


@pytest.mark.parametrize("name,head,tail", SLOW_SERVERS, ids=[c[0] for c in SLOW_SERVERS])
def test_the_timeout_covers_the_whole_download(name, head, tail):
    server = TrickleServer(head, tail)
    try:
        start = time.monotonic()
        with pytest.raises(LlavaError) as err:
            load_image(secret_url(server.url("/slow.jpg")), timeout=1.0)
        seconds = time.monotonic() - start
        message = one_line(str(err.value))
        assert 0.9 < seconds < 1.6, seconds
        assert "timed out after 1 s" in message and "processor.timeout" in message, message
        assert masked(server.url("/slow.jpg")) in message, message
        assert not any(s in message for s in SECRETS), message
        deadline = time.monotonic() + 3
        while not server.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.held and server.held[0] < 2.5, "the connection was left open after the time-out"
        assert not [t for t in threading.enumerate() if t.name == "image-download"]
    finally:
        server.close()


def test_a_fast_server_within_the_timeout_still_loads():
    with open(CAT, "rb") as f:
        data = f.read()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
    server = TrickleServer(head + data, b"")
    try:
        img = load_image(server.url("/cat.jpg"), timeout=5)
        assert np.array_equal(np.asarray(img), np.asarray(load_image(CAT)))
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ masked URLs
@pytest.fixture(scope="module")
def images():
    server = ImageServer(CAT)
    yield server
    server.close()


# (case, URL builder given the image server, words in the error)
MASKED_URLS = [
    ("http_404", lambda s: s.url("/missing.jpg"), ["HTTP 404"]),
    ("html_page", lambda s: s.url("/page.jpg"), ["not an image"]),
    ("stalled", lambda s: s.url("/stall.jpg"), ["timed out"]),
    ("redirect_loop", lambda s: s.url("/loop.jpg"), ["too many redirects"]),
    ("connection_refused", lambda s: f"http://127.0.0.1:{free_port()}/x.jpg", ["download failed"]),
    ("over_the_byte_cap", lambda s: s.url("/huge.jpg"), ["more than the limit"]),
    ("unsupported_scheme", lambda s: "ftp://127.0.0.1/x.jpg", ["unsupported scheme 'ftp:'"]),
]


@pytest.mark.parametrize("name,build,words", MASKED_URLS, ids=[c[0] for c in MASKED_URLS])
def test_urls_in_errors_are_masked(name, build, words, images):
    base = build(images)
    with pytest.raises(LlavaError) as err:
        load_image(secret_url(base), timeout=1.0, max_bytes=1_000_000)
    message = one_line(str(err.value))
    assert masked(base) in message, message
    assert not any(s in message for s in SECRETS + ("alice",)), message
    for word in words:
        assert word in message, (word, message)


def test_a_plain_url_is_named_as_given(images):
    with pytest.raises(LlavaError, match="HTTP 404") as err:
        load_image(images.url("/missing.jpg"))
    assert str(err.value) == f"image {images.url('/missing.jpg')}: HTTP 404 Not Found"


# ------------------------------------------------------------------------------------------- sampling
# (case, setting, value, words): every value passes the plain range checks as a Python float
SAMPLING = [
    ("temperature_1e-320_is_zero", "temperature", 1e-320, ["temperature=1e-320", "is 0 in float32"]),
    ("temperature_5e-324_is_zero", "temperature", 5e-324, ["is 0 in float32"]),
    ("temperature_subnormal", "temperature", 1e-39, ["subnormal", "at least 1.18e-38"]),
    ("top_p_1e-320_is_zero", "top_p", 1e-320, ["top_p=1e-320", "is 0 in float32"]),
    ("repetition_penalty_1e39_is_inf", "repetition_penalty", 1e39, ["is infinite in float32", "at most 3.4e+38"]),
    ("repetition_penalty_1e-45_is_subnormal", "repetition_penalty", 1e-45, ["subnormal"]),
]


@pytest.mark.parametrize("name,key,value,words", SAMPLING, ids=[c[0] for c in SAMPLING])
def test_sampling_numbers_are_checked_in_float32(name, key, value, words):
    from generation import GenerationSettings
    with np.errstate(over="ignore", under="ignore"):   # the table's premise: float32 loses the value
        as32 = np.float32(value)
    assert as32 == 0 or not np.isfinite(as32) or abs(as32) < 1.18e-38
    with pytest.raises(LlavaError) as err:
        GenerationSettings(do_sample=True, **{key: value}).validate()
    message = one_line(str(err.value))
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("key,value", [("temperature", 1e-30), ("temperature", 1.2e-38), ("top_p", 1e-30),
                                       ("repetition_penalty", 3e38)])
def test_small_and_large_float32_numbers_still_pass(key, value):
    from generation import GenerationSettings
    GenerationSettings(do_sample=True, **{key: value}).validate()


# ---------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_hf_dir):
    """Inputs of the CLI cases: the tiny llava-hf folder as --load_checkpoint, yamls, crafted files, servers."""
    d = str(tmp_path_factory.mktemp("hostile_cli"))
    e = {"dir": d, "ckpt": tiny_hf_dir}
    e["yaml"] = yaml_for(tiny_hf_dir, os.path.join(d, "tiny.yaml"), vocab_file=TOKENIZER_MODEL)
    e["net_yaml"] = yaml_for(tiny_hf_dir, os.path.join(d, "net.yaml"), vocab_file=TOKENIZER_MODEL,
                             processor={"timeout": NET_TIMEOUT})
    with open(os.path.join(tiny_hf_dir, "config.json")) as f:
        e["image_size"] = json.load(f)["vision_config"]["image_size"]
    for name, data in (("holiday.jpg", EPS), ("scan.png", eps_dos_binary()), ("tall.png", zeros_png(1, 400000)),
                       ("wide.png", zeros_png(20000, 1))):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    e["eps_server"] = ImageServer(os.path.join(d, "holiday.jpg"))
    e["images"] = ImageServer(CAT)
    e["headers"] = TrickleServer(b"HTTP/1.1 200 OK\r\n", b"X-Padding: " + b"a" * 1000, gap=0.5, limit=30)
    yield e
    for key in ("eps_server", "images", "headers"):
        e[key].close()


def _cli_cases(e):
    """(case, --predict_data image, yaml, extra flags, words in the last stderr line, words it must not hold,
    at most this many seconds or None)."""
    s = e["image_size"]
    d = e["dir"]
    trickle = e["headers"].url("/slow.jpg")
    return [
        ("eps_named_jpg", os.path.join(d, "holiday.jpg"), "yaml", (), ["holiday.jpg", "EPS", ACCEPTED], (), 15),
        ("eps_dos_binary_named_png", os.path.join(d, "scan.png"), "yaml", (), ["scan.png", "EPS"], (), 15),
        ("eps_url", e["eps_server"].url("/cat.jpg"), "net_yaml", (), ["/cat.jpg", "EPS"], (), 15),
        ("tall_1x400000", os.path.join(d, "tall.png"), "yaml", (),
         ["1x400000", f"{s}x{400000 * s} = {s * 400000 * s} pixels", f"limit of {MAX_PIXELS}"], (), None),
        ("wide_20000x1", os.path.join(d, "wide.png"), "yaml", (),
         ["20000x1", f"{20000 * s}x{s} = {20000 * s * s} pixels", f"limit of {MAX_PIXELS}"], (), None),
        ("url_headers_trickled", secret_url(trickle), "net_yaml", (),
         [f"timed out after {NET_TIMEOUT} s", masked(trickle)], SECRETS, NET_TIMEOUT + 8),
        ("url_body_trickled", secret_url(e["images"].url("/trickle.jpg")), "net_yaml", (),
         [f"timed out after {NET_TIMEOUT} s", masked(e["images"].url("/trickle.jpg"))], SECRETS, NET_TIMEOUT + 8),
        ("url_404_masked", secret_url(e["images"].url("/missing.jpg")), "net_yaml", (),
         ["HTTP 404", masked(e["images"].url("/missing.jpg"))], SECRETS, 15),
        ("temperature_1e-320", CAT, "yaml", ("--do_sample", "True", "--temperature", "1e-320"),
         ["temperature=1e-320", "0 in float32"], (), None),
        ("repetition_penalty_1e39", CAT, "yaml", ("--repetition_penalty", "1e39"),
         ["repetition_penalty=1e+39", "infinite in float32"], (), None),
    ]


CLI_NAMES = ["eps_named_jpg", "eps_dos_binary_named_png", "eps_url", "tall_1x400000", "wide_20000x1",
             "url_headers_trickled", "url_body_trickled", "url_404_masked", "temperature_1e-320",
             "repetition_penalty_1e39"]


def _run_case(e, case):
    name, image, yaml_key, extra, _, _, _ = case
    work = os.path.join(e["dir"], "runs", name)
    cwd, tmp = os.path.join(work, "cwd"), os.path.join(work, "tmp")
    os.makedirs(cwd)
    os.makedirs(tmp)
    out = os.path.join(cwd, "out")
    bin_dir, marker = fake_gs(work)
    env = dict(os.environ, GLOG_v="3", TMPDIR=tmp, PATH=bin_dir + os.pathsep + os.environ["PATH"],
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("LOG_MF_PATH", None)
    argv = [sys.executable, RUN, "--config", e[yaml_key], "--register_path", PLUGIN, "--run_mode", "predict",
            "--predict_data", image, "Describe the image.", "--modal_type", "image", "text",
            "--load_checkpoint", e["ckpt"], "--use_parallel", "False", "--auto_trans_ckpt", "False",
            "--output_dir", out, "--max_new_tokens", "4", *extra]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return dict(proc=proc, seconds=time.monotonic() - start, cwd=cwd, out=out, tmp=tmp, marker=marker)


@pytest.fixture(scope="module")
def cli_runs(cli):
    """Every CLI case, two at a time (2 cores): name -> its run."""
    cases = {c[0]: c for c in _cli_cases(cli)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run_case, cli, case) for name, case in cases.items()}
        return {name: (cases[name], f.result()) for name, f in futures.items()}


def _left_behind(run):
    """Files outside MindFormers' own log folder in out/, anything else in the working folder or TMPDIR."""
    stray = [n for n in os.listdir(run["cwd"]) if n != "out"]
    for dirpath, _, filenames in os.walk(run["out"]):
        rel = os.path.relpath(dirpath, run["out"])
        if rel != "log" and not rel.startswith("log" + os.sep):
            stray += [os.path.join(rel, n) for n in filenames]
    return stray + os.listdir(run["tmp"])


@pytest.mark.parametrize("name", CLI_NAMES)
def test_predict_refuses_hostile_inputs(name, cli_runs):
    case, run = cli_runs[name]
    _, _, _, _, words, absent, max_seconds = case
    p = run["proc"]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    why = f"exit {p.returncode} after {run['seconds']:.1f} s; stderr tail:\n{p.stderr[-2500:]}"
    assert p.returncode == 2, why
    assert "Traceback" not in p.stderr, why
    assert last.startswith("run_mindformer.py: error: "), why
    for word in words:
        assert word in last, (word, why)
    for word in absent:
        assert word not in p.stderr, (word, why)
    assert p.stdout.strip() == "", why
    assert _left_behind(run) == [], why
    assert not os.path.exists(run["marker"]), "an external program was started"
    if max_seconds is not None:
        assert run["seconds"] < max_seconds, why


# ---------------------------------------------------------------------------------------------- the server
def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _data(kind, data):
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


# (case, message builder given the image servers, status, words in the error message, words it must not hold)
SERVED = [
    ("eps_data_url", lambda s: _user(image_part(_data("jpeg", EPS)), text_part("?")), 400, ["EPS", ACCEPTED], ()),
    ("eps_url", lambda s: _user(image_part(s["eps"].url("/cat.jpg")), text_part("?")), 400, ["EPS"], ()),
    ("ppm_data_url", lambda s: _user(image_part(_data("png", _saved("PPM"))), text_part("?")), 400, ["PPM"], ()),
    ("tall_1x400000", lambda s: _user(image_part(_data("png", zeros_png(1, 400000))), text_part("?")), 413,
     ["1x400000", "processor.max_pixels"], ()),
    ("wide_20000x1", lambda s: _user(image_part(_data("png", zeros_png(20000, 1))), text_part("?")), 413,
     ["20000x1", "processor.max_pixels"], ()),
    ("url_404_masked", lambda s: _user(image_part(secret_url(s["cat"].url("/missing.jpg"))), text_part("?")),
     400, ["could not be fetched", "http://***@127.0.0.1:"], SECRETS),
]


@pytest.fixture(scope="module")
def served_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    (d / "x.jpg").write_bytes(EPS)
    servers = {"eps": ImageServer(str(d / "x.jpg")), "cat": ImageServer(CAT)}
    yield servers
    for s in servers.values():
        s.close()


@pytest.mark.parametrize("name,build,status,words,absent", SERVED, ids=[c[0] for c in SERVED])
def test_server_answers_hostile_images_with_openai_errors(name, build, status, words, absent, server,
                                                          served_images):
    import httpx
    r = httpx.post(server.base + "/v1/chat/completions", json={"messages": build(served_images), "max_tokens": 2},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages[0].content[0].image_url.url"
    for word in words:
        assert word in error["message"], (word, error)
    for word in absent:
        assert word not in r.text, (word, r.text)
    assert "Traceback" not in r.text
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_server_refuses_a_temperature_that_is_zero_in_float32(server):
    import httpx
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                   json={"messages": _user(text_part("hi")), "temperature": 1e-320, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert "float32" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ chat
def test_chat_refuses_hostile_images_and_goes_on(cli):
    """`/image` with an EPS named .jpg (the fake gs first on PATH) and a 1 x 400000 strip: one error line each,
    no program started, and the conversation goes on."""
    d = cli["dir"]
    bin_dir, marker = fake_gs(os.path.join(d, "chat"))
    env = dict(os.environ, GLOG_v="3", PATH=bin_dir + os.pathsep + os.environ["PATH"])
    s = cli["image_size"]
    proc = subprocess.run(
        [sys.executable, RUN, "--config", cli["yaml"], "--run_mode", "chat", "--load_checkpoint", cli["ckpt"],
         "--output_dir", os.path.join(d, "chat", "out"), "--max_new_tokens", "4"],
        input=f"/image {os.path.join(d, 'holiday.jpg')}\n/image {os.path.join(d, 'tall.png')}\nHi\n/exit\n",
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error: image" in line]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "holiday.jpg" in errors[0] and "EPS" in errors[0] and ACCEPTED in errors[0]
    assert "tall.png" in errors[1] and f"{s}x{400000 * s}" in errors[1] and "processor.max_pixels" in errors[1]
    assert "attached" not in proc.stderr
    assert not os.path.exists(marker), "an external program was started"
    assert [line for line in proc.stdout.splitlines() if line.lstrip("> ").strip()], proc.stdout
