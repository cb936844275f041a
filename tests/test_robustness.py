"""[H] Bad input and faults across the three commands: convert_weight.py, run_mindformer.py, msrun_launcher.sh.

Every case runs the real command as a subprocess, from a fresh empty working folder, with absolute paths to the
repository's scripts and its own empty TMPDIR, and checks:

* the exit code is non-zero (2 for bad input);
* the LAST stderr line is the one-line message `<prog>: error: ...` naming the input and the problem, and
  stderr holds no traceback; stdout is empty (it carries answers only);
* no partial output: no predict_results.jsonl, no .ckpt / .safetensors, no `*.tmp-<pid>` file;
* nothing is created outside --output_dir: the working folder holds at most `out/` (the output folder, where
  only MindFormers' own log folder `out/log/` may appear), and TMPDIR is empty again;
* where a case smuggles in code (a pickle, a YAML python tag), the sentinel file that code would create does
  not exist.

Read-only output folders: the tests run as root, where chmod does not stop writes, so the "read-only" cases use
a path below a regular FILE (`.../file.txt/sub`, ENOTDIR for everyone) and a folder in sysfs (`/sys/...`, where
even root cannot create files while os.access() says it may).

All subprocesses are submitted at once to one pool (fixture `jobs`), slowest first: a run_mindformer.py
process that gets as far as the model config spends ~7 s importing MindSpore/MindFormers, while the cases that
fail before (arguments, yaml shape, images and URLs, checkpoint files, output folder) take under a second. One
converted tiny checkpoint serves all predict cases. The tensor-parallel cases are a missing rank folder and a rank killed
mid-run.
"""
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import robust_inputs as ri
from helpers import (CONVERT, IMAGES, LAUNCHER, PLUGIN, ROOT, RUN, TOKENIZER_MODEL, ImageServer, free_port,
                     interrupt_convert, launcher_argv, png_bomb, png_header, predict_order, yaml_for)

CAT = os.path.join(IMAGES, "chelsea.jpg")
NET_TIMEOUT = 2          # processor.timeout in the yaml of the URL cases (seconds)
NET_MAX_BYTES = 100_000  # processor.max_bytes in the yaml of the URL cases
WORKERS = 4              # concurrent jobs (2 cores; the 2-rank and `mid` jobs spend much of their time waiting)


# ------------------------------------------------------------------------------------------------ harness
class Case:
    """One command that must fail. `argv(out)` builds the command line given the output folder."""

    def __init__(self, prog, argv, needles, rc=2, sentinel=None, make_out=False, timeout=180, max_seconds=None):
        self.prog, self.argv, self.needles, self.rc = prog, argv, needles, rc
        self.sentinel, self.make_out, self.timeout, self.max_seconds = sentinel, make_out, timeout, max_seconds


class Run:
    def __init__(self, proc, cwd, out, tmp, seconds):
        self.proc, self.cwd, self.out, self.tmp, self.seconds = proc, cwd, out, tmp, seconds


def run_fresh(work, argv_of, make_out=False, timeout=180, env_extra=None):
    """Run argv_of(out) from the empty folder work/cwd with TMPDIR=work/tmp; out = work/cwd/out."""
    cwd, tmp = os.path.join(work, "cwd"), os.path.join(work, "tmp")
    os.makedirs(cwd)
    os.makedirs(tmp)
    out = os.path.join(cwd, "out")
    if make_out:
        os.makedirs(out)
    env = dict(os.environ, GLOG_v="3", TMPDIR=tmp, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               **(env_extra or {}))
    env.pop("LOG_MF_PATH", None)   # the product must put MindFormers' log somewhere itself
    start = time.monotonic()
    proc = subprocess.run(argv_of(out), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(proc, cwd, out, tmp, time.monotonic() - start)


def stray_files(run):
    """Files and folders the run left behind outside the allowed places."""
    stray = [n for n in os.listdir(run.cwd) if n != "out"]
    if os.path.isdir(run.out):
        for dirpath, dirnames, filenames in os.walk(run.out):
            rel = os.path.relpath(dirpath, run.out)
            if rel == "log" or rel.startswith("log" + os.sep):
                continue                              # MindFormers' log, inside --output_dir by design
            stray += [os.path.join("out", rel, n) for n in filenames]
    stray += [os.path.join("TMPDIR", n) for n in os.listdir(run.tmp)]
    return stray


def check_failure(run, case):
    p = run.proc
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    why = f"exit {p.returncode} after {run.seconds:.1f} s; last stderr line: {last!r}; stderr tail:\n{p.stderr[-2500:]}"
    assert p.returncode == case.rc, why
    assert "Traceback" not in p.stderr, why
    assert last.startswith(f"{case.prog}: error: "), why
    for needle in case.needles:
        assert needle in last, (needle, why)
    assert p.stdout.strip() == "", (p.stdout, why)
    assert stray_files(run) == [], why
    if case.sentinel:
        assert not os.path.exists(case.sentinel), "a smuggled pickle / YAML tag was executed"
    if case.max_seconds is not None:
        assert run.seconds < case.max_seconds, run.seconds
    return last


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_hf_dir):
    """Inputs shared by the predict cases: a converted tiny checkpoint, yamls, bad files, a local HTTP server."""
    base = str(tmp_path_factory.mktemp("robust"))
    inp = os.path.join(base, "in")
    os.makedirs(inp)
    # the one converted tiny checkpoint, converted the same way the cases run (fresh cwd, checked clean)
    conv = run_fresh(os.path.join(base, "convert_tiny"), lambda out: [
        sys.executable, CONVERT, "--model", "llava", "--input_path", tiny_hf_dir, "--output_path",
        os.path.join(out, "tiny.ckpt"), "--quiet"], make_out=True)
    assert conv.proc.returncode == 0, conv.proc.stderr
    ckpt = os.path.join(inp, "tiny.ckpt")
    shutil.move(os.path.join(conv.out, "tiny.ckpt"), ckpt)
    server = ImageServer(CAT)
    e = dict(base=base, inp=inp, ckpt=ckpt, hf=tiny_hf_dir, server=server, convert_run=conv)
    e["yaml"] = yaml_for(tiny_hf_dir, os.path.join(inp, "tiny.yaml"), vocab_file=TOKENIZER_MODEL)
    e["net_yaml"] = yaml_for(tiny_hf_dir, os.path.join(inp, "net.yaml"), vocab_file=TOKENIZER_MODEL,
                             processor={"timeout": NET_TIMEOUT, "max_bytes": NET_MAX_BYTES})
    e["cases"] = {**predict_cases(e), **convert_cases(e), **launcher_cases(e)}   # predict first: makes resnet.ckpt
    yield e
    server.close()


