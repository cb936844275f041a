#!/usr/bin/env python
"""Convert LLaVA-1.5 weights between a Hugging Face llava-hf folder (safetensors) and a MindSpore checkpoint.

  python convert_weight.py --model llava --input_path HF_DIR --output_path OUT.ckpt [--dtype DTYPE]
  python convert_weight.py --model llava --input_path HF_DIR --output_path OUT_DIR --dtype int8|int4
  python convert_weight.py --model llava --reversed --input_path IN.ckpt --output_path OUT_DIR_or_FILE.safetensors
                           [--config config.json] [--dtype DTYPE]

Forward: HF_DIR is a llava-hf style folder: config.json plus model.safetensors, or shards listed by
model.safetensors.index.json. PyTorch pickles (.bin/.pt/.pth) are refused: they are not read at all.
Reversed: writes the llava-hf legacy key names. Into OUT_DIR (created if needed): config.json and
model.safetensors, or shards of at most 5 GB with model.safetensors.index.json, as transformers'
save_pretrained does, so that LlavaForConditionalGeneration.from_pretrained(OUT_DIR) loads it; or a single
FILE.safetensors. The model config comes from --config, else from config.json in OUT_DIR (or next to the
output file).

Everything is validated before anything is written (config.json is a LLaVA config; every tensor is known,
none is missing, every shape agrees with the config; files are complete). Tensors are streamed one chunk at a
time, so memory stays small whatever the model size. The output is written to OUT.tmp-<pid> beside OUT and
renamed at the end; on an error, Ctrl-C or SIGTERM the temporary file is removed and OUT is left untouched.
--dtype defaults to each tensor's stored dtype. Errors are printed as one line, exit code 2 (--debug: traceback).

Pre-quantized (--dtype int8 | int4): OUT_DIR (created if needed) gets config.json and model.safetensors (or
shards with the index) whose decoder and vision-tower linear weights are stored as a model of that
model_config.weight_dtype holds them, each with its `weight_scale` tensor (research/llava/weights/quantize.py
defines the format; lm_head is int8 under int4); the other weights keep their stored float dtype. Give OUT_DIR
as --load_checkpoint with a yaml of the same weight_dtype: nothing is quantized while loading, and a yaml of
another weight_dtype is refused. transformers cannot load such a folder.
"""
import argparse
import os
import shutil
import signal
import sys
import time


ROOT = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(ROOT, "research", "llava")
if PLUGIN not in sys.path:
    sys.path.insert(0, PLUGIN)

# plugin modules are imported top-level, as MindFormers' --register_path does
import checkpoint_io as io  # noqa: E402
import weights  # noqa: E402
from checkpoint_io import DTYPES, DTYPE_ALIASES, check_ckpt_crc, mb, scan_ckpt, short_list  # noqa: E402
from file_checks import check_type, limit, load_json, read_capped  # noqa: E402
from llava_errors import LlavaError  # noqa: E402

PROG = "convert_weight.py"
MODELS = ("llava",)
QUANTIZED = ("int8", "int4")     # --dtype values that write a pre-quantized folder (weights/quantize.py)


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGINT/SIGTERM handlers so that cleanup runs and the exit code says which signal."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_output_file(path, suffix):
    """The output path must name a file with `suffix` in an existing, writable folder."""
    if not path.endswith(suffix):
        raise LlavaError(f"--output_path {path} must end with {suffix}")
    if os.path.isdir(path):
        raise LlavaError(f"--output_path {path} is a folder; give a file name ending with {suffix}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LlavaError(f"output folder {folder} does not exist")
    probe = f"{path}.tmp-{os.getpid()}"
    try:   # os.access is not enough (root, read-only mounts): try it
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise LlavaError(f"output folder {folder} is not writable ({e.strerror or e})") from e
    _warn_stale_temp_files(path)
    return folder


def _warn_stale_temp_files(path):
    """A killed run (SIGKILL, power loss) cannot clean up; point at its temp file instead of deleting it."""
    folder, base = os.path.split(os.path.abspath(path))
    stale = []
    for name in os.listdir(folder):
        pid = name[len(base) + 5:] if name.startswith(base + ".tmp-") else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                stale.append(name)
            except OSError:
                pass
    if stale:
        _warn(f"{folder} holds temporary file(s) of an interrupted run, safe to delete: {short_list(sorted(stale))}")


def check_free_space(folder, nbytes):
    free = shutil.disk_usage(folder).free
    if free < nbytes + 64 * 1024 * 1024:
        raise LlavaError(f"not enough free space in {folder}: the output needs {mb(nbytes)}, "
                         f"{mb(free)} are free")


# ----------------------------------------------------------------------------------------------------------
# model modules (imported late and quietly: MindFormers logs warnings while it imports)

def _import_model_modules():
    import tempfile
    if "mindformers" not in sys.modules and not os.environ.get("LOG_MF_PATH"):
        # MindFormers opens its log files when imported, by default under ./output/log of the current folder.
        # This command's only output is the converted file: the log goes to a temporary folder that is removed
        # as soon as the files are open (nothing is left behind, even after a SIGKILL).
        log_dir = tempfile.mkdtemp(prefix="convert_weight-log-")
        os.environ["LOG_MF_PATH"] = log_dir
        import atexit
        atexit.register(shutil.rmtree, log_dir, True)
    else:
        log_dir = None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    log = tempfile.TemporaryFile()
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            import llava_config  # noqa: F401
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    except KeyboardInterrupt:
        raise
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read().decode("utf-8", "replace"))
        raise
    finally:
        os.close(saved[0])
        os.close(saved[1])
        log.close()
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


