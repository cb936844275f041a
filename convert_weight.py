#!/usr/bin/env python
"""Convert LLaVA-1.5 weights between a Hugging Face llava-hf folder (safetensors) and a MindSpore checkpoint.

  python convert_weight.py --model llava --input_path HF_DIR --output_path OUT.ckpt [--dtype DTYPE]
  python convert_weight.py --model llava --reversed --input_path IN.ckpt --output_path OUT_DIR_or_FILE.safetensors
                           [--config config.json] [--dtype DTYPE]

Forward: HF_DIR is a llava-hf style folder: config.json plus model.safetensors, or shards listed by
model.safetensors.index.json. PyTorch pickles (.bin/.pt/.pth) are refused: they are not read at all.
Reversed: writes model.safetensors with the llava-hf legacy key names (into OUT_DIR, or to the given
.safetensors file). The model config comes from --config, else from config.json in OUT_DIR (or next to
the output file).

Everything is validated before anything is written (config.json is a LLaVA config; every tensor is known,
none is missing, every shape agrees with the config; files are complete). Tensors are streamed one chunk at a
time, so memory stays small whatever the model size. The output is written to OUT.tmp-<pid> beside OUT and
renamed at the end; on an error, Ctrl-C or SIGTERM the temporary file is removed and OUT is left untouched.
--dtype defaults to each tensor's stored dtype. Errors are printed as one line, exit code 2 (--debug: traceback).
"""
import argparse
import json
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

from llava_errors import LlavaError  # noqa: E402  (plugin modules are imported top-level, see DESIGN.md)

PROG = "convert_weight.py"
MODELS = ("llava",)
# The .ckpt / safetensors formats live in the plugin (the predict job streams checkpoints too); they are
# re-exported here for scripts that import convert_weight.
from checkpoint_io import (  # noqa: E402,F401
    DTYPES, DTYPE_ALIASES, ITEMSIZE, SF_ITEMSIZE, SF_TO_DTYPE, DTYPE_TO_SF, MS_TO_DTYPE, DTYPE_TO_MS,
    CHUNK_BYTES, CKPT_SLICE_BYTES, MAX_HEADER_BYTES, LIST_LIMIT, _names, _mb, _to_f32, _from_f32,
    convert_chunk, TensorInfo, read_safetensors_header, iter_chunks, _varint, ckpt_entry_header, CkptWriter,
    _read_varint, _skip_field, scan_ckpt, load_ckpt_lean, check_ckpt_crc, safetensors_header, AtomicFile,
)


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
        _warn(f"{folder} holds temporary file(s) of an interrupted run, safe to delete: {_names(sorted(stale))}")


def check_free_space(folder, nbytes):
    free = shutil.disk_usage(folder).free
    if free < nbytes + 64 * 1024 * 1024:
        raise LlavaError(f"not enough free space in {folder}: the output needs {_mb(nbytes)}, "
                         f"{_mb(free)} are free")


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
            import llava_config
            import weight_map
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
    return llava_config, weight_map


def load_llava_config(path):
    """LlavaConfig from a llava-hf config.json (LlavaError naming the file when it is not one)."""
    if not os.path.isfile(path):
        raise LlavaError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LlavaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    llava_config, _ = _import_model_modules()
    try:
        return llava_config.LlavaConfig.from_hf_config(hf)
    except LlavaError as e:
        raise LlavaError(f"{path}: {e}") from e


def check_names(tensors, config, what, to_ms=True):
    """Match a file's tensors (name -> TensorInfo) against the model's table; LlavaError listing every problem.

    Returns [(model name, file name, TensorInfo)] in the model's parameter order and the skipped names.
    """
    _, weight_map = _import_model_modules()
    expected = weight_map.expected_params(config)
    present, unknown, skipped = {}, [], []
    for name in tensors:
        if to_ms and weight_map.is_ignored_hf(name):
            skipped.append(name)
            continue
        try:
            ms = weight_map.hf_to_ms(name) if to_ms else name
            if not to_ms:
                weight_map.ms_to_hf(name)
        except LlavaError:
            unknown.append(name)
            continue
        if ms not in expected:
            unknown.append(name)   # e.g. a layer index beyond the config's layer count
            continue
        present[ms] = name
    missing = [(weight_map.ms_to_hf(n) if to_ms else n) for n in expected if n not in present]
    bad_shape, bad_dtype = [], []
    for ms, name in present.items():
        t = tensors[name]
        if t.shape != expected[ms][0]:
            bad_shape.append(f"{name} {list(t.shape)} (config: {list(expected[ms][0])})")
        if (SF_TO_DTYPE if to_ms else MS_TO_DTYPE).get(t.dtype) is None:
            bad_dtype.append(f"{name} ({t.dtype})")
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {_names(sorted(unknown))}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {_names(bad_shape)}")
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} tensor(s) with a non-float dtype: {_names(bad_dtype)}")
    if problems:
        raise LlavaError(f"{what} does not match the LLaVA config: " + "; ".join(problems))
    return [(ms, present[ms], tensors[present[ms]]) for ms in expected], skipped