@pytest.fixture(scope="module")
def jobs(env, mid_hf_dir):
    """Every subprocess of this module, submitted at once to one pool (name -> Future): the slow scenarios
    (2-rank runs that wait on a cluster time-out, the `mid` conversions) first, so their waiting overlaps
    the other cases' imports."""
    pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
    futures = {}
    futures["tp_rank_killed"] = pool.submit(tp_rank_killed_job, env)
    futures["tp_missing_rank"] = pool.submit(tp_missing_rank_job, env)
    futures["mid_signals"] = pool.submit(mid_signals_job, mid_hf_dir, os.path.join(env["base"], "mid_signals"))
    futures["good_url"] = pool.submit(run_fresh, os.path.join(env["base"], "good_url"), lambda out: predict_argv(
        env, out, [env["server"].url("/cat.jpg"), "Describe the image."], env["net_yaml"]))
    # the cases that get as far as the model config first: they take ~7 s of imports each
    order = sorted(env["cases"], key=lambda n: n not in SLOW_CASES)
    for name in order:
        c = env["cases"][name]
        futures[name] = pool.submit(run_fresh, os.path.join(env["base"], "runs", name), c.argv, c.make_out, c.timeout)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def predict_argv(e, out, data=None, cfg=None, ckpt=None, extra=()):
    return [sys.executable, RUN, "--config", cfg or e["yaml"], "--register_path", PLUGIN, "--run_mode", "predict",
            "--predict_data", *(data or [CAT, "Describe the image."]), "--modal_type", "image", "text",
            "--load_checkpoint", ckpt or e["ckpt"], "--use_parallel", "False", "--auto_trans_ckpt", "False",
            "--output_dir", out, "--max_new_tokens", "4", *extra]


