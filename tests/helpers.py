"""What the tests (and benchmarks/serve_bench.py) share: paths, the command-line runner, weight conversion,
the tiny yaml writer, predict and its records, the msrun launcher command, free ports, a local HTTP image
server with misbehaving URLs, forged PNGs, OpenAI message parts and a served `run_mindformer.py`.

Test files import these from here (and the Hugging Face side from tests/oracle.py), never from each other.
Plugin modules are importable the way MindFormers' `--register_path research/llava` imports them (top-level
`llava_config`, ...) once this module is imported.
"""
import base64
import http.server
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
FIXTURES = os.path.join(TESTS, "fixtures")
PLUGIN = os.path.join(ROOT, "research", "llava")
for _path in (PLUGIN, FIXTURES, TESTS, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

IMAGES = os.path.join(FIXTURES, "images")
TOKENIZER_MODEL = os.path.join(FIXTURES, "tokenizer.model")
TINY_YAML = os.path.join(PLUGIN, "llava_tiny", "predict_llava_tiny.yaml")
RUN = os.path.join(ROOT, "run_mindformer.py")
CONVERT = os.path.join(ROOT, "convert_weight.py")
LAUNCHER = os.path.join(ROOT, "scripts", "msrun_launcher.sh")

MAX_NEW = 24
PAIRS = [(os.path.join(IMAGES, "chelsea.jpg"), "Describe the image in English:"),
         (os.path.join(IMAGES, "coffee.jpg"), "What is on the table? Answer briefly.")]


# ------------------------------------------------------------------------------------------- command line
def run_cli(args, cwd=ROOT, timeout=600):
    """`python *args` (a script path and its flags) from `cwd`, GLOG_v=3, output captured as text."""
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def convert(hf_dir, out):
    """convert_weight.py an HF folder into the MindSpore checkpoint `out` (asserted to succeed)."""
    proc = run_cli(["convert_weight.py", "--model", "llava", "--input_path", hf_dir, "--output_path", out,
                    "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out


def yaml_for(hf_dir, path, processor=None, top=None, vocab_file=None, drop_vocab=False, **model_overrides):
    """The tiny yaml with model_config shapes taken from an HF checkpoint's config.json, then `model_overrides`
    on model_config, `processor` on the processor section and `top` on the top level. `vocab_file`: a
    tokenizer path instead of the yaml's own; `drop_vocab`: no vocab_file at all."""
    import yaml
    from llava_config import LlavaConfig
    with open(TINY_YAML) as f:
        data = yaml.safe_load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:
        shapes = LlavaConfig.from_hf_config(json.load(f)).to_dict()
    mc = data["model"]["model_config"]
    mc["vision_config"]["model_config"].update(shapes["vision_config"])
    mc["text_config"]["model_config"].update(shapes["text_config"])
    mc.update(model_overrides)
    if vocab_file is not None:
        data["processor"]["tokenizer"]["vocab_file"] = vocab_file
    if drop_vocab:
        del data["processor"]["tokenizer"]["vocab_file"]
    data["processor"].update(processor or {})
    data.update(top or {})
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def predict(yaml_path, ckpt, out_dir, pairs, *extra):
    """run_mindformer.py --run_mode predict on (image, prompt) pairs: (the process, the jsonl records)."""
    items = [x for pair in pairs for x in pair]
    proc = run_cli(["run_mindformer.py", "--config", yaml_path, "--register_path", "research/llava",
                    "--run_mode", "predict", "--predict_data", *items, "--modal_type", "image", "text",
                    "--load_checkpoint", ckpt, "--use_parallel", "False", "--auto_trans_ckpt", "False",
                    "--output_dir", out_dir, "--max_new_tokens", str(MAX_NEW), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, results(out_dir)


def oracle_setups(base, hf_dirs, **yaml_overrides):
    """For each name -> HF folder: dict(hf_dir, ckpt (converted into `base`), yaml (yaml_for with
    `yaml_overrides`), expected (the HF oracle's (ids, text) for PAIRS, MAX_NEW tokens))."""
    from oracle import HFOracle
    out = {}
    for name, hf_dir in hf_dirs.items():
        oracle = HFOracle(hf_dir)
        out[name] = dict(hf_dir=hf_dir, ckpt=convert(hf_dir, str(base / f"{name}.ckpt")),
                         yaml=yaml_for(hf_dir, str(base / f"{name}.yaml"), **yaml_overrides),
                         expected=[oracle.generate(img, prompt, MAX_NEW) for img, prompt in PAIRS])
    return out


def results(out_dir):
    """The records of out_dir/predict_results.jsonl."""
    with open(os.path.join(out_dir, "predict_results.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_records(records, pairs, expected):
    """Each record names its (image, prompt) and holds the expected (ids, text)."""
    assert len(records) == len(pairs)
    for rec, (img, prompt), (ids, text) in zip(records, pairs, expected):
        assert rec["image"] == img and rec["prompt"] == prompt
        assert rec["output_ids"] == ids
        assert rec["output_text"] == text


# ------------------------------------------------------------------------------------------ msrun launcher
def predict_order(yaml_path, ckpt, out_dir, items, auto_trans=True, extra=()):
    """The run_mindformer.py predict command line (one string) that the launcher runs on each rank."""
    return (f"{RUN} --config {yaml_path} --register_path {PLUGIN} --run_mode predict "
            f"--predict_data {' '.join(shlex.quote(x) for x in items)} --modal_type image text "
            f"--load_checkpoint {ckpt} --use_parallel True --auto_trans_ckpt {auto_trans} --output_dir {out_dir} "
            + " ".join(extra))


def launcher_argv(order, workers, port, log_dir, timeout_s, join=True):
    """scripts/msrun_launcher.sh's 6-argument form: EXECUTE_ORDER WORKER_NUM MASTER_PORT LOG_DIR JOIN
    CLUSTER_TIME_OUT."""
    return ["bash", LAUNCHER, order, str(workers), str(port), log_dir, str(join), str(timeout_s)]


def signal_midway(proc, marker, ready, signum, limit=120):
    """Once `marker` (bytes) shows on proc's stderr and ready() holds, send `signum`; (the stderr read before
    the signal, stdout, the rest of stderr), as bytes."""
    seen, deadline = b"", time.monotonic() + limit
    while marker not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert marker in seen, seen
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return seen, stdout, stderr


def interrupt_convert(mid_hf_dir, out, signum, cwd, env=None):
    """Start convert_weight.py on `mid_hf_dir`, wait until the progress bar is up and the temp file is filling,
    send `signum`: (returncode, stderr, stdout, temp file, its size at the signal)."""
    proc = subprocess.Popen([sys.executable, CONVERT, "--model", "llava", "--input_path", mid_hf_dir,
                             "--output_path", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=env)
    tmp = f"{out}.tmp-{proc.pid}"
    sizes = []

    def filling():
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        sizes.append(size)
        return size > 0

    seen, stdout, stderr = signal_midway(proc, b"hf -> ckpt", filling, signum)
    return proc.returncode, (seen + stderr).decode(), stdout.decode(), tmp, sizes[-1]


def config_of(folder, **overrides):
    """LlavaConfig.from_hf_config of an HF folder's config.json (`overrides`: its keyword arguments)."""
    from llava_config import LlavaConfig
    with open(os.path.join(folder, "config.json")) as f:
        return LlavaConfig.from_hf_config(json.load(f), **overrides)


def hf_tensors(folder):
    """name -> numpy array of every tensor in a llava-hf folder, via the safetensors library."""
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="np") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
    return out


def free_port():
    """A TCP port on 127.0.0.1 nobody listens on (just freed by the kernel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------- forged PNGs
def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width, height, bit_depth=8, color_type=2, idat=None):
    """A PNG whose IHDR claims width x height (RGB 8-bit unless told), with the IDAT body `idat` (default: a
    tiny one): Pillow knows the size before decoding anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_header(path, width=20000, height=20000):
    """A file of png_bytes(width, height): a few dozen bytes claiming width x height RGB pixels."""
    with open(path, "wb") as f:
        f.write(png_bytes(width, height))
    return path


def png_bomb(path, side=10000):
    """A valid 1-bit grayscale side x side PNG of zeros: ~12 KB on disk, side**2 pixels when decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    with open(path, "wb") as f:
        f.write(png_bytes(side, side, bit_depth=1, color_type=0, idat=body))
    return path


# --------------------------------------------------------------------------------------- HTTP image server
SLOW_LIMIT = 20.0   # seconds a misbehaving URL keeps its connection open at most


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
        self.seen.append(self.path)
        try:
            self._serve(self.path.split("?")[0])
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass

    def _serve(self, path):
        end = time.monotonic() + SLOW_LIMIT
        if path in ("/cat.jpg", "/photo"):      # /photo: a URL without a file extension
            self._head(200, "image/jpeg", len(self.image_bytes))
            self.wfile.write(self.image_bytes)
        elif path == "/missing.jpg":
            body = b"<html><body>404 Not Found</body></html>"
            self._head(404, "text/html", len(body))
            self.wfile.write(body)
        elif path == "/error.jpg":
            self._head(500, "text/plain", 4)
            self.wfile.write(b"oops")
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
        elif path == "/redirect":                 # /redirect?to=URL: a redirect to any address
            from urllib.parse import parse_qs, urlsplit
            self._head(302, "text/plain", 0, {"Location": parse_qs(urlsplit(self.path).query)["to"][0]})
        else:
            self._head(404, "text/plain", 0)


class ImageServer:
    """http://127.0.0.1:PORT/... in a daemon thread serving `image_path` at /cat.jpg and /photo, misbehaving URLs
    around it (bounded by SLOW_LIMIT); `seen`: every path it was asked for; close() stops it."""

    def __init__(self, image_path):
        self.seen = []
        with open(image_path, "rb") as f:
            handler = type("Handler", (_Handler,), {"image_bytes": f.read(), "seen": self.seen})
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


# --------------------------------------------------------------------------------- OpenAI chat and serving
def data_url(path):
    with open(path, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


def serve_files(folder, hf_dir):
    """The tiny server's yaml (seq_length 512; processor.max_bytes small enough that a forged large image is
    refused with 413) and converted checkpoint in `folder` (a pathlib.Path)."""
    return {"yaml": yaml_for(hf_dir, str(folder / "tiny.yaml"), processor={"max_bytes": 300_000}, seq_length=512),
            "ckpt": convert(hf_dir, str(folder / "tiny.ckpt")), "dir": folder}


class ServerProcess:
    """`run_mindformer.py --run_mode serve` on a free port, waited for until /health answers; `client` is the
    official openai client on it. close() stops it with SIGINT. `private_media`: image URLs may reach private
    and loopback addresses (the tests' image servers are on 127.0.0.1), as --allow_private_media says."""

    def __init__(self, yaml_path, ckpt, out_dir, *extra, private_media=True):
        extra = (*extra, "--allow_private_media") if private_media else extra
        import httpx
        import openai
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        os.makedirs(out_dir, exist_ok=True)
        self.err_path = os.path.join(out_dir, "server.err")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode", "serve",
             "--load_checkpoint", ckpt, "--output_dir", out_dir, "--port", str(self.port), *extra],
            cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("the server did not start: " + self.stderr())
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stderr(self):
        self.err.flush()
        with open(self.err_path) as f:
            return f.read()[-3000:]

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


def our_model(hf_config, hf_dir, seq_length):
    """Our LlavaModel for an HF-layout folder (its config.json as a dict), its safetensors loaded strictly."""
    import glob
    from safetensors.numpy import load_file
    from llava_config import LlavaConfig
    from llava_model import LlavaModel, load_weights
    model = LlavaModel(LlavaConfig.from_hf_config(hf_config, seq_length=seq_length))
    weights = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        weights.update(load_file(path))
    load_weights(model, weights)
    return model