# ----------------------------------------------------------------------------------------------------------
# forward: llava-hf folder -> .ckpt

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _refuse_pickle(path):
    raise LlavaError(f"{path}: PyTorch pickle files are not read (loading a pickle can run code); "
                     f"use the model's safetensors files (model.safetensors or model-*.safetensors with "
                     f"model.safetensors.index.json) in a folder with config.json")


def find_hf_tensors(folder):
    """name -> TensorInfo over the folder's model.safetensors or its index's shards (headers only)."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except OSError as e:
            raise LlavaError(f"cannot read {index_path}: {e.strerror or e}") from e
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise LlavaError(f"{index_path} is not a safetensors index (no 'weight_map' of file names)") from e
        files = sorted(set(weight_map.values()))
        absent = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
        if absent:
            raise LlavaError(f"{index_path} lists shard file(s) that do not exist: {_names(absent)}")
        tensors = {}
        for name in files:
            for key, info in read_safetensors_header(os.path.join(folder, name)).items():
                if key in tensors:
                    raise LlavaError(f"{key} is stored twice: in {tensors[key].path} and {info.path}")
                tensors[key] = info
        not_there = [k for k, v in weight_map.items()
                     if k not in tensors or os.path.basename(tensors[k].path) != v]
        not_listed = [k for k in tensors if k not in weight_map]
        if not_there:
            raise LlavaError(f"{index_path} maps key(s) to shards that do not hold them: {_names(not_there)}")
        if not_listed:
            raise LlavaError(f"{index_path} does not list key(s) found in its shards: {_names(not_listed)}")
        return tensors
    if os.path.exists(single):
        return read_safetensors_header(single)
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        _refuse_pickle(os.path.join(folder, pickles[0]))
    raise LlavaError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def convert_hf_to_ms(input_path, output_path, dtype=None, quiet=False):
    if not os.path.exists(input_path):
        raise LlavaError(f"input folder {input_path} does not exist")
    if not os.path.isdir(input_path):
        if input_path.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(input_path)
        raise LlavaError(f"--input_path {input_path} is a file; give the llava-hf folder that holds "
                         f"config.json and the safetensors files")
    out_folder = check_output_file(output_path, ".ckpt")
    config_path = os.path.join(input_path, "config.json")
    if not os.path.isfile(config_path):
        raise LlavaError(f"{input_path} has no config.json (expected a llava-hf model folder)")
    tensors = find_hf_tensors(input_path)     # file-level checks first: they need no model code
    config = load_llava_config(config_path)
    plan, skipped = check_names(tensors, config, input_path, to_ms=True)
    out_dtype = {ms: dtype or SF_TO_DTYPE[t.dtype] for ms, _, t in plan}
    out_bytes = {ms: math.prod(t.shape) * ITEMSIZE[out_dtype[ms]] for ms, _, t in plan}
    total = sum(out_bytes.values())
    check_free_space(out_folder, total)
    # read in file order (sequential I/O); the checkpoint order does not matter to load_checkpoint
    plan.sort(key=lambda p: (p[2].path, p[2].offset))
    _say(quiet, f"{PROG}: {input_path} -> {output_path}: {len(plan)} tensors, {_mb(total)}"
                + (f", skipping {len(skipped)} buffer(s): {_names(skipped)}" if skipped else ""))
    progress = _progress(total, len(plan), "hf -> ckpt", quiet)
    start = time.monotonic()
    overflows, files = {}, {}
    try:
        with AtomicFile(output_path) as out:
            writer = CkptWriter(out.f)
            for i, (ms, _, t) in enumerate(plan, 1):
                src = SF_TO_DTYPE[t.dtype]
                f = files.get(t.path) or files.setdefault(t.path, open(t.path, "rb"))
                pieces = _converted(iter_chunks(f, t.segments, SF_ITEMSIZE[t.dtype]), src, out_dtype[ms],
                                    overflows, t.name)
                writer.write_tensor(ms, t.shape, out_dtype[ms], out_bytes[ms], pieces, progress)
                progress.set_postfix_str(f"{i}/{len(plan)} tensors", refresh=False)
            out.f.flush()
            _verify_ckpt(out.tmp, {ms: (t.shape, out_dtype[ms], out_bytes[ms]) for ms, _, t in plan})
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
              f"{_names(sorted(overflows))}")
    _done(quiet, f"{PROG}: wrote {output_path} ({len(plan)} tensors, {_mb(total)}, "
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
# reversed: .ckpt -> model.safetensors

def convert_ms_to_hf(input_path, output_path, config_path=None, dtype=None, quiet=False):
    if not os.path.exists(input_path):
        raise LlavaError(f"input checkpoint {input_path} does not exist")
    if os.path.isdir(input_path):
        raise LlavaError(f"--input_path {input_path} is a folder; give the .ckpt file")
    if output_path.endswith(".safetensors"):
        out_file = output_path
    else:
        if not os.path.isdir(output_path):
            raise LlavaError(f"output folder {output_path} does not exist "
                             f"(or give a file name ending with .safetensors)")
        out_file = os.path.join(output_path, "model.safetensors")
    out_folder = check_output_file(out_file, ".safetensors")
    if config_path is None:
        config_path = os.path.join(out_folder, "config.json")
        if not os.path.isfile(config_path):
            raise LlavaError(f"no config.json in {out_folder}; pass the model's config with --config")
    if not os.path.isfile(config_path):
        raise LlavaError(f"config file {config_path} does not exist")
    tensors = scan_ckpt(input_path)
    check_ckpt_crc(input_path)
    config = load_llava_config(config_path)
    plan, _ = check_names(tensors, config, input_path, to_ms=False)
    _, weight_map = _import_model_modules()
    rows = []
    for ms, _, t in plan:
        out = dtype or MS_TO_DTYPE[t.dtype]
        rows.append((weight_map.ms_to_hf(ms), out, t, math.prod(t.shape) * ITEMSIZE[out]))
    rows.sort(key=lambda r: r[0])
    header = safetensors_header([(hf, DTYPE_TO_SF[out], t.shape, n) for hf, out, t, n in rows])
    total = sum(r[3] for r in rows)
    check_free_space(out_folder, total + len(header))
    _say(quiet, f"{PROG}: {input_path} -> {out_file}: {len(rows)} tensors, {_mb(total)}")
    progress = _progress(total, len(rows), "ckpt -> hf", quiet)
    start = time.monotonic()
    overflows = {}
    try:
        with AtomicFile(out_file) as out, open(input_path, "rb") as src_f:
            out.f.write(header)
            for i, (hf, out_dtype, t, nbytes) in enumerate(rows, 1):
                src = MS_TO_DTYPE[t.dtype]
                written = 0
                for data in _converted(iter_chunks(src_f, t.segments, ITEMSIZE[src]), src, out_dtype,
                                       overflows, hf):
                    out.f.write(data)
                    n = len(memoryview(data).cast("B"))
                    written += n
                    progress.update(n)
                if written != nbytes:
                    raise LlavaError(f"internal error: {hf} got {written} of {nbytes} bytes")
                progress.set_postfix_str(f"{i}/{len(rows)} tensors", refresh=False)
            out.f.flush()
            got = read_safetensors_header(out.tmp)
            if {k: (v.dtype, v.shape) for k, v in got.items()} != \
                    {hf: (DTYPE_TO_SF[o], tuple(t.shape)) for hf, o, t, _ in rows}:
                raise LlavaError(f"internal error: {out.tmp} was not written as intended")
            out.commit()
    except OSError as e:
        raise LlavaError(f"conversion failed: {e.filename or out_file}: {e.strerror or e}") from e
    finally:
        progress.close()
    seconds = time.monotonic() - start
    if overflows:
        _warn(f"{len(overflows)} tensor(s) had values beyond the {dtype} range (now inf): "
              f"{_names(sorted(overflows))}")
    _done(quiet, f"{PROG}: wrote {out_file} ({len(rows)} tensors, {_mb(total)}, {seconds:.2f} s)")
    return out_file


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
                    help="OUT.ckpt (forward) or a folder / FILE.safetensors (--reversed)")
    ap.add_argument("--dtype", default=None,
                    help="output dtype: float32, float16 or bfloat16 (also fp32/fp16/bf16); "
                         "default: keep each tensor's stored dtype")
    ap.add_argument("--reversed", action="store_true", help="MindSpore .ckpt -> Hugging Face safetensors")
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