def predict_cases(e):
    inp, hf = e["inp"], e["hf"]
    P = "run_mindformer.py"
    j = lambda name: os.path.join(inp, name)  # noqa: E731
    url = e["server"].url
    cases = {}

    def add(name, needles, data=None, cfg=None, ckpt=None, extra=(), **kw):
        cases[name] = Case(P, lambda out: predict_argv(e, out, data, cfg, ckpt, extra), needles, **kw)

    def image(name, path, needles, **kw):
        add(name, needles, data=[path, "Describe the image."], **kw)

    # images
    image("image_missing", j("no_such.jpg"), ["no_such.jpg", "no such file"])
    image("image_empty", ri.write(j("empty.jpg"), b""), ["empty.jpg", "empty file"])
    image("image_truncated", ri.truncated_copy(CAT, j("half.jpg")), ["half.jpg", "truncated"])
    image("image_not_an_image", ri.write(j("notes.jpg"), "shopping list: milk, eggs\n"),
          ["notes.jpg", "not an image"])
    image("image_is_a_folder", inp, [inp, "directory"])
    image("image_20000x20000_header", png_header(j("huge_header.png")),
          ["huge_header.png", "400000000 pixels", "limit of 89478485"])
    image("image_decompression_bomb", png_bomb(j("bomb.png")), ["bomb.png", "10000x10000 = 100000000 pixels", "limit of 89478485", "decompression-bomb"])
    # URLs (yaml: processor.timeout 2 s, processor.max_bytes 100000; one case with the 64 MB default cap)
    net = dict(cfg=e["net_yaml"])
    t = NET_TIMEOUT + 25   # imports (~6-15 s on a busy machine) + the time-out + slack
    add("url_404", ["missing.jpg", "HTTP 404"], data=[url("/missing.jpg"), "Hi"], **net)
    add("url_html_page", ["page.jpg", "not an image", "HTML"], data=[url("/page.jpg"), "Hi"], **net)
    add("url_no_answer_times_out", ["stall.jpg", f"timed out after {NET_TIMEOUT} s"],
        data=[url("/stall.jpg"), "Hi"], max_seconds=t, **net)
    add("url_trickle_times_out", ["trickle.jpg", f"timed out after {NET_TIMEOUT} s"],
        data=[url("/trickle.jpg"), "Hi"], max_seconds=t, **net)
    add("url_endless_body_over_cap", ["endless.jpg", f"more than the limit of {NET_MAX_BYTES} bytes"],
        data=[url("/endless.jpg"), "Hi"], **net)
    add("url_announced_over_default_cap", ["huge.jpg", "100000000 bytes", f"limit of {64 * 1024 * 1024} bytes"],
        data=[url("/huge.jpg"), "Hi"])
    add("url_redirect_loop", ["loop.jpg", "redirects"], data=[url("/loop.jpg"), "Hi"], **net)
    add("url_redirect_to_file_scheme", ["to_file.jpg", "download failed"], data=[url("/to_file.jpg"), "Hi"], **net)
    port = free_port()   # nobody listens there (a port just freed by the kernel)
    add("url_connection_refused", [f"127.0.0.1:{port}", "download failed"],
        data=[f"http://127.0.0.1:{port}/x.jpg", "Hi"], **net)
    add("scheme_file", ["file:///etc/hostname", "unsupported scheme 'file:'"], data=["file:///etc/hostname", "Hi"])
    add("scheme_ftp", ["ftp://127.0.0.1/cat.jpg", "unsupported scheme 'ftp:'"], data=["ftp://127.0.0.1/cat.jpg", "Hi"])
    # prompts and the command line
    add("prompt_longer_than_seq_length", ["prompt", "seq_length=256"], data=[CAT, "tell me more " * 120])
    add("predict_data_odd_count", ["--predict_data", "pairs", "3 item(s)"], data=[CAT, "Hi", CAT])
    add("modal_type_swapped", ["--modal_type", "text image"], extra=("--modal_type", "text", "image"))
    add("unknown_flag", ["--frobnicate"], extra=("--frobnicate", "1"))
    add("bad_boolean_flag", ["--use_parallel", "'maybe'"], extra=("--use_parallel", "maybe"))
    add("top_p_out_of_range", ["top_p", "1.5"], extra=("--top_p", "1.5"))
    add("max_new_tokens_zero", ["max_new_tokens", "0"], extra=("--max_new_tokens", "0"))
    cases["register_path_not_plugin"] = Case(P, lambda out: [
        sys.executable, RUN, "--config", e["yaml"], "--register_path", inp, "--predict_data", CAT, "Hi",
        "--load_checkpoint", e["ckpt"], "--output_dir", out], ["--register_path", inp, "not the llava plugin"])
    # yaml
    add("yaml_missing", ["no_such.yaml", "no such file"], cfg=j("no_such.yaml"))
    add("yaml_not_a_mapping", ["list.yaml", "mapping", "list"], cfg=ri.write(j("list.yaml"), "- model\n- processor\n"))
    add("yaml_syntax_error", ["broken.yaml", "not valid YAML"], cfg=ri.write(j("broken.yaml"), "model: [unclosed\n"))
    tag_sentinel = j("YAML_TAG_RAN")
    add("yaml_python_tag_refused", ["tag.yaml", "not valid YAML"], sentinel=tag_sentinel,
        cfg=ri.write(j("tag.yaml"), f"seed: !!python/object/apply:builtins.open ['{tag_sentinel}', 'w']\n"))
    add("yaml_unknown_top_level_key", ["top.yaml", "unknown top-level key", "modle"],
        cfg=yaml_for(hf, j("top.yaml"), vocab_file=TOKENIZER_MODEL, top={"modle": {"x": 1}}))
    add("yaml_unknown_model_key", ["numm_layers"], cfg=yaml_for(hf, j("key.yaml"), vocab_file=TOKENIZER_MODEL,
                                                                    numm_layers=3))
    add("yaml_wrong_type_seq_length", ["seq_length", "'long'"],
        cfg=yaml_for(hf, j("type.yaml"), vocab_file=TOKENIZER_MODEL, seq_length="long"))
    add("yaml_wrong_type_section", ["section.yaml", "context"], cfg=yaml_for(hf, j("section.yaml"), vocab_file=TOKENIZER_MODEL,
                                                                                top={"context": "CPU"}))
    add("yaml_wrong_type_processor_timeout", ["timeout", "'ten'"],
        cfg=yaml_for(hf, j("timeout.yaml"), vocab_file=TOKENIZER_MODEL, processor={"timeout": "ten"}))
    add("yaml_bad_context_mode", ["could not set up the context", "mode=7"],
        cfg=yaml_for(hf, j("mode.yaml"), vocab_file=TOKENIZER_MODEL,
                     top={"context": {"mode": 7, "device_target": "CPU"}}))
    add("yaml_missing_vocab_file", ["novocab.yaml", "vocab_file"], cfg=yaml_for(hf, j("novocab.yaml"), drop_vocab=True))
    # tokenizer
    add("vocab_file_missing", ["no_such.model", "no such file"], extra=("--vocab_file", j("no_such.model")))
    add("vocab_file_not_sentencepiece", ["junk.model", "not a SentencePiece model"],
        extra=("--vocab_file", ri.write(j("junk.model"), os.urandom(4096))))
    vocab_sentinel = j("VOCAB_PICKLE_RAN")
    add("vocab_file_is_a_pickle", ["vocab.pkl", "not a SentencePiece model"], sentinel=vocab_sentinel,
        extra=("--vocab_file", ri.evil_pickle(j("vocab.pkl"), vocab_sentinel)))
    # checkpoints
    add("ckpt_missing", ["no_such.ckpt", "no such file"], ckpt=j("no_such.ckpt"))
    add("ckpt_empty", ["empty.ckpt", "empty"], ckpt=ri.write(j("empty.ckpt"), b""))
    add("ckpt_truncated", ["cut.ckpt", "truncated"], ckpt=ri.truncated_copy(e["ckpt"], j("cut.ckpt"), 0.6))
    add("ckpt_of_another_model", ["resnet.ckpt", "does not match the model", "backbone.conv1.weight"],
        ckpt=ri.unrelated_ckpt(j("resnet.ckpt")))
    add("ckpt_of_another_shape", ["reshaped.ckpt", "does not match the model", "multi_modal_projector.linear_2.bias [63]"],
        ckpt=ri.reshaped_ckpt(e["ckpt"], j("reshaped.ckpt")))
    ckpt_sentinel = j("CKPT_PICKLE_RAN")
    add("ckpt_is_a_pickle", ["evil.ckpt", "not a MindSpore checkpoint"], sentinel=ckpt_sentinel,
        ckpt=ri.evil_pickle(j("evil.ckpt"), ckpt_sentinel))
    os.makedirs(j("model_dir_empty"))
    add("ckpt_folder_without_rank_0", ["model_dir_empty", "rank_0"], ckpt=j("model_dir_empty"))
    os.makedirs(j("model_dir_two/rank_0"))
    for n in ("a.ckpt", "b.ckpt"):
        os.symlink(e["ckpt"], j(f"model_dir_two/rank_0/{n}"))
    add("ckpt_folder_with_two_files", ["rank_0", "found 2"], ckpt=j("model_dir_two"))
    # llava-hf folders given to --load_checkpoint directly
    with open(os.path.join(hf, "config.json")) as f:
        hf_cfg = json.load(f)
    os.makedirs(j("hf_truncated"))
    ri.write(j("hf_truncated/config.json"), json.dumps(hf_cfg))
    ri.truncated_copy(os.path.join(hf, "model.safetensors"), j("hf_truncated/model.safetensors"), 0.5)
    add("ckpt_hf_folder_truncated", ["hf_truncated/model.safetensors", "truncated"], ckpt=j("hf_truncated"))
    os.makedirs(j("hf_other_config"))
    wide = json.loads(json.dumps(hf_cfg))
    wide["text_config"]["hidden_size"] = 96
    ri.write(j("hf_other_config/config.json"), json.dumps(wide))
    os.symlink(os.path.join(hf, "model.safetensors"), j("hf_other_config/model.safetensors"))
    add("ckpt_hf_folder_config_disagrees_with_yaml",
        ["hf_other_config", "config.json does not match the yaml", "text_config.hidden_size is 96 in config.json, 64"],
        ckpt=j("hf_other_config"))
    os.makedirs(j("hf_pickle"))
    ri.write(j("hf_pickle/config.json"), json.dumps(hf_cfg))
    hf_sentinel = j("HF_PICKLE_RAN")
    ri.evil_pickle(j("hf_pickle/pytorch_model.bin"), hf_sentinel)
    add("ckpt_hf_folder_with_a_pickle", ["pytorch_model.bin", "pickle", "safetensors"], sentinel=hf_sentinel,
        ckpt=j("hf_pickle"))
    # output folder that cannot be written (see the module docstring)
    blocker = ri.write(j("file.txt"), "a regular file\n")
    cases["output_below_a_regular_file"] = Case(P, lambda out: predict_argv(e, os.path.join(blocker, "sub")),
                                                [os.path.join(blocker, "sub"), "not a writable folder"])
    sysfs_out = f"/sys/llava_robustness_{os.getpid()}"
    cases["output_in_sysfs"] = Case(P, lambda out: predict_argv(e, sysfs_out), [sysfs_out, "writable"])
    return cases


