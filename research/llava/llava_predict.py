"""The run behind run_mindformer.py: `Job` (yaml read once, context, registry, this rank's weights, the engine),
shared by every run mode, and the predict mode itself (IMAGE PROMPT pairs -> streamed answer + JSONL records).

MindFormers' own entry points (its run_mindformer.py, Trainer.predict) reach the same predict steps through
llava_trainer.LlavaTrainer (`load_model`, `predict`, `write_results`).
"""
import contextlib
import errno
import json
import logging
import os
import re
import signal
import sys

import weights
from file_checks import load_yaml
from generation import GenerationSettings, TextStreamer
from llava_errors import LlavaError

RESULTS_FILE = "predict_results.jsonl"
# The output folder's disk must have this much room when a run starts (results and logs take a few KiB per
# run); the probe written there is PROBE_BYTES.
MIN_FREE_BYTES = 1 << 20
PROBE_BYTES = 64 << 10
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Top-level keys of MindFormers' predict yaml (the seed's research/llava config) that this job reads or
# tolerates; anything else is most likely a typo and is reported.
KNOWN_TOP_LEVEL = {
    "seed", "output_dir", "load_checkpoint", "auto_trans_ckpt", "only_save_strategy", "resume_training",
    "use_parallel", "run_mode", "trainer", "runner_config", "optimizer", "lr_schedule", "callbacks",
    "parallel_config", "micro_batch_interleave_num", "recompute_config", "model", "processor", "context",
    "parallel", "profile", "profile_start_step", "profile_stop_step", "init_start_profile",
    "profile_communication", "profile_memory", "src_strategy_path_or_dir", "load_ckpt_format",
}
GENERATION_FLAGS = ("max_new_tokens", "max_decode_length", "do_sample", "top_k", "top_p", "temperature",
                    "repetition_penalty", "seed")
PLUGIN_MODULES = ("llava_config", "llava_tokenizer", "llava_processor", "llava_model")


def _resolve(path, root):
    """A relative path is taken from the current folder, else from the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def read_yaml(path):
    """Safe-load the yaml and check its overall shape (MindFormerConfig itself is lenient)."""
    data = load_yaml(path, "--config")     # the one bounded yaml reader (file_checks)
    if not isinstance(data, dict):
        raise LlavaError(f"--config {path}: the top level must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - KNOWN_TOP_LEVEL)
    if unknown:
        raise LlavaError(f"--config {path}: unknown top-level key(s) {', '.join(unknown)}")
    for section in ("model", "processor", "context"):
        if not isinstance(data.get(section), dict):
            raise LlavaError(f"--config {path}: missing or invalid section '{section}'")
    if not isinstance(data["model"].get("model_config"), dict):
        raise LlavaError(f"--config {path}: missing section 'model.model_config'")
    if not isinstance(data["processor"].get("tokenizer"), dict):
        raise LlavaError(f"--config {path}: missing section 'processor.tokenizer'")
    return data


def load_config(data, path, args, root, output_dir):
    """MindFormerConfig from the yaml's already-read `data`, with the command line's overrides."""
    import copy
    from mindformers import MindFormerConfig
    from mindformers.tools.register.template import ConfigTemplate
    values = dict(copy.deepcopy(data), run_mode="predict", output_dir=output_dir)
    ConfigTemplate.apply_template(values)      # the defaults MindFormerConfig(path) fills in
    config = MindFormerConfig(**values)
    if args.device_target is not None:
        config.context.device_target = args.device_target
    if args.device_id is not None:
        config.context.device_id = args.device_id
    if args.mode is not None:
        config.context.mode = args.mode
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.vocab_file is not None:
        config.processor.tokenizer.vocab_file = args.vocab_file
    vocab = config.processor.tokenizer.get("vocab_file")
    if not vocab:
        raise LlavaError(f"--config {path}: processor.tokenizer.vocab_file is not set (or pass --vocab_file)")
    config.processor.tokenizer.vocab_file = _resolve(vocab, root)
    return config


def parse_predict_data(items, modal_types):
    """`IMAGE PROMPT [IMAGE PROMPT ...]` with `--modal_type image text` → [(image, prompt), ...]."""
    if not items:
        raise LlavaError("--predict_data is required: IMAGE PROMPT [IMAGE PROMPT ...]")
    modal = [m.lower() for m in (modal_types or ["image", "text"])]
    if modal != ["image", "text"] and modal != ["image", "text"] * (len(modal) // 2):
        raise LlavaError(f"--modal_type must be 'image text' (one image and one prompt per input), got {' '.join(modal)}")
    if len(modal) > 2 and len(modal) != len(items):
        raise LlavaError(f"--modal_type has {len(modal)} items but --predict_data has {len(items)}")
    if len(items) % 2:
        raise LlavaError(f"--predict_data needs IMAGE PROMPT pairs, got {len(items)} item(s): "
                         f"the last image has no prompt")
    for i in range(1, len(items), 2):
        bad = undecodable(items[i])
        if bad:
            raise LlavaError(f"--predict_data: the prompt of input {i // 2 + 1} is not valid UTF-8 ({bad})")
    return [(items[i], items[i + 1].replace("\\n", "\n")) for i in range(0, len(items), 2)]


def undecodable(text):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates (surrogateescape): None when `text`
    is valid UTF-8, else "byte 0xNN at position P" for the first bad byte."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            pos = len(text[:i].encode("utf-8", "surrogateescape"))
            code = ord(ch)
            return f"byte 0x{code - 0xDC00:02x} at position {pos}" if 0xDC80 <= code <= 0xDCFF else \
                f"code point U+{code:04X} at position {pos}"
    return None


def register_plugin(config):
    """Import the plugin modules once, as top-level modules, and drop the yaml's `auto_register` keys.

    MindFormers' auto_register would import each file a second time under another module name (and copy it
    to a cache outside the output folder); the classes are already registered by these imports.
    """
    for name in PLUGIN_MODULES:
        __import__(name)

    def strip(node):
        if isinstance(node, dict):
            node.pop("auto_register", None)
            for value in node.values():
                strip(value)
    strip(config.model)
    strip(config.processor)


# A lone surrogate is an undecodable byte of an image path (surrogateescape); JSON writes it as the escape
# \udcNN, so json.loads + os.fsencode give the path's bytes back.
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(record):
    """One JSONL line: UTF-8 text as it is, an undecodable path byte 0xNN as the JSON escape \\udcNN."""
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def _mount_point(path):
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(folder):
    """Bytes an unprivileged write may still use on `folder`'s disk; None for pseudo file systems."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize if st.f_blocks else None


