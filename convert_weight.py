#!/usr/bin/env python
"""Convert LLaVA-1.5 weights between a Hugging Face llava-hf folder (safetensors) and a MindSpore checkpoint.

  python convert_weight.py --model llava --input_path HF_DIR --output_path OUT.ckpt [--dtype DTYPE]
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
"""
import argparse
import math
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
import weight_map  # noqa: E402
import weights  # noqa: E402
from checkpoint_io import (  # noqa: E402
    DTYPES, DTYPE_ALIASES, DTYPE_TO_SF, ITEMSIZE, MS_TO_DTYPE, SF_ITEMSIZE, SF_TO_DTYPE, AtomicFile, CkptWriter,
    check_ckpt_crc, convert_chunk, iter_chunks, mb, read_safetensors_header, safetensors_header, scan_ckpt,
    short_list,
)
from llava_errors import LlavaError  # noqa: E402

PROG = "convert_weight.py"
MODELS = ("llava",)
SHARD_BYTES = 5 * 10 ** 9     # transformers' default max_shard_size ("5GB") of save_pretrained


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
    if not os.path.isfile(path):
        raise LlavaError(f"{path} does not exist")
    _import_model_modules()
    return weights.read_hf_config(path)


# ----------------------------------------------------------------------------------------------------------
# forward: llava-hf folder -> .ckpt