PREDICT_CASES = [
    "image_missing", "image_empty", "image_truncated", "image_not_an_image", "image_is_a_folder",
    "image_20000x20000_header", "image_decompression_bomb",
    "url_404", "url_html_page", "url_no_answer_times_out", "url_trickle_times_out", "url_endless_body_over_cap",
    "url_announced_over_default_cap", "url_redirect_loop", "url_redirect_to_file_scheme", "url_connection_refused",
    "scheme_file", "scheme_ftp",
    "prompt_longer_than_seq_length", "predict_data_odd_count", "modal_type_swapped", "unknown_flag",
    "bad_boolean_flag", "top_p_out_of_range", "max_new_tokens_zero", "register_path_not_plugin",
    "yaml_missing", "yaml_not_a_mapping", "yaml_syntax_error", "yaml_python_tag_refused",
    "yaml_unknown_top_level_key", "yaml_unknown_model_key", "yaml_wrong_type_seq_length", "yaml_wrong_type_section",
    "yaml_wrong_type_processor_timeout", "yaml_bad_context_mode", "yaml_missing_vocab_file",
    "vocab_file_missing", "vocab_file_not_sentencepiece", "vocab_file_is_a_pickle",
    "ckpt_missing", "ckpt_empty", "ckpt_truncated", "ckpt_of_another_model", "ckpt_of_another_shape",
    "ckpt_is_a_pickle", "ckpt_folder_without_rank_0", "ckpt_folder_with_two_files",
    "ckpt_hf_folder_truncated", "ckpt_hf_folder_config_disagrees_with_yaml", "ckpt_hf_folder_with_a_pickle",
    "output_below_a_regular_file", "output_in_sysfs",
]