def disk_of(folder):
    """"the disk mounted at M (N free)" for messages about `folder`."""
    try:
        free = free_bytes(folder)
        return f"the disk mounted at {_mount_point(folder)}" + (f" ({_size(free)} free)" if free is not None else "")
    except OSError:
        return f"the disk of {folder}"


def write_results(output_dir, records):
    """Append one JSON line per record with a single write to an O_APPEND file: all the records or none. A
    write the disk cannot take (full, quota) is undone: the file is cut back to its previous size (removed if
    this call created it), so predict_results.jsonl stays valid JSONL whatever happens."""
    path = os.path.join(output_dir, RESULTS_FILE)
    payload = "".join(json_line(r) for r in records).encode("utf-8")
    created = False
    try:
        os.makedirs(output_dir, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        raise LlavaError(_write_error(path, output_dir, e, len(records))) from None
    try:
        before = os.fstat(fd).st_size
        try:
            written = os.write(fd, payload)
            if written != len(payload):       # a short write: the disk filled up part way
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            if created:
                os.unlink(path)
            else:
                os.ftruncate(fd, before)
            raise LlavaError(_write_error(path, output_dir, e, len(records))) from None
    finally:
        os.close(fd)
    return path


def _write_error(path, output_dir, e, count):
    where = f"{disk_of(output_dir)} is full" if e.errno in FULL_DISK else (e.strerror or str(e))
    return (f"cannot append to {path}: {where}; none of the {count} answer(s) was saved "
            f"(the file is as it was before this run)")


def _check_output_dir(output_dir):
    """Fail before the model is built, not after minutes of generation: the folder is created, a probe file of
    PROBE_BYTES written, synced and removed (os.access() says yes to root on read-only places such as sysfs or
    read-only mounts, and statvfs alone misses quotas), and the disk must have MIN_FREE_BYTES left."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if os.write(fd, b"\0" * PROBE_BYTES) != PROBE_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = free_bytes(output_dir)
    except OSError as e:
        if e.errno in FULL_DISK:
            raise LlavaError(f"--output_dir {output_dir}: {disk_of(output_dir)} is full "
                             f"({e.strerror}): free some space or choose another folder") from None
        raise LlavaError(f"--output_dir {output_dir}: not a writable folder ({e.strerror or e})") from None
    if free is not None and free < MIN_FREE_BYTES:
        raise LlavaError(f"--output_dir {output_dir}: {disk_of(output_dir)} is nearly full, at least "
                         f"{_size(MIN_FREE_BYTES)} is needed for the results and logs: free some space or "
                         f"choose another folder")


def setup_parallel(config, model_config):
    """The tensor-parallel group of this process, checked against the yaml and the model's shapes."""
    import weight_map
    from parallel import TensorParallel
    mp = int((config.get("parallel_config") or {}).get("model_parallel", 1) or 1)
    if not config.use_parallel:
        if mp > 1:
            raise LlavaError(f"parallel_config.model_parallel={mp} needs --use_parallel True under "
                             f"scripts/msrun_launcher.sh with {mp} workers")
        return TensorParallel()
    tp = TensorParallel.from_communication()
    if tp.world != mp:
        raise LlavaError(f"parallel_config.model_parallel={mp} but the job was launched with {tp.world} "
                         f"rank(s); set model_parallel to the launcher's worker count")
    weight_map.check_parallel(model_config, tp.world)
    return tp


def build_components(config):
    """The registered LlavaConfig, LlavaTokenizer, LlavaProcessor and LlavaModel, from the yaml."""
    from mindformers.models.build_config import build_model_config
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    register_plugin(config)
    model_config = build_model_config(config.model.model_config)
    tokenizer = build_tokenizer(config.processor.tokenizer)
    processor_cfg = {k: v for k, v in config.processor.items() if k not in ("type", "tokenizer")}
    processor_cls = MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, config.processor.get("type", "LlavaProcessor"))
    processor = processor_cls(config=model_config, tokenizer=tokenizer, **processor_cfg)
    arch = dict(config.model.arch)
    model_cls = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch.pop("type", "LlavaModel"))
    return model_config, tokenizer, processor, model_cls