def convert_hf_to_ms(input_path, output_path, dtype=None, quiet=False):
    if not os.path.exists(input_path):
        raise LlavaError(f"input folder {input_path} does not exist")
    if not os.path.isdir(input_path):
        if input_path.endswith(io.PICKLE_SUFFIXES):
            io.refuse_pickle(input_path)
        raise LlavaError(f"--input_path {input_path} is a file; give the llava-hf folder that holds "
                         f"config.json and the safetensors files")
    out_folder = check_output_file(output_path, ".ckpt")
    config_path = os.path.join(input_path, "config.json")
    if not os.path.isfile(config_path):
        raise LlavaError(f"{input_path} has no config.json (expected a llava-hf model folder)")
    tensors = io.read_safetensors_folder(input_path)     # file-level checks first: they need no model code
    config = load_llava_config(config_path)
    named, skipped = weights.hf_names(tensors)
    expected = weights.expected_shapes(config)
    weights.check(named, expected, f"{input_path} does not match the LLaVA config")
    plan = [(name, named[name]) for name in expected]
    out_dtype = {name: dtype or SF_TO_DTYPE[t.dtype] for name, t in plan}
    out_bytes = {name: math.prod(t.shape) * ITEMSIZE[out_dtype[name]] for name, t in plan}
    total = sum(out_bytes.values())
    check_free_space(out_folder, total)
    # read in file order (sequential I/O); the checkpoint order does not matter to load_checkpoint
    plan.sort(key=lambda p: (p[1].path, p[1].offset))
    _say(quiet, f"{PROG}: {input_path} -> {output_path}: {len(plan)} tensors, {mb(total)}"
                + (f", skipping {len(skipped)} buffer(s): {short_list(skipped)}" if skipped else ""))
    progress = _progress(total, len(plan), "hf -> ckpt", quiet)
    start = time.monotonic()
    overflows, files = {}, {}
    try:
        with AtomicFile(output_path) as out:
            writer = CkptWriter(out.f)
            for i, (name, t) in enumerate(plan, 1):
                src = SF_TO_DTYPE[t.dtype]
                f = files.get(t.path) or files.setdefault(t.path, open(t.path, "rb"))
                pieces = _converted(iter_chunks(f, t.segments, SF_ITEMSIZE[t.dtype]), src, out_dtype[name],
                                    overflows, t.name)
                writer.write_tensor(name, t.shape, out_dtype[name], out_bytes[name], pieces, progress)
                progress.set_postfix_str(f"{i}/{len(plan)} tensors", refresh=False)
            out.f.flush()
            _verify_ckpt(out.tmp, {name: (t.shape, out_dtype[name], out_bytes[name]) for name, t in plan})
            out.commit()
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or output_path}: {e.strerror or e}") from e
    finally:
        progress.close()
        for f in files.values():
            f.close()
    seconds = time.monotonic() - start
    if overflows:
        _warn(f"{len(overflows)} tensor(s) had values beyond the {dtype} range (now inf): "
              f"{short_list(sorted(overflows))}")
    _done(quiet, f"{PROG}: wrote {output_path} ({len(plan)} tensors, {mb(total)}, "
                f"{seconds:.2f} s, {total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return output_path


def _converted(chunks, src, dst, overflows, name):
    for raw in chunks:
        data, n = convert_chunk(raw, src, dst)
        if n:
            overflows[name] = overflows.get(name, 0) + n
        yield data


def _verify_ckpt(path, want):
    """Re-read the written checkpoint's entries (not the data) and compare them with what was meant."""
    got = scan_ckpt(path)
    if set(got) != set(want):
        raise LlavaError(f"internal error: {path} does not hold the expected tensors")
    for name, (shape, dtype, nbytes) in want.items():
        t = got[name]
        if t.shape != tuple(shape) or MS_TO_DTYPE.get(t.dtype) != dtype or t.nbytes != nbytes:
            raise LlavaError(f"internal error: {path}: {name} was not written as intended")


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
        if not os.path.isfile(config_path):
            raise LlavaError(f"no config.json in {folder}; pass the model's config with --config")
    if not os.path.isfile(config_path):
        raise LlavaError(f"config file {config_path} does not exist")
    return folder, config_path


def _stale_weights(folder, names):
    """Weight files in `folder` that the new ones would not replace (transformers would load them first)."""
    if not os.path.isdir(folder):
        return []
    ours = set(names)
    return sorted(n for n in os.listdir(folder) if n not in ours and (
        n in (io.SAFETENSORS_FILE, io.SAFETENSORS_INDEX) or (n.startswith("model-") and n.endswith(".safetensors"))))


def convert_ms_to_hf(input_path, output_path, config_path=None, dtype=None, quiet=False, shard_bytes=SHARD_BYTES):
    """A .ckpt -> a folder transformers loads (config.json, model.safetensors or shards of at most `shard_bytes`
    with model.safetensors.index.json), or a single FILE.safetensors."""
    if not os.path.exists(input_path):
        raise LlavaError(f"input checkpoint {input_path} does not exist")
    if os.path.isdir(input_path):
        raise LlavaError(f"--input_path {input_path} is a folder; give the .ckpt file")
    folder, config_path, to_folder = _reversed_target(output_path, config_path)
    tensors = scan_ckpt(input_path)
    check_ckpt_crc(input_path)
    config = load_llava_config(config_path)
    expected = weights.expected_shapes(config)
    weights.check(tensors, expected, f"{input_path} does not match the LLaVA config")
    rows = []
    for name in expected:
        t = tensors[name]
        out = dtype or MS_TO_DTYPE[t.dtype]
        rows.append((weight_map.ms_to_hf(name), out, t, math.prod(t.shape) * ITEMSIZE[out]))
    rows.sort(key=lambda r: r[0])
    by_name = {r[0]: r for r in rows}
    if to_folder:
        shards = io.shard_files([(r[0], r[3]) for r in rows], shard_bytes)
    else:
        shards = [(os.path.basename(output_path), [r[0] for r in rows])]
    total = sum(r[3] for r in rows)
    files = [fname for fname, _ in shards] + ([io.SAFETENSORS_INDEX] if len(shards) > 1 else [])
    stale = _stale_weights(folder, files) if to_folder else []
    if stale:
        raise LlavaError(f"output folder {folder} holds weight file(s) the new ones would not replace: "
                         f"{short_list(stale)}; remove them or choose an empty folder")
    same_config = os.path.abspath(config_path) == os.path.join(folder, "config.json")
    with open(config_path, "rb") as f:
        config_bytes = f.read()
    created = not os.path.isdir(folder)
    check_free_space(os.path.dirname(folder) if created else folder, total + 1024 * 1024 * len(shards))
    target = folder if to_folder else output_path
    _say(quiet, f"{PROG}: {input_path} -> {target}: {len(rows)} tensors, {mb(total)}"
                + (f" in {len(shards)} shards" if len(shards) > 1 else ""))
    progress = _progress(total, len(rows), "ckpt -> hf", quiet)
    start = time.monotonic()
    overflows = {}
    pending, done = [], False
    try:
        if created:
            os.mkdir(folder)
        with open(input_path, "rb") as src_f:
            for fname, names in shards:
                out = AtomicFile(os.path.join(folder, fname)).__enter__()
                pending.append(out)
                _write_safetensors(out, [by_name[n] for n in names], src_f, overflows, progress)
            if len(shards) > 1:
                out = AtomicFile(os.path.join(folder, io.SAFETENSORS_INDEX)).__enter__()
                pending.append(out)
                out.f.write(io.safetensors_index(shards, total))
            if to_folder and not same_config:
                out = AtomicFile(os.path.join(folder, "config.json")).__enter__()
                pending.append(out)
                out.f.write(config_bytes)
        for out in pending:          # everything is written: only now do the final names appear
            out.commit()
        done = True
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or target}: {e.strerror or e}") from e
    finally:
        progress.close()
        for out in pending:
            out.__exit__(None, None, None)
        if created and not done:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.monotonic() - start
    if overflows:
        _warn(f"{len(overflows)} tensor(s) had values beyond the {dtype} range (now inf): "
              f"{short_list(sorted(overflows))}")
    _done(quiet, f"{PROG}: wrote {target} ({len(rows)} tensors, {mb(total)}"
                 + (f", {len(shards)} shards" if len(shards) > 1 else "") + f", {seconds:.2f} s)")
    return target


def _write_safetensors(out, rows, src_f, overflows, progress):
    """One safetensors file: the header, then each tensor streamed (and cast) from the open .ckpt."""
    out.f.write(safetensors_header([(hf, DTYPE_TO_SF[dt], t.shape, n) for hf, dt, t, n in rows]))
    for hf, out_dtype, t, nbytes in rows:
        src = MS_TO_DTYPE[t.dtype]
        written = 0
        for data in _converted(iter_chunks(src_f, t.segments, ITEMSIZE[src]), src, out_dtype, overflows, hf):
            out.f.write(data)
            n = len(memoryview(data).cast("B"))
            written += n
            progress.update(n)
        if written != nbytes:
            raise LlavaError(f"internal error: {hf} got {written} of {nbytes} bytes")
    out.f.flush()
    got = read_safetensors_header(out.tmp)
    if {k: (v.dtype, v.shape) for k, v in got.items()} != \
            {hf: (DTYPE_TO_SF[o], tuple(t.shape)) for hf, o, t, _ in rows}:
        raise LlavaError(f"internal error: {out.tmp} was not written as intended")


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
                         "default: keep each tensor's stored dtype")
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
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise LlavaError(f"--dtype {args.dtype!r} is not supported; choose {', '.join(DTYPES)}")
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