# cases that fail only once MindSpore/MindFormers are imported and the model config is built (~7 s each)
SLOW_CASES = {"prompt_longer_than_seq_length", "top_p_out_of_range", "max_new_tokens_zero", "yaml_unknown_model_key",
              "yaml_wrong_type_seq_length", "yaml_bad_context_mode", "yaml_missing_vocab_file", "vocab_file_missing",
              "vocab_file_not_sentencepiece", "vocab_file_is_a_pickle", "ckpt_of_another_model",
              "ckpt_of_another_shape", "ckpt_folder_without_rank_0", "ckpt_folder_with_two_files",
              "ckpt_hf_folder_config_disagrees_with_yaml", "conv_config_not_llava", "conv_reversed_ckpt_of_another_model"}


@pytest.mark.parametrize("name", PREDICT_CASES)
def test_predict_bad_input(env, jobs, name):
    check_failure(jobs[name].result(), env["cases"][name])


def test_all_cases_are_listed(env):
    assert sorted(env["cases"]) == sorted(PREDICT_CASES + CONVERT_CASES + LAUNCHER_CASES)
    assert SLOW_CASES <= set(env["cases"])


def test_predict_from_url_succeeds_and_stays_in_output_dir(env, jobs):
    """The positive control: the same harness, a served image, a clean answer, nothing outside --output_dir."""
    run = jobs["good_url"].result()
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert "Traceback" not in run.proc.stderr
    assert run.proc.stdout.strip()
    with open(os.path.join(run.out, "predict_results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and len(records[0]["output_ids"]) <= 4
    assert [n for n in os.listdir(run.cwd)] == ["out"]
    assert sorted(os.listdir(run.out)) == ["log", "predict_results.jsonl"]
    assert os.listdir(run.tmp) == []
    # the conversion the fixture ran left nothing behind either
    conv = env["convert_run"]
    assert os.listdir(conv.cwd) == ["out"] and os.listdir(conv.out) == [] and os.listdir(conv.tmp) == []


# ------------------------------------------------------------------------------------------ convert_weight.py
def convert_cases(e):
    inp, hf = e["inp"], e["hf"]
    C = "convert_weight.py"
    j = lambda name: os.path.join(inp, name)  # noqa: E731
    cases = {}

    def add(name, args, needles, **kw):
        out_name = "model.safetensors" if "--reversed" in args else "x.ckpt"

        def argv(out, args=args):
            target = out if "--reversed" in args else os.path.join(out, out_name)
            return [sys.executable, CONVERT, "--model", "llava", *args, "--output_path", target]
        cases[name] = Case(C, argv, needles, make_out=True, **kw)

    def folder(name, config=None, link_weights=True):
        path = j(name)
        os.makedirs(path)
        if config is not None:
            ri.write(os.path.join(path, "config.json"), config)
        if link_weights:
            os.symlink(os.path.join(hf, "model.safetensors"), os.path.join(path, "model.safetensors"))
        return path

    with open(os.path.join(hf, "config.json")) as f:
        cfg = f.read()
    add("conv_missing_input", ["--input_path", j("no_such_dir")], ["no_such_dir", "does not exist"])
    sentinel = j("CONVERT_PICKLE_RAN")
    pkl_dir = folder("pickle_dir", cfg, link_weights=False)
    ri.evil_pickle(os.path.join(pkl_dir, "pytorch_model.bin"), sentinel)
    add("conv_pickle_in_folder", ["--input_path", pkl_dir], ["pytorch_model.bin", "pickle"], sentinel=sentinel)
    add("conv_pickle_file", ["--input_path", os.path.join(pkl_dir, "pytorch_model.bin")],
        ["pytorch_model.bin", "pickle"], sentinel=sentinel)
    rev_sentinel = j("REVERSED_PICKLE_RAN")
    add("conv_reversed_pickle_ckpt", ["--reversed", "--input_path", ri.evil_pickle(j("evil_rev.ckpt"), rev_sentinel),
                                      "--config", os.path.join(hf, "config.json")],
        ["evil_rev.ckpt", "not a MindSpore checkpoint"], sentinel=rev_sentinel)
    trunc = folder("trunc_dir", cfg, link_weights=False)
    ri.truncated_copy(os.path.join(hf, "model.safetensors"), os.path.join(trunc, "model.safetensors"), 0.5)
    add("conv_truncated_safetensors", ["--input_path", trunc], ["trunc_dir/model.safetensors", "truncated"])
    bomb = folder("header_bomb", cfg, link_weights=False)
    ri.write(os.path.join(bomb, "model.safetensors"), (1 << 60).to_bytes(8, "little") + b"{}")
    add("conv_safetensors_header_claims_exabytes", ["--input_path", bomb],
        ["header_bomb/model.safetensors", "not a safetensors file"])
    llama = json.loads(cfg)
    llama["model_type"] = "llama"
    add("conv_config_not_llava", ["--input_path", folder("llama_cfg", json.dumps(llama))],
        ["llama_cfg/config.json", "'llama'"])
    add("conv_config_not_json", ["--input_path", folder("bad_json_cfg", "{not json")],
        ["bad_json_cfg/config.json"])
    blocker = ri.write(j("conv_file.txt"), "a regular file\n")
    cases["conv_output_below_a_regular_file"] = Case(C, lambda out: [
        sys.executable, CONVERT, "--model", "llava", "--input_path", hf, "--output_path",
        os.path.join(blocker, "sub", "x.ckpt")], [os.path.join(blocker, "sub"), "does not exist"], make_out=True)
    cases["conv_output_in_sysfs"] = Case(C, lambda out: [
        sys.executable, CONVERT, "--model", "llava", "--input_path", hf, "--output_path", "/sys/llava_x.ckpt"],
        ["/sys", "not writable"], make_out=True)
    add("conv_unknown_model", ["--input_path", hf, "--model", "llama"], ["--model", "'llama'"])
    add("conv_bad_dtype", ["--input_path", hf, "--dtype", "int8"], ["--dtype", "'int8'"])
    add("conv_reversed_truncated_ckpt", ["--reversed", "--input_path", ri.truncated_copy(e["ckpt"], j("rev_cut.ckpt"), 0.3),
                                         "--config", os.path.join(hf, "config.json")], ["rev_cut.ckpt", "truncated"])
    add("conv_reversed_ckpt_of_another_model", ["--reversed", "--input_path", j("resnet.ckpt"),
                                                "--config", os.path.join(hf, "config.json")],
        ["resnet.ckpt", "does not match", "backbone.conv1.weight"])
    return cases


CONVERT_CASES = [
    "conv_missing_input", "conv_pickle_in_folder", "conv_pickle_file", "conv_reversed_pickle_ckpt",
    "conv_truncated_safetensors", "conv_safetensors_header_claims_exabytes", "conv_config_not_llava",
    "conv_config_not_json", "conv_output_below_a_regular_file", "conv_output_in_sysfs", "conv_unknown_model",
    "conv_bad_dtype", "conv_reversed_truncated_ckpt", "conv_reversed_ckpt_of_another_model",
]


@pytest.mark.parametrize("name", CONVERT_CASES)
def test_convert_bad_input(env, jobs, name):
    check_failure(jobs[name].result(), env["cases"][name])


# -------------------------------------------------------------------------------- convert: signals on `mid`
def _convert_and_signal(mid_hf_dir, work, signum):
    """Convert `mid` from a fresh cwd into cwd/out/mid.ckpt; send `signum` once the temp file is filling."""
    cwd, tmp = os.path.join(work, "cwd"), os.path.join(work, "tmp")
    out = os.path.join(cwd, "out")
    os.makedirs(out)
    os.makedirs(tmp)
    target = os.path.join(out, "mid.ckpt")
    env = dict(os.environ, GLOG_v="3", TMPDIR=tmp)
    env.pop("LOG_MF_PATH", None)
    rc, stderr, stdout, temp, size = interrupt_convert(mid_hf_dir, target, signum, cwd, env=env)
    return dict(rc=rc, stderr=stderr, stdout=stdout, temp=temp,
                size=size, target=target, cwd=cwd, out=out, tmp=tmp,
                after=dict(target=os.path.exists(target), temp=os.path.exists(temp), cwd=sorted(os.listdir(cwd)),
                           tmp=sorted(os.listdir(tmp)), out=sorted(os.listdir(out))))


def mid_signals_job(mid_hf_dir, base):
    """SIGINT, then SIGKILL, during a conversion of `mid`, then one rerun into the killed run's folder."""
    runs = {s: _convert_and_signal(mid_hf_dir, os.path.join(base, s.name), s) for s in (signal.SIGINT, signal.SIGKILL)}
    killed = runs[signal.SIGKILL]
    env = dict(os.environ, GLOG_v="3", TMPDIR=killed["tmp"])
    env.pop("LOG_MF_PATH", None)
    rerun = subprocess.run([sys.executable, CONVERT, "--model", "llava", "--input_path", mid_hf_dir, "--output_path",
                            killed["target"], "--quiet"], capture_output=True, text=True, cwd=killed["cwd"],
                           env=env, timeout=600)
    return runs, rerun


@pytest.fixture(scope="module")
def mid_signals(jobs):
    return jobs["mid_signals"].result()


def test_mid_sigint_leaves_nothing(mid_signals):
    r = mid_signals[0][signal.SIGINT]
    assert r["size"] > 0                                    # interrupted while writing
    assert r["rc"] == 128 + signal.SIGINT, r["stderr"]
    assert "Traceback" not in r["stderr"]
    last = r["stderr"].rstrip().splitlines()[-1]
    assert last == "convert_weight.py: error: interrupted by SIGINT; no output written"
    assert r["stdout"] == ""
    assert r["after"] == dict(target=False, temp=False, cwd=["out"], tmp=[], out=[])


def test_mid_sigkill_leaves_no_output_and_rerun_succeeds(mid_signals):
    """SIGKILL cannot be caught: the temp file stays (named after the dead pid, never OUT.ckpt itself); the
    rerun writes OUT.ckpt and names the stale temp file as safe to delete."""
    r, rerun = mid_signals[0][signal.SIGKILL], mid_signals[1]
    assert r["rc"] == -signal.SIGKILL
    assert r["after"]["target"] is False
    assert r["after"]["cwd"] == ["out"] and r["after"]["tmp"] == []
    assert r["after"]["out"] == [os.path.basename(r["temp"])]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert os.path.basename(r["temp"]) in rerun.stderr and "safe to delete" in rerun.stderr
    assert sorted(os.listdir(r["out"])) == sorted(["mid.ckpt", os.path.basename(r["temp"])])
    assert os.listdir(r["cwd"]) == ["out"] and os.listdir(r["tmp"]) == []
    import checkpoint_io
    assert len(checkpoint_io.scan_ckpt(r["target"])) > 0    # a complete, readable checkpoint


# ------------------------------------------------------------------------------------------ msrun_launcher.sh
def launcher_cases(e):
    L = "msrun_launcher.sh"
    order = f"{RUN} --config {e['yaml']} --predict_data {CAT} Hi"

    def add(name, args, needles):
        cases[name] = Case(L, lambda out, args=args: ["bash", LAUNCHER, *args], needles, timeout=60)

    cases = {}
    add("launcher_worker_num_not_a_number", [order, "two"], ["WORKER_NUM", "'two'"])
    add("launcher_worker_num_zero", [order, "0"], ["WORKER_NUM (0)"])
    add("launcher_script_missing", ["no_such_script.py --flag 1", "2"], ["no_such_script.py", "not found"])
    add("launcher_empty_order", ["", "2"], ["EXECUTE_ORDER is empty"])
    add("launcher_wrong_argument_count", [order, "2", "8118"], ["expected 1, 2, 6 or 9 arguments, got 3"])
    add("launcher_bad_join", [order, "2", "8118", "msrun_log", "maybe", "60"], ["JOIN", "'maybe'"])
    add("launcher_bad_time_out", [order, "2", "8118", "msrun_log", "True", "soon"], ["CLUSTER_TIME_OUT", "'soon'"])
    add("launcher_local_workers_exceed_total", [order, "2", "4", "127.0.0.1", "8118", "0", "msrun_log", "True", "60"],
        ["LOCAL_WORKER (4)", "WORKER_NUM (2)"])
    add("launcher_port_not_a_number", [order, "2", "http", "msrun_log", "True", "60"], ["MASTER_PORT", "'http'"])
    return cases


LAUNCHER_CASES = ["launcher_worker_num_not_a_number", "launcher_worker_num_zero", "launcher_script_missing",
                  "launcher_empty_order", "launcher_wrong_argument_count", "launcher_bad_join",
                  "launcher_bad_time_out", "launcher_local_workers_exceed_total", "launcher_port_not_a_number"]


@pytest.mark.parametrize("name", LAUNCHER_CASES)
def test_launcher_bad_arguments(env, jobs, name):
    check_failure(jobs[name].result(), env["cases"][name])


# ------------------------------------------------------------------------------ tensor parallel (2 ranks)
CLUSTER_TIME_OUT = 30


def _parallel_order(e, out, ckpt, auto_trans, long_run=False):
    """The 2-rank predict command; `long_run`: a long PyNative generation (seconds, not milliseconds, of
    decoding), so that a rank can be killed while both ranks are in the decode loop."""
    cfg = os.path.join(e["inp"], "tp2_long.yaml" if long_run else "tp2.yaml")
    if not os.path.exists(cfg):
        yaml_for(e["hf"], cfg, vocab_file=TOKENIZER_MODEL, **({"seq_length": 512} if long_run else {}),
                 top={"parallel_config": {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}})
    new = ("--max_new_tokens", "380", "--mode", "1") if long_run else ("--max_new_tokens", "4")
    return predict_order(cfg, ckpt, out, [CAT, "Describe:"], auto_trans, new)


def _launch(e, out, ckpt, auto_trans, long_run=False):
    return launcher_argv(_parallel_order(e, out, ckpt, auto_trans, long_run), 2, free_port(),
                         os.path.join(out, "msrun_log"), CLUSTER_TIME_OUT)


def tp_missing_rank_job(e):
    """A 2-rank run given model_dir/rank_0 only."""
    model_dir = os.path.join(e["inp"], "rank0_only")
    os.makedirs(os.path.join(model_dir, "rank_0"))
    os.symlink(e["ckpt"], os.path.join(model_dir, "rank_0", "llava.ckpt"))
    run = run_fresh(os.path.join(e["base"], "tp_missing_rank"), lambda out: _launch(e, out, model_dir, "False"),
                    timeout=CLUSTER_TIME_OUT + 180)
    return run, model_dir


def test_parallel_missing_rank_folder(jobs):
    run, model_dir = jobs["tp_missing_rank"].result()
    p = run.proc
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("msrun_launcher.sh: error: the distributed job failed"), p.stderr[-3000:]
    assert model_dir in last and "rank_1" in last, last      # the ranks' own message, quoted
    assert not os.path.exists(os.path.join(run.out, "predict_results.jsonl"))
    assert os.listdir(run.cwd) == ["out"] and os.listdir(run.tmp) == []


def _worker_pids(marker):
    """pids of the run_mindformer.py workers whose command line holds `marker`, with their RANK_ID."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if not any(RUN.encode() == c for c in cmd) or not any(marker.encode() in c for c in cmd):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        rank = env.get(b"RANK_ID", env.get(b"MS_NODE_ID", b"?")).decode()
        found[int(pid)] = rank
    return found


def tp_rank_killed_job(e):
    """A 2-rank run (complete checkpoint, sliced on the fly) whose rank 1 gets SIGKILL once both ranks run."""
    work = os.path.join(e["base"], "tp_killed")
    cwd, tmp = os.path.join(work, "cwd"), os.path.join(work, "tmp")
    out = os.path.join(cwd, "out")
    os.makedirs(cwd)
    os.makedirs(tmp)
    environ = dict(os.environ, GLOG_v="3", TMPDIR=tmp)
    environ.pop("LOG_MF_PATH", None)
    start = time.monotonic()
    proc = subprocess.Popen(_launch(e, out, e["ckpt"], "True", long_run=True), cwd=cwd, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = killed_at = None
    rank1_log = os.path.join(out, "msrun_log", "worker_1.log")
    try:
        while proc.poll() is None and time.monotonic() - start < 180:
            # rank 1 has its weights (so both ranks are past start-up): kill exactly that worker
            if os.path.exists(rank1_log) and "[rank 1/2] loaded" in open(rank1_log, errors="replace").read():
                victim = {r: p for p, r in _worker_pids(out).items()}.get("1")
                if victim:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=CLUSTER_TIME_OUT + 180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return dict(rc=proc.returncode, stdout=stdout, stderr=stderr, victim=victim,
                after_kill=None if killed_at is None else time.monotonic() - killed_at,
                survivors=_worker_pids(out), cwd=sorted(os.listdir(cwd)), tmp=sorted(os.listdir(tmp)), out=out)


def test_parallel_rank_killed_mid_run(jobs):
    r = jobs["tp_rank_killed"].result()
    assert r["victim"] is not None, "the workers never started: " + r["stderr"][-3000:]
    assert r["rc"] != 0, r["stderr"][-3000:]
    # rank 0 notices within the cluster time-out (plus its own start-up, slow on a busy machine)
    assert r["after_kill"] < CLUSTER_TIME_OUT + 90, r["after_kill"]
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    assert r["stderr"].strip().splitlines()[-1].startswith("msrun_launcher.sh: error: the distributed job failed"), \
        r["stderr"][-3000:]
    assert not os.path.exists(os.path.join(r["out"], "predict_results.jsonl"))
    assert r["survivors"] == {}, "a worker outlived the launcher"
    assert r["cwd"] == ["out"] and r["tmp"] == []


# ----------------------------------------------------------------------------------------------- safety
UNSAFE = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\bcPickle\b|\bdill\.loads?\(|\bjoblib\.load\(|\bmarshal\.loads?\(", "other unpicklers"),
    (r"\btorch\.load\(", "torch.load"),
    (r"allow_pickle\s*=\s*True", "np.load(..., allow_pickle=True)"),
    (r"weights_only\s*=\s*False", "torch.load(weights_only=False)"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
    (r"\byaml\.(unsafe_load|full_load|load_all)\(|\byaml\.(Unsafe|Full)?Loader\b", "unsafe YAML loading"),
]
YAML_LOAD = re.compile(r"\byaml\.load\(")


def _product_files():
    files = [os.path.join(ROOT, "convert_weight.py"), os.path.join(ROOT, "run_mindformer.py")]
    for top in ("research", "scripts"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            files += [os.path.join(dirpath, n) for n in names if n.endswith((".py", ".sh"))]
    return sorted(files)


def test_no_unsafe_deserialisation_in_the_product():
    hits = []
    for path in _product_files():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                code = line.split("#", 1)[0]
                for pattern, what in UNSAFE:
                    if re.search(pattern, code):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{lineno}: {what}: {line.strip()}")
                if YAML_LOAD.search(code) and "SafeLoader" not in code:
                    hits.append(f"{os.path.relpath(path, ROOT)}:{lineno}: yaml.load without SafeLoader: {line.strip()}")
    assert hits == []
    assert len(_product_files()) > 10


def test_the_unsafe_patterns_do_match():
    """The grep above is not vacuous: each pattern catches the call it is meant to catch."""
    samples = ["x = pickle.load(f)", "torch.load(p)", "np.load(p, allow_pickle=True)", "torch.load(p, weights_only=False)",
               "AutoModel.from_pretrained(p, trust_remote_code=True)", "yaml.unsafe_load(s)", "yaml.full_load(s)"]
    for s in samples:
        assert any(re.search(p, s) for p, _ in UNSAFE), s
    assert YAML_LOAD.search("yaml.load(f)") and not YAML_LOAD.search("yaml.safe_load(f)")