def load_llava_config(path):
    """LlavaConfig from a llava-hf config.json (LlavaError naming the file when it is not one)."""
    if not os.path.lexists(path):
        raise LlavaError(f"{path} does not exist")
    load_json(path)              # the file-level checks (type, size, JSON depth) before the slow imports
    _import_model_modules()
    return weights.read_hf_config(path)


# ----------------------------------------------------------------------------------------------------------
# forward: llava-hf folder -> .ckpt

def convert_hf_to_ms(input_path, output_path, dtype=None, quiet=False):
    if not os.path.exists(input_path):
        raise LlavaError(f"input folder {input_path} does not exist")
    check_type(input_path, "--input_path", folder_ok=True)
    if not os.path.isdir(input_path):
        if input_path.endswith(io.PICKLE_SUFFIXES):
            io.refuse_pickle(input_path)
        raise LlavaError(f"--input_path {input_path} is a file; give the llava-hf folder that holds "
                         f"config.json and the safetensors files")
    out_folder = check_output_file(output_path, ".ckpt")
    config_path = os.path.join(input_path, "config.json")
    if not os.path.lexists(config_path):
        raise LlavaError(f"{input_path} has no config.json (expected a llava-hf model folder)")
    check_type(config_path)
    tensors = io.read_safetensors_folder(input_path)     # file-level checks first: they need no model code
    plan = weights.plan_ckpt(tensors, load_llava_config(config_path), input_path, dtype)
    check_free_space(out_folder, plan.total)
    n = len(plan.rows)
    _say(quiet, f"{PROG}: {input_path} -> {output_path}: {n} tensors, {mb(plan.total)}"
                + (f", skipping {len(plan.skipped)} buffer(s): {short_list(plan.skipped)}" if plan.skipped else ""))
    progress = _progress(plan.total, n, "hf -> ckpt", quiet)
    start = time.monotonic()
    try:
        overflows = weights.write_ckpt(plan, output_path, progress)
    finally:
        progress.close()
    seconds = time.monotonic() - start
    _warn_overflows(overflows, dtype)
    _done(quiet, f"{PROG}: wrote {output_path} ({n} tensors, {mb(plan.total)}, "
                f"{seconds:.2f} s, {plan.total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return output_path


# ----------------------------------------------------------------------------------------------------------
# reversed: .ckpt -> a llava-hf folder (config.json + safetensors) or one .safetensors file

def _reversed_target(output_path, config_path):
    """(folder, config path, whether a folder is written): where the reversed output goes. A folder that does
    not exist yet is created later (its parent must exist and be writable); nothing is created here."""
    if output_path.endswith(".safetensors"):
        return _config_for(check_output_file(output_path, ".safetensors"), config_path) + (False,)
    folder = os.path.abspath(output_path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise LlavaError(f"--output_path {output_path} is a file; give a folder (created if needed) "
                         f"or a file name ending with .safetensors")
    if os.path.isdir(folder):
        check_output_file(os.path.join(folder, io.SAFETENSORS_FILE), ".safetensors")
    else:
        parent = os.path.dirname(folder)
        if not os.path.isdir(parent):
            raise LlavaError(f"output folder {parent} does not exist")
        probe = f"{folder}.tmp-{os.getpid()}"
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as e:
            raise LlavaError(f"output folder {parent} is not writable ({e.strerror or e})") from e
    return _config_for(folder, config_path) + (True,)


def _config_for(folder, config_path):
    if config_path is None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.lexists(config_path):
            raise LlavaError(f"no config.json in {folder}; pass the model's config with --config")
    if not os.path.lexists(config_path):
        raise LlavaError(f"config file {config_path} does not exist")
    check_type(config_path, "config file")
    return folder, config_path


def convert_ms_to_hf(input_path, output_path, config_path=None, dtype=None, quiet=False,
                     shard_bytes=weights.SHARD_BYTES):
    """A .ckpt -> a folder transformers loads (config.json, model.safetensors or shards of at most `shard_bytes`
    with model.safetensors.index.json), or a single FILE.safetensors."""
    if not os.path.exists(input_path):
        raise LlavaError(f"input checkpoint {input_path} does not exist")
    check_type(input_path, "--input_path", folder_ok=True)
    if os.path.isdir(input_path):
        raise LlavaError(f"--input_path {input_path} is a folder; give the .ckpt file")
    folder, config_path, to_folder = _reversed_target(output_path, config_path)
    tensors = scan_ckpt(input_path)
    check_ckpt_crc(input_path)
    plan = weights.plan_hf(tensors, load_llava_config(config_path), input_path, dtype, shard_bytes,
                           file_name=None if to_folder else os.path.basename(output_path))
    stale = weights.stale_files(plan, folder) if to_folder else []
    if stale:
        raise LlavaError(f"output folder {folder} holds weight file(s) the new ones would not replace: "
                         f"{short_list(stale)}; remove them or choose an empty folder")
    config_bytes = None
    if to_folder and os.path.abspath(config_path) != os.path.join(folder, "config.json"):
        config_bytes = read_capped(config_path, limit("JSON_MAX_BYTES"), "config file", "JSON_MAX_BYTES")
    exists = os.path.isdir(folder)
    check_free_space(folder if exists else os.path.dirname(folder), plan.total + 1024 * 1024 * len(plan.shards))
    target = folder if to_folder else output_path
    n, shards = len(plan.rows), len(plan.shards)
    _say(quiet, f"{PROG}: {input_path} -> {target}: {n} tensors, {mb(plan.total)}"
                + (f" in {shards} shards" if shards > 1 else ""))
    progress = _progress(plan.total, n, "ckpt -> hf", quiet)
    start = time.monotonic()
    try:
        overflows = weights.write_hf(plan, input_path, folder, config_bytes, progress)
    finally:
        progress.close()
    seconds = time.monotonic() - start
    _warn_overflows(overflows, dtype)
    _done(quiet, f"{PROG}: wrote {target} ({n} tensors, {mb(plan.total)}"
                 + (f", {shards} shards" if shards > 1 else "") + f", {seconds:.2f} s)")
    return target


# ----------------------------------------------------------------------------------------------------------
# forward, pre-quantized: llava-hf folder -> a llava-hf folder of int8 / int4 weights with their scales

def convert_hf_to_quantized(input_path, output_path, weight_dtype, quiet=False):
    if not os.path.exists(input_path):
        raise LlavaError(f"input folder {input_path} does not exist")
    check_type(input_path, "--input_path", folder_ok=True)
    if not os.path.isdir(input_path):
        if input_path.endswith(io.PICKLE_SUFFIXES):
            io.refuse_pickle(input_path)
        raise LlavaError(f"--input_path {input_path} is a file; give the llava-hf folder that holds "
                         f"config.json and the safetensors files")
    if output_path.endswith((".ckpt", ".safetensors")):
        raise LlavaError(f"--dtype {weight_dtype!r} writes a pre-quantized folder (config.json and safetensors), "
                         f"not {output_path}; give a folder as --output_path")
    config_path = os.path.join(input_path, "config.json")
    if not os.path.lexists(config_path):
        raise LlavaError(f"{input_path} has no config.json (expected a llava-hf model folder)")
    check_type(config_path)
    folder, _, _ = _reversed_target(output_path, config_path)
    tensors = io.read_safetensors_folder(input_path)
    plan = weights.plan_quantized(tensors, load_llava_config(config_path), input_path, weight_dtype)
    stale = weights.stale_files(plan, folder)
    if stale:
        raise LlavaError(f"output folder {folder} holds weight file(s) the new ones would not replace: "
                         f"{short_list(stale)}; remove them or choose an empty folder")
    config_bytes = read_capped(config_path, limit("JSON_MAX_BYTES"), "config file", "JSON_MAX_BYTES")
    check_free_space(folder if os.path.isdir(folder) else os.path.dirname(folder), plan.total + 1024 * 1024)
    n = len(plan.units)
    _say(quiet, f"{PROG}: {input_path} -> {folder}: {n} weights as {weight_dtype}, {mb(plan.total)}")
    progress = _progress(plan.total, len(plan.shards), f"hf -> {weight_dtype}", quiet)
    start = time.monotonic()
    try:
        weights.write_quantized(plan, folder, config_bytes, progress)
    finally:
        progress.close()
    seconds = time.monotonic() - start
    _done(quiet, f"{PROG}: wrote {folder} ({n} weights as {weight_dtype}, {mb(plan.total)}, {seconds:.2f} s)")
    return folder


def _warn_overflows(overflows, dtype):
    if overflows:
        _warn(f"{len(overflows)} tensor(s) had values beyond the {dtype} range (now inf): "
              f"{short_list(sorted(overflows))}")


# ----------------------------------------------------------------------------------------------------------
# command line

class _NoProgress:
    def update(self, n):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(total, count, desc, quiet):
    if quiet:
        return _NoProgress()
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
               mininterval=0.25, dynamic_ncols=True)
    bar.set_postfix_str(f"0/{count} tensors", refresh=True)
    return bar


def _say(quiet, message):
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _done(quiet, message):
    if not quiet:
        print(message, flush=True)


def _warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LlavaError(f"{message} (see --help)")


def build_parser():
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"model family; supported: {', '.join(MODELS)}")
    ap.add_argument("--input_path", required=True,
                    help="llava-hf folder (forward) or MindSpore .ckpt file (--reversed)")
    ap.add_argument("--output_path", required=True,
                    help="OUT.ckpt (forward) or a folder, created if needed / FILE.safetensors (--reversed)")
    ap.add_argument("--dtype", default=None,
                    help="output dtype: float32, float16 or bfloat16 (also fp32/fp16/bf16); "
                         "default: keep each tensor's stored dtype; forward only: int8 or int4 writes a "
                         "pre-quantized folder (OUT_DIR) for a yaml of that model_config.weight_dtype")
    ap.add_argument("--reversed", action="store_true",
                    help="MindSpore .ckpt -> a Hugging Face folder (config.json + safetensors) or one .safetensors")
    ap.add_argument("--config", default=None,
                    help="--reversed only: the model's llava-hf config.json "
                         "(default: config.json in the output folder)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


def run(args):
    if args.model not in MODELS:
        raise LlavaError(f"--model {args.model!r} is not supported; supported: {', '.join(MODELS)}")
    dtype = args.dtype
    if dtype in QUANTIZED:
        if args.reversed:
            raise LlavaError(f"--dtype {dtype} is for the forward conversion (a llava-hf folder -> a pre-quantized "
                             f"folder); --reversed writes float weights")
        if args.config is not None:
            raise LlavaError("--config is only used with --reversed (forward conversion reads "
                             "config.json from the input folder)")
        return convert_hf_to_quantized(args.input_path, args.output_path, dtype, args.quiet)
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise LlavaError(f"--dtype {args.dtype!r} is not supported; choose {', '.join(DTYPES + QUANTIZED)}")
    if args.reversed:
        return convert_ms_to_hf(args.input_path, args.output_path, args.config, dtype, args.quiet)
    if args.config is not None:
        raise LlavaError("--config is only used with --reversed (forward conversion reads "
                         "config.json from the input folder)")
    return convert_hf_to_ms(args.input_path, args.output_path, dtype, args.quiet)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(argv=None):
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in handlers:
            signal.signal(s, _raise_interrupted)
        run(build_parser().parse_args(argv))
        return 0
    except LlavaError as e:
        if debug:
            raise
        message = " ".join(str(e).split("\n"))
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        if debug:
            raise
        print(f"{PROG}: error: interrupted by {e}; no output written", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: error: interrupted; no output written", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
