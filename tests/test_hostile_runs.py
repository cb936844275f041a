"""[N] Hostile runs: a full disk, a busy or oddly named launcher setup, non-UTF-8 arguments, absurd sizes in the
yaml, conflicting length flags and Ctrl-C while the answer streams.

Every fault case is a row of a table and runs the real command as a subprocess from a fresh empty folder; it
checks the exit code, that the LAST stderr line is the one-line message naming the input (`<prog>: error: ...`),
that there is no traceback, that stdout is empty and that nothing is half-written (no results file, or the one
that was there byte for byte as it was).

Full disks are real: the tests run as root and mount small tmpfs file systems (`mount -t tmpfs -o size=...`),
fill them with a file of zeros until the kernel says ENOSPC, and unmount them afterwards. A tmpfs allocates
whole pages, so a results file whose last page is partly used takes the first bytes of an append and then
refuses the rest: exactly the short write that used to leave half a record without its newline.
"""
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import (IMAGES, LAUNCHER, MAX_NEW, PAIRS, RUN, TOKENIZER_MODEL, convert, free_port,
                     launcher_argv, predict_order, yaml_for)

CAT = os.path.join(IMAGES, "chelsea.jpg")
PROMPT = "Describe the image in English:"
GIB = 1024 ** 3


# ------------------------------------------------------------------------------------------------ harness
@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` (e.g. "64k") mounted at `path` for the duration."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"these tests mount a tmpfs (they run as root): {done.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def fill(folder):
    """Write zeros into folder/filler, a page at a time, until the disk refuses (ENOSPC)."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
    assert e.value.errno == errno.ENOSPC
    assert os.statvfs(folder).f_bavail == 0


def jsonl_of(size):
    """Valid JSONL bytes of exactly `size` bytes (records of a previous run)."""
    line = json.dumps({"image": "old.jpg", "prompt": "p", "output_text": "x" * 30, "output_ids": [1]}) + "\n"
    lines, total = [], 0
    while size - total >= len(line) + len('{"pad": ""}\n'):
        lines.append(line)
        total += len(line)
    pad = size - total - len('{"pad": ""}\n')
    lines.append(json.dumps({"pad": "y" * pad}) + "\n")
    data = "".join(lines).encode()
    assert len(data) == size
    return data


def run_cmd(argv, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, GLOG_v="3")
    env.pop("LOG_MF_PATH", None)            # the product decides where MindFormers' log goes
    env.update(env_extra or {})
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    proc.seconds = time.monotonic() - start
    proc.out = proc.stdout.decode("utf-8", "replace")
    proc.err = proc.stderr.decode("utf-8", "replace")
    return proc


def predict_argv(yaml_path, ckpt, out, items, *extra):
    return [sys.executable, RUN, "--config", yaml_path, "--run_mode", "predict", "--predict_data", *items,
            "--load_checkpoint", ckpt, "--output_dir", out, *extra]


def check_error(proc, prog, needles, rc=2, max_seconds=None):
    """The one-line error: exit code, last stderr line, no traceback, stdout empty."""
    lines = [line for line in proc.err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    why = f"exit {proc.returncode} after {proc.seconds:.1f} s; last stderr line {last!r}; stderr:\n{proc.err[-2500:]}"
    assert proc.returncode == rc, why
    assert "Traceback" not in proc.err and "Logging error" not in proc.err, why
    assert last.startswith(f"{prog}: error: "), why
    for needle in needles:
        assert needle in last, (needle, why)
    assert proc.out.strip() == "", (proc.out, why)
    if max_seconds is not None:
        assert proc.seconds < max_seconds, why
    return last


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_hf_dir):
    base = tmp_path_factory.mktemp("hostile")
    yaml_path = yaml_for(tiny_hf_dir, str(base / "tiny.yaml"), vocab_file=TOKENIZER_MODEL)
    return dict(base=base, hf=tiny_hf_dir, yaml=yaml_path, ckpt=convert(tiny_hf_dir, str(base / "tiny.ckpt")))


@pytest.fixture(scope="module")
def oracle(env):
    from oracle import HFOracle
    return HFOracle(env["hf"])


def fresh(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return str(cwd)


# ------------------------------------------------------------------ class 4: a full disk before the start
# (tmpfs size, bytes left free, an existing results file of this many bytes or None, needles)
FULL_BEFORE_START = {
    "tmpfs filled to the last page": ("64k", 0, None, ["is full (No space left on device)"]),
    "full, with results of earlier runs": ("64k", 0, 4000, ["is full (No space left on device)"]),
    "less than 1 MiB left": ("2m", 512 << 10, None, ["is nearly full, at least 1.0 MiB is needed"]),
}


@pytest.mark.parametrize("name", list(FULL_BEFORE_START))
def test_full_disk_is_refused_before_the_start(env, tmp_path, name):
    size, left, existing, needles = FULL_BEFORE_START[name]
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt, size):
        out = os.path.join(mnt, "out")
        os.makedirs(out)
        results = os.path.join(out, "predict_results.jsonl")
        old = jsonl_of(existing) if existing else None
        if old:
            with open(results, "wb") as f:
                f.write(old)
        if left:
            with open(os.path.join(mnt, "filler"), "wb") as f:
                f.write(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - left))
        else:
            fill(mnt)
        proc = run_cmd(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT]), fresh(tmp_path))
        last = check_error(proc, "run_mindformer.py", [f"--output_dir {out}: the disk mounted at {mnt}", *needles],
                           max_seconds=15)       # before MindSpore is imported
        if old:
            with open(results, "rb") as f:
                assert f.read() == old
        else:
            assert os.listdir(out) == [], last      # no probe, no results, no log
        assert not [n for n in os.listdir(out) if n.startswith(".write-test")]


# -------------------------------------------------- class 4: the disk fills while records are appended
# (existing results bytes or None, number of records): a partly used last page takes the first bytes of the
# append (a short write) unless the file ends on a page boundary
APPEND_ON_FULL_DISK = {
    "short write into the last page": (4000, 1),
    "short write, two records": (3000, 2),
    "file ends on a page boundary": (4096, 1),
    "no results file yet": (None, 2),
}


def records(n):
    return [{"image": f"/photos/{i}.jpg", "prompt": "Describe the image in English:",
             "output_text": "a cat on a sofa " * 20, "output_ids": list(range(100 + i, 160 + i))} for i in range(n)]


@pytest.mark.parametrize("name", list(APPEND_ON_FULL_DISK))
def test_records_are_appended_whole_or_not_at_all(tmp_path, name):
    from llava_errors import LlavaError
    from llava_predict import write_results
    existing, count = APPEND_ON_FULL_DISK[name]
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt, "64k"):
        path = os.path.join(mnt, "predict_results.jsonl")
        old = jsonl_of(existing) if existing else None
        if old:
            with open(path, "wb") as f:
                f.write(old)
        fill(mnt)
        with pytest.raises(LlavaError) as e:
            write_results(mnt, records(count))
        message = str(e.value)
        assert message.startswith(f"cannot append to {path}: the disk mounted at {mnt} (0 bytes free) is full")
        assert f"none of the {count} answer(s) was saved" in message and "\n" not in message
        if old:
            with open(path, "rb") as f:
                assert f.read() == old                       # byte for byte: no partial record
        else:
            assert not os.path.exists(path)
        # room again: the next append starts on a line of its own
        os.unlink(os.path.join(mnt, "filler"))
        write_results(mnt, records(count))
        with open(path, "rb") as f:
            data = f.read()
        assert data == (old or b"") + b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                                               for r in records(count))
        assert all(json.loads(line) for line in data.splitlines())


def test_a_plain_append_on_the_same_disk_leaves_half_a_record(tmp_path):
    """The control for the table above: the same full tmpfs really does take part of an append."""
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt, "64k"):
        path = os.path.join(mnt, "predict_results.jsonl")
        with open(path, "wb") as f:
            f.write(jsonl_of(4000))
        fill(mnt)
        with pytest.raises(OSError):
            with open(path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records(1)))
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == 4096 and not data.endswith(b"\n")


@pytest.mark.slow
def test_disk_filling_during_the_run_loses_nothing_and_logs_quietly(env, tmp_path):
    """The disk fills while the answer streams (the process is stopped, the disk filled, the process resumed):
    the results file keeps its earlier records byte for byte, the error names the disk, and the log writes
    that now fail (the console log is on the same disk) print no "--- Logging error ---"."""
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt, "2m"):
        out = os.path.join(mnt, "out")
        os.makedirs(out)
        results = os.path.join(out, "predict_results.jsonl")
        old = jsonl_of(4000)
        with open(results, "wb") as f:
            f.write(old)
        env_vars = dict(os.environ, GLOG_v="3")
        env_vars.pop("LOG_MF_PATH", None)
        proc = subprocess.Popen(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT], "--max_new_tokens",
                                             "150", "--mode", "1"),
                                cwd=fresh(tmp_path), env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = os.read(proc.stdout.fileno(), 1)        # the answer has started
        proc.send_signal(signal.SIGSTOP)
        fill(mnt)
        proc.send_signal(signal.SIGCONT)
        rest, err = proc.communicate(timeout=300)
        proc.seconds, proc.err = 0, err.decode("utf-8", "replace")
        proc.out = ""                                     # stdout carried the answer; checked below
        assert first and rest, "the answer streamed"
        check_error(proc, "run_mindformer.py", [f"cannot append to {results}: the disk mounted at {mnt} "
                                                f"(0 bytes free) is full; none of the 1 answer(s) was saved"])
        with open(results, "rb") as f:
            assert f.read() == old
        with open(os.path.join(out, "log", "console_rank0.log"), errors="replace") as f:
            assert "Logging error" not in f.read()


def test_a_full_log_disk_is_said_once_and_the_run_succeeds(env, oracle, tmp_path):
    """MindFormers' log location (LOG_MF_PATH) on a full disk: one line says so, the answer and its record are
    right, and neither stderr nor the console log fills with "--- Logging error ---" tracebacks."""
    mnt = str(tmp_path / "mnt")
    out = str(tmp_path / "out")
    with tmpfs(mnt, "64k"):
        fill(mnt)
        proc = run_cmd(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT], "--max_new_tokens", "6"),
                       fresh(tmp_path), env_extra={"LOG_MF_PATH": os.path.join(mnt, "log")})
    assert proc.returncode == 0, proc.err[-3000:]
    notes = [line for line in proc.err.splitlines() if line.startswith("[log not written: ")]
    assert len(notes) == 1 and f"{mnt}/log" in notes[0] and "No space left on device" in notes[0], proc.err
    assert "Traceback" not in proc.err and "Logging error" not in proc.err
    with open(os.path.join(out, "log", "console_rank0.log"), errors="replace") as f:
        assert "Logging error" not in f.read()
    ids, text = oracle.generate(CAT, PROMPT, 6)
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["output_ids"] == ids and rec["output_text"] == text


# ------------------------------------------------------------------------- class 9: non-UTF-8 arguments
def _b(text):
    return text.encode() if isinstance(text, str) else text


# name -> (argv items after the script (bytes allowed), needle); the image path is CAT unless the row says so
BAD_TEXT = {
    "prompt with a 0xff byte": ([CAT, b"Describe\xff the image"],
                                "--predict_data: the prompt of input 1 is not valid UTF-8 (byte 0xff at position 8)"),
    "prompt cut inside a UTF-8 sequence": ([CAT, "caf".encode() + b"\xc3"],
                                           "the prompt of input 1 is not valid UTF-8 (byte 0xc3 at position 3)"),
    "overlong encoding of '/'": ([CAT, b"a\xc0\xafb"],
                                 "the prompt of input 1 is not valid UTF-8 (byte 0xc0 at position 1)"),
    "second input's prompt, Latin-1": ([CAT, "ok", CAT, "Gr\u00fc\u00dfe".encode("latin-1")],
                                       "the prompt of input 2 is not valid UTF-8 (byte 0xfc at position 2)"),
}


@pytest.mark.parametrize("name", list(BAD_TEXT))
def test_prompt_that_is_not_utf8_is_refused_up_front(env, tmp_path, name):
    items, needle = BAD_TEXT[name]
    out = str(tmp_path / "out")
    argv = [_b(a) for a in predict_argv(env["yaml"], env["ckpt"], out, [_b(i) for i in items])]
    proc = run_cmd(argv, fresh(tmp_path))
    check_error(proc, "run_mindformer.py", [needle], max_seconds=15)
    assert not os.path.exists(out)


# flag -> bad bytes value; every other flag is fine
BAD_FLAGS = {
    "--config": b"/tmp/conf\xe9ig.yaml",
    "--vocab_file": b"/models/tok\xffenizer.model",
    "--output_dir": b"out\xfe",
    "--load_checkpoint": b"/ckpt/m\x80odel.ckpt",
}


@pytest.mark.parametrize("flag", list(BAD_FLAGS))
def test_other_arguments_that_are_not_utf8_are_refused_up_front(env, tmp_path, flag):
    value = BAD_FLAGS[flag]
    args = {"--config": env["yaml"], "--load_checkpoint": env["ckpt"], "--output_dir": str(tmp_path / "out")}
    argv = [sys.executable, RUN, "--run_mode", "predict", "--predict_data", CAT, PROMPT]
    for k, v in {**args, flag: value}.items():
        argv += [k, v]
    cwd = fresh(tmp_path)
    proc = run_cmd([_b(a) for a in argv], cwd)
    bad = value[[i for i, c in enumerate(value) if c >= 0x80][0]]
    pos = [i for i, c in enumerate(value) if c >= 0x80][0]
    check_error(proc, "run_mindformer.py", [f"{flag} is not valid UTF-8 (byte 0x{bad:02x} at position {pos})"],
                max_seconds=15)
    assert os.listdir(cwd) == [] and not os.path.exists(tmp_path / "out")


def test_image_path_with_undecodable_bytes_works_and_is_recorded_exactly(env, oracle, tmp_path):
    """A file name in Latin-1 (any bytes but / and NUL make a POSIX path): the run answers, and the record's
    "image" is the path with each undecodable byte as the JSON escape \\udcNN, which os.fsencode turns back
    into the exact bytes."""
    folder = str(tmp_path / "photos")
    os.makedirs(folder)
    raw = os.path.join(folder, "").encode() + "Gr\u00fc\u00dfe k\u00e4tze.jpg".encode("latin-1")
    with open(CAT, "rb") as src, open(raw, "wb") as dst:
        dst.write(src.read())
    out = str(tmp_path / "out")
    proc = run_cmd([_b(a) for a in predict_argv(env["yaml"], env["ckpt"], out, [raw, PROMPT],
                                                "--max_new_tokens", "5")], fresh(tmp_path))
    assert proc.returncode == 0, proc.err[-3000:]
    with open(os.path.join(out, "predict_results.jsonl"), "rb") as f:
        line = f.read()
    line.decode("utf-8")                                    # the file is UTF-8
    assert b'"image": "' + os.path.join(folder, "").encode() + b'Gr\\udcfc\\udcdfe k\\udce4tze.jpg"' in line
    rec = json.loads(line)
    assert os.fsencode(rec["image"]) == raw
    ids, text = oracle.generate(CAT, PROMPT, 5)
    assert rec["output_ids"] == ids and rec["output_text"] == text


def test_missing_image_with_undecodable_bytes_is_refused_before_the_model(env, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cmd([_b(a) for a in predict_argv(env["yaml"], env["ckpt"], out, [b"/no/such/ph\xf6to.jpg", PROMPT])],
                   fresh(tmp_path))
    check_error(proc, "run_mindformer.py", ["image /no/such/ph\\udcf6to.jpg: no such file"], max_seconds=15)


# ---------------------------------------------------------- class 10: sizes the machine cannot hold
def hand_weights(c):
    """Parameters of LLaVA counted by hand from the config (CLIP tower, projector, LLaMA decoder)."""
    v, t = c["vision"], c["text"]
    vh, vi = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vision = (vh + vh * v["num_channels"] * v["patch_size"] ** 2 + (patches + 1) * vh + 2 * vh
              + v["layers"] * (4 * (vh * vh + vh) + 2 * 2 * vh + vi * vh + vi + vh * vi + vh) + 2 * vh)
    th, hd = t["hidden_size"], t["hidden_size"] // t["heads"]
    projector = th * vh + th + th * th + th
    layer = (2 * th * t["heads"] * hd + 2 * th * t["kv_heads"] * hd + 3 * th * t["intermediate_size"] + 2 * th)
    text = 2 * t["vocab"] * th + t["layers"] * layer + th
    return vision + projector + text


def tiny_shapes(hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    v, t = cfg["vision_config"], cfg["text_config"]
    return {"vision": dict(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           image_size=v["image_size"], patch_size=v["patch_size"],
                           num_channels=v.get("num_channels", 3),
                           layers=v["num_hidden_layers"]),
            "text": dict(hidden_size=t["hidden_size"], heads=t["num_attention_heads"],
                         kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
                         intermediate_size=t["intermediate_size"], vocab=t["vocab_size"],
                         layers=t["num_hidden_layers"])}


def test_memory_estimate_matches_a_hand_count_and_the_checkpoint(tiny_hf_dir):
    from safetensors import safe_open
    import memory_budget
    from helpers import config_of
    from llava_errors import LlavaError
    shapes = tiny_shapes(tiny_hf_dir)
    with safe_open(os.path.join(tiny_hf_dir, "model.safetensors"), "np") as f:
        stored = sum(f.get_tensor(k).size for k in f.keys() if "position_ids" not in k and "inv_freq" not in k)
    assert hand_weights(shapes) == stored
    config = config_of(tiny_hf_dir, seq_length=256, batch_size=3, param_init_type="float16",
                       compute_dtype="float32")
    t = shapes["text"]
    hd = t["hidden_size"] // t["heads"]
    kv3 = t["layers"] * 2 * 3 * t["kv_heads"] * 256 * hd * 4           # float32 pool of batch_size 3 rows
    kv5 = t["layers"] * 2 * 5 * t["kv_heads"] * 256 * hd * 4           # one pool of 5 rows for a run of 5
    act5 = (5 * 256 * (2 * t["hidden_size"] + 2 * t["intermediate_size"]) + 5 * t["heads"] * 128 * 256
            + 5 * t["vocab"]) * 4
    est = memory_budget.estimate(config, batch=5)
    assert (est.weights, est.kv_cache, est.activations, est.runtime) == (stored * 2, kv5, act5, GIB)
    # two ranks: split weights and the KV heads halve, replicated weights (vision, projector, norms) do not
    est2 = memory_budget.estimate(config, batch=3, world=2)
    assert est2.kv_cache == kv3 // 2
    assert stored * 2 // 2 < est2.weights < stored * 2
    # the refusal quotes the figures; a machine with room lets the run go on
    have = est.total - 1
    with pytest.raises(LlavaError) as e:
        memory_budget.check(config, batch=5, available=(have, "available (test)"))
    assert f"needs ~{est.total / GIB:.1f} GiB (weights {stored * 2 / GIB:.1f} GiB + KV cache " \
           f"{kv5 / GIB:.1f} GiB" in str(e.value)
    assert f"{have / GIB:.1f} GiB available (test): lower seq_length or batch_size" in str(e.value)
    assert memory_budget.check(config, batch=5, available=(est.total, "available (test)")).total == est.total
    # a server takes the KV pool that fits (at least one full-length row), and only when asked to
    one_row = kv5 // 5
    short = memory_budget.check(config, batch=5, available=(est.total - kv5 + 2 * one_row + 7, "test"),
                                shrink_kv=True)
    assert short.kv_cache == 2 * one_row + 7 and short.weights == est.weights
    with pytest.raises(LlavaError, match="needs"):
        memory_budget.check(config, batch=5, available=(est.total - kv5 + one_row - 1, "test"), shrink_kv=True)
    # device memory is compared only when the yaml says how much there is
    assert memory_budget.parse_size("58GB") == 58 * GIB and memory_budget.parse_size("512MB") == 512 << 20
    with pytest.raises(LlavaError, match=r"GiB device memory \(context.max_device_memory=1MB\)"):
        memory_budget.check(config, batch=5, device_target="Ascend", max_device_memory="1MB")
    assert memory_budget.check(config, batch=5, device_target="Ascend").total == est.total


# name -> (model_config overrides, text_config overrides, expected KV cache figure computed by hand)
def _kv_gib(layers, batch, kv_heads, seq, head_dim, nbytes=4):
    return f"KV cache {layers * 2 * batch * kv_heads * seq * head_dim * nbytes / GIB:.1f} GiB"


ABSURD_SIZES = {
    "seq_length 1e9": ({"seq_length": 10 ** 9}, {"max_position_embedding": 10 ** 9},
                       _kv_gib(2, 1, 4, 10 ** 9, 16)),
    "batch_size 1e6": ({"batch_size": 10 ** 6}, {},
                       # one pool for the larger of the yaml's batch and the run's inputs (1)
                       _kv_gib(2, 10 ** 6, 4, 256, 16)),
    "both large": ({"seq_length": 10 ** 6, "batch_size": 10 ** 3}, {"max_position_embedding": 10 ** 6},
                   _kv_gib(2, 10 ** 3, 4, 10 ** 6, 16)),
}


@pytest.mark.parametrize("name", list(ABSURD_SIZES))
def test_absurd_sizes_are_refused_with_the_figures_before_loading(env, tmp_path, name):
    import yaml
    mc, tc, kv = ABSURD_SIZES[name]
    with open(env["yaml"]) as f:
        data = yaml.safe_load(f)
    data["model"]["model_config"].update(mc)
    data["model"]["model_config"]["text_config"]["model_config"].update(tc)
    path = str(tmp_path / "absurd.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    out = str(tmp_path / "out")
    proc = run_cmd(predict_argv(path, env["ckpt"], out, [CAT, PROMPT]), fresh(tmp_path))
    last = check_error(proc, "run_mindformer.py", ["this run needs ~", kv, "available",
                                                   "lower seq_length or batch_size"])
    assert "MemoryError" not in proc.err
    assert not os.path.exists(os.path.join(out, "predict_results.jsonl"))
    with open(os.path.join(out, "log", "console_rank0.log"), errors="replace") as f:
        assert "MemoryError" not in f.read(), last


# ------------------------------------------------------------ class 15: which length flag wins
CONFLICTS = {
    "new 3, decode 4": (["--max_new_tokens", "3", "--max_decode_length", "4"],
                        "--max_new_tokens 3 and --max_decode_length 4 disagree"),
    "decode 10, new 1": (["--max_decode_length", "10", "--max_new_tokens", "1"],
                         "--max_new_tokens 1 and --max_decode_length 10 disagree"),
}


@pytest.mark.parametrize("name", list(CONFLICTS))
def test_conflicting_length_flags_are_refused(env, tmp_path, name):
    flags, needle = CONFLICTS[name]
    out = str(tmp_path / "out")
    proc = run_cmd(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT], *flags), fresh(tmp_path))
    check_error(proc, "run_mindformer.py", [needle, "give one"], max_seconds=15)
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags", [["--max_decode_length", "5"], ["--max_decode_length", "5", "--max_new_tokens", "5"]])
def test_max_decode_length_flag_beats_the_yaml(env, oracle, tmp_path, flags):
    """The tiny yaml sets max_new_tokens: 32 (and max_decode_length: 256): the command line's 5 wins."""
    import yaml
    with open(env["yaml"]) as f:
        assert yaml.safe_load(f)["model"]["model_config"]["max_new_tokens"] == 32
    out = str(tmp_path / "out")
    proc = run_cmd(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT], *flags), fresh(tmp_path))
    assert proc.returncode == 0, proc.err[-3000:]
    ids, text = oracle.generate(CAT, PROMPT, 5)
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        (rec,) = [json.loads(line) for line in f]
    assert len(ids) == 5 and rec["output_ids"] == ids and rec["output_text"] == text


# -------------------------------------------------------------------- Ctrl-C, and a symlinked output
def test_ctrl_c_while_streaming_says_what_was_kept(env, tmp_path):
    out = str(tmp_path / "out")
    env_vars = dict(os.environ, GLOG_v="3")
    env_vars.pop("LOG_MF_PATH", None)
    proc = subprocess.Popen(predict_argv(env["yaml"], env["ckpt"], out, [CAT, PROMPT], "--max_new_tokens", "150",
                                         "--mode", "1"),
                            cwd=fresh(tmp_path), env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while len(seen) < 12:
        chunk = os.read(proc.stdout.fileno(), 64)
        assert chunk, "the answer ended before Ctrl-C"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    err = err.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    results = os.path.join(out, "predict_results.jsonl")
    assert lines[-1] == f"run_mindformer.py: interrupted: 0 of 1 answers written to {results} (the file is unchanged)"
    assert not os.path.exists(results)
    assert (seen + rest).endswith(b"\n")          # the cut answer's line is ended


def test_output_dir_through_a_symlink_is_announced(env, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "tree" / "out"
    link.parent.mkdir()
    link.symlink_to(real)
    proc = run_cmd(predict_argv(env["yaml"], env["ckpt"], str(link), [CAT, PROMPT], "--max_new_tokens", "2"),
                   fresh(tmp_path))
    assert proc.returncode == 0, proc.err[-3000:]
    assert f"[output folder {link} is {real} (through a symbolic link): results and logs are written there]" \
        in proc.err.splitlines()
    assert os.path.isfile(real / "predict_results.jsonl")


# ----------------------------------------------------------------------------- class 8: the launcher
def _busy(family_addr):
    s = socket.socket()
    s.bind((family_addr, 0))
    s.listen()
    return s


# name -> (address the blocker listens on, argv builder(port, log_dir))
BUSY_PORT = {
    "6-argument form, 127.0.0.1": ("127.0.0.1", lambda p, d: launcher_argv("run_mindformer.py", 2, p, d, 7200)),
    "9-argument form": ("127.0.0.1", lambda p, d: ["bash", LAUNCHER, "run_mindformer.py", "2", "2", "127.0.0.1",
                                                   str(p), "0", d, "True", "7200"]),
    "a listener on every address": ("0.0.0.0", lambda p, d: launcher_argv("run_mindformer.py", 2, p, d, 7200)),
}


@pytest.mark.parametrize("name", list(BUSY_PORT))
def test_busy_master_port_fails_fast_and_names_the_port(tmp_path, name):
    addr, argv_of = BUSY_PORT[name]
    blocker = _busy(addr)
    port = blocker.getsockname()[1]
    log_dir = str(tmp_path / "msrun log")
    try:
        proc = run_cmd(argv_of(port, log_dir), fresh(tmp_path), timeout=60)
    finally:
        blocker.close()
    check_error(proc, "msrun_launcher.sh", [f"MASTER_PORT {port} on 127.0.0.1 is already in use"], max_seconds=15)
    assert len([line for line in proc.err.splitlines() if line.strip()]) == 1
    assert not os.path.exists(log_dir)                         # msrun never started


@pytest.mark.parametrize("log_dir", ["msrun;touch PWNED", "logs $(touch PWNED)", "a`touch PWNED`b"])
def test_log_dir_with_shell_syntax_is_refused(tmp_path, log_dir):
    cwd = fresh(tmp_path)
    proc = run_cmd(launcher_argv("run_mindformer.py", 2, free_port(), log_dir, 60), cwd, timeout=60)
    check_error(proc, "msrun_launcher.sh", [f"LOG_DIR '{log_dir}' holds shell syntax"], max_seconds=15)
    assert os.listdir(cwd) == []


def _tp_yaml(env, tmp_path):
    with open(env["yaml"]) as f:
        text = f.read()
    path = str(tmp_path / "tp.yaml")
    with open(path, "w") as f:
        f.write(text.replace("model_parallel: 1", "model_parallel: 2"))
    return path


@pytest.mark.slow
def test_log_dir_with_spaces_runs_two_ranks(env, oracle, tmp_path):
    """LOG_DIR and the output folder with spaces, prompts with spaces: msrun gets each as one word, both ranks
    run the predict command, and the answers are HF's."""
    out = str(tmp_path / "my results")
    log_dir = str(tmp_path / "msrun logs" / "run 1")
    pairs = [(CAT, PROMPT), (PAIRS[1][0], "What is on the table?  Two  spaces.")]
    order = predict_order(_tp_yaml(env, tmp_path), env["ckpt"], f"'{out}'", [x for p in pairs for x in p], True,
                          ("--max_new_tokens", str(MAX_NEW)))
    proc = run_cmd(launcher_argv(order, 2, free_port(), log_dir, 300), fresh(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.err[-3000:]
    assert sorted(os.listdir(log_dir)) == ["scheduler.log", "worker_0.log", "worker_1.log"]
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [(r["image"], r["prompt"]) for r in recs] == pairs
    for rec, (image, prompt) in zip(recs, pairs):
        ids, text = oracle.generate(image, prompt, MAX_NEW)
        assert rec["output_ids"] == ids and rec["output_text"] == text
    for rank in (0, 1):
        with open(os.path.join(log_dir, f"worker_{rank}.log"), errors="replace") as f:
            assert f"[rank {rank}/2] loaded" in f.read()


def test_a_failing_job_under_a_spaced_log_dir_exits_non_zero(env, tmp_path):
    log_dir = str(tmp_path / "msrun logs")
    order = predict_order(_tp_yaml(env, tmp_path), env["ckpt"], str(tmp_path / "out"),
                          ["/no/such/image.jpg", PROMPT], True)
    proc = run_cmd(launcher_argv(order, 2, free_port(), log_dir, 120), fresh(tmp_path), timeout=300)
    proc.out = ""           # msrun echoes rank 0's log (the worker's own error line) to stdout
    check_error(proc, "msrun_launcher.sh", ["the distributed job failed (exit 1): worker_",
                                            "image /no/such/image.jpg: no such file", f"see {log_dir}/worker_*.log"],
                rc=1, max_seconds=120)
    assert "No such file or directory" not in proc.err          # msrun's unquoted `cat` complaint is dropped