# Where a note about an unwritable log goes: the real stderr, also while fds 1/2 point at the console log.
_stderr_fd = 2
_log_trouble = []


def note_log_trouble(where, error):
    """Say once, in one line on the real stderr, that a log cannot be written (a full disk): logging then goes
    on quietly instead of printing "--- Logging error ---" and a traceback per record."""
    if _log_trouble:
        return
    _log_trouble.append(where)
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    with contextlib.suppress(OSError):
        os.write(_stderr_fd, f"[log not written: {where}: {reason}; further log errors are not shown]\n".encode(
            "utf-8", "backslashreplace"))


def _handle_log_error(handler, record):
    """logging.Handler.handleError for every handler of this process (MindFormers' file handlers included)."""
    note_log_trouble(getattr(handler, "baseFilename", None) or type(handler).__name__, sys.exc_info()[1])


def quiet_log_errors():
    logging.Handler.handleError = _handle_log_error


class QuietLog:
    """The console log as a text stream that never raises: a write the disk cannot take is dropped (and noted
    once), so a full disk cannot turn a print() or a warning during start-up into a traceback."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        try:
            self.f.write(text)
        except (OSError, ValueError) as e:
            note_log_trouble(self.f.name, e)
        return len(text)

    def flush(self):
        try:
            self.f.flush()
        except (OSError, ValueError) as e:
            note_log_trouble(self.f.name, e)

    def fileno(self):
        return self.f.fileno()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextlib.contextmanager
def console_to_log(path):
    """Send everything printed while MindFormers/MindSpore start up to the log file `path`: their import
    warnings, their console log handler (bound to sys.stdout when it is created, so it keeps writing to this
    file afterwards) and the C++ runtime's banners on fds 1 and 2. stdout belongs to the answer, stderr to the
    plugin's own messages; an exception still propagates and is reported after the console is restored."""
    global _stderr_fd
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    log = QuietLog(raw)           # stays open: MindFormers' handler keeps it
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    os.dup2(raw.fileno(), 1)
    os.dup2(raw.fileno(), 2)
    sys.stdout = sys.stderr = log
    _stderr_fd = saved[1]
    try:
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = streams
        _stderr_fd = 2
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _touch_device():
    """Run one tiny op so the runtime prints its allocator banner now (to stderr), not into the answer."""
    import mindspore as ms
    (ms.Tensor([1.0]) + 1).asnumpy()


def load_images(pairs, processor_cfg):
    """[(image, prompt)] -> [(decoded PIL image, prompt)], checked with the yaml's processor.timeout /
    max_bytes / max_pixels; image_loading needs no MindSpore/MindFormers, so this runs before their imports."""
    from image_loading import load_image
    limits = {}
    for key, kind in (("timeout", float), ("max_bytes", int), ("max_pixels", int)):
        if key in processor_cfg:
            value = processor_cfg[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LlavaError(f"processor.{key} must be a positive number, got {value!r}")
            limits[key] = kind(value)
    return [(load_image(image, **limits), prompt) for image, prompt in pairs]


def build_device_context(config, build_context):
    """MindFormers' build_context, then one tiny op: the runtime prints its allocator banner now, to stderr
    (after an error it would print it at exit, to stdout). MindSpore refusing the context (an unknown mode, a
    device this installation cannot drive) is bad input: one line, no traceback."""
    try:
        build_context(config)
    except (ValueError, TypeError, RuntimeError) as e:
        with contextlib.suppress(Exception):
            _touch_device()
        ctx = config.context
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LlavaError(f"MindSpore could not set up the context (device_target={ctx.get('device_target')!r}, "
                         f"mode={ctx.get('mode')!r}, use_parallel={bool(config.use_parallel)}): {first[:300]}") from None
    _touch_device()


class Job:
    """One run of run_mindformer.py, whatever its mode: the yaml read once, the output folder settled once,
    the registered components built once, the generation settings built once from the yaml and the flags,
    then the model loaded for this rank and its engine.

    The cheap checks (yaml, output folder, checkpoint file) run in the constructor and `check_checkpoint`,
    before MindSpore/MindFormers are imported; `build` and `load_model` run inside `console()`."""

    def __init__(self, args, root):
        self.args, self.root = args, root
        self.path = _resolve(args.config, root)
        self.data = read_yaml(self.path)
        self.output_dir = os.path.abspath(args.output_dir or self.data.get("output_dir") or "./output")
        quiet_log_errors()
        _check_output_dir(self.output_dir)
        real = os.path.realpath(self.output_dir)
        if real != self.output_dir:
            print(f"[output folder {self.output_dir} is {real} (through a symbolic link): results and logs "
                  f"are written there]", file=sys.stderr)
        # MindFormers writes its log under ./output unless told otherwise: keep it inside --output_dir.
        os.environ.setdefault("LOG_MF_PATH", os.path.join(self.output_dir, "log"))
        os.environ.setdefault("LOCAL_DEFAULT_PATH", self.output_dir)   # MindFormers' output root
        self.log_path = os.path.join(self.output_dir, "log", f"console_rank{os.environ.get('RANK_ID', '0')}.log")
        self.config = self.model_config = self.tokenizer = self.processor = self.settings = None
        self.tp = self.model = self.engine = self.checkpoint = None

    def check_checkpoint(self):
        args = self.args
        weights.check_early(args.load_checkpoint if args.load_checkpoint is not None
                            else self.data.get("load_checkpoint"))

    def console(self):
        return console_to_log(self.log_path)

    def build(self):
        """Context, config, tokenizer, processor and generation settings."""
        from mindformers import build_context
        self.config = load_config(self.data, self.path, self.args, self.root, self.output_dir)
        build_device_context(self.config, build_context)
        self.model_config, self.tokenizer, self.processor, self._model_cls = build_components(self.config)
        self.settings = GenerationSettings.from_config(
            self.model_config, **{k: getattr(self.args, k) for k in GENERATION_FLAGS})

    def load_model(self, batch=None, shrink_kv=False, caches=False):
        """This rank's weights into the registered model; the engine that runs it. The memory the run needs
        (`batch` rows at once; default the yaml's batch_size) is checked first (`self.memory`, the estimate;
        with shrink_kv a smaller KV pool is accepted when that is what fits, memory_budget.check). With
        `caches` (chat, serve) the pool has --prefix_cache_gb more for cached prefixes and the image cache
        --image_cache_mb; a one-shot run (predict) keeps only what its own batch shares."""
        import memory_budget
        args = self.args
        prefix_gb = getattr(args, "prefix_cache_gb", 0.0) if caches else 0.0
        image_mb = getattr(args, "image_cache_mb", 256) if caches else 256
        if prefix_gb < 0 or image_mb < 0:
            raise LlavaError(f"--prefix_cache_gb and --image_cache_mb must be >= 0, got {prefix_gb}, {image_mb}")
        self.tp = setup_parallel(self.config, self.model_config)
        cache_bytes = int(prefix_gb * 2 ** 30) // self.tp.world
        self.memory = memory_budget.check(self.model_config, batch, self.tp.world,
                                          self.config.context.get("device_target"),
                                          self.config.context.get("max_device_memory"), shrink_kv=shrink_kv,
                                          cache_bytes=cache_bytes, extra_bytes=int(image_mb * 2 ** 20))
        self.model, self.checkpoint = load_model(self.config, self.model_config, self._model_cls, self.tp)
        _touch_device()
        self.engine = self.model.engine()
        self.engine.configure_caches(prefix=not caches or prefix_gb > 0, image_bytes=int(image_mb * 2 ** 20),
                                     cache_bytes=cache_bytes)

    def load(self, batch=None, shrink_kv=False, caches=True):
        """The whole start of a run mode that needs no inputs first (chat, serve): check, build, load (for up to
        `batch` rows at once), announce."""
        self.check_checkpoint()
        with self.console():
            self.build()
            self.load_model(batch, shrink_kv, caches)
        self.announce()
        return self

    def announce(self):
        """Under tensor parallelism every rank says what it loaded (after the console is restored)."""
        tp, model = self.tp, self.model
        if tp.enabled:
            nbytes = sum(p.nbytes for p in model.weight_parameters().values())
            lm = sum(p.nbytes for n, p in model.weight_parameters().items() if n.startswith("language_model."))
            print(f"[rank {tp.rank}/{tp.world}] loaded {self.checkpoint.path}: {nbytes} weight bytes "
                  f"({lm} in the language model)", file=sys.stderr)


def load_model(config, model_config, model_cls, tp):
    """A new registered model holding this rank's weights from `config.load_checkpoint` (a .ckpt, rank folders
    or the llava-hf folder: weights.rank_checkpoint) -> (model, Checkpoint)."""
    from mindspore.nn.utils import no_init_parameters
    checkpoint = weights.rank_checkpoint(config.load_checkpoint, tp, model_config, config.auto_trans_ckpt,
                                         config.output_dir)
    with no_init_parameters():  # weights come from the checkpoint: never allocate them twice
        model = model_cls(config=model_config, tensor_parallel=tp)
    weights.load_into(model, checkpoint, tp)
    return model, checkpoint


def predict(engine, tokenizer, requests, inputs, settings, rank, stream=None):
    """Generate for processed `inputs` of the (image, prompt) `requests` -> one record per request,
    {"image", "prompt", "output_text", "output_ids"}. Every rank computes the same tokens (logits are gathered);
    rank 0 alone streams the answer to `stream` (stdout)."""
    streamer = CtrlCStreamer(tokenizer, stream=stream or sys.stdout) if rank == 0 else None
    outputs = engine.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                              settings=settings, streamer=streamer)
    return [{"image": image, "prompt": prompt, "output_text": tokenizer.decode(ids, skip_special_tokens=True),
             "output_ids": [int(t) for t in ids]} for (image, prompt), ids in zip(requests, outputs)]


def restore_ctrl_c():
    """MindSpore's runtime installs its own SIGINT handler as it starts and whenever it compiles a graph (Ctrl-C
    then ends the process with SIGTERM, saying nothing): put Python's back, so that Ctrl-C is a
    KeyboardInterrupt that the run modes handle (chat: stop the answer)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


class CtrlCStreamer(TextStreamer):
    """The answer's streamer, which puts Python's Ctrl-C back at every step (each graph compilation installs
    MindSpore's again)."""

    def put(self, token_ids):
        restore_ctrl_c()
        super().put(token_ids)


def run(args, root):
    pairs = parse_predict_data(args.predict_data, args.modal_type)
    job = Job(args, root)
    loaded = load_images(pairs, job.data["processor"])   # bad paths/URLs fail in a second, before the imports
    job.check_checkpoint()
    with job.console():
        job.build()
        from engine import check_budget
        inputs = job.processor.process(loaded)
        # the engine checks it again as it starts; here a prompt too long fails before the weights load
        check_budget(job.model_config, inputs["input_ids"], inputs["attention_mask"], job.settings.max_new_tokens)
        job.load_model(batch=len(pairs))
    job.announce()

    path = os.path.join(job.output_dir, RESULTS_FILE)
    saved = 0
    try:
        restore_ctrl_c()
        records = predict(job.engine, job.tokenizer, pairs, inputs, job.settings, job.tp.rank)
        if job.tp.rank == 0:
            write_results(job.output_dir, records)
            saved = len(records)
            print(f"[results appended to {path}]", file=sys.stderr)
    except KeyboardInterrupt:
        if job.tp.rank == 0:
            sys.stdout.write("\n")
            sys.stdout.flush()
        unchanged = "" if saved else " (the file is unchanged)"
        raise KeyboardInterrupt(f"{saved} of {len(pairs)} answers written to {path}{unchanged}") from None
    return 0
