"""The run behind run_mindformer.py: `Job` (yaml read once, context, registry, this rank's weights, the engine),
shared by every run mode, and the predict mode itself (IMAGE PROMPT pairs -> streamed answer + JSONL records).

MindFormers' own entry points (its run_mindformer.py, Trainer.predict) reach the same predict steps through
llava_trainer.LlavaTrainer (`load_model`, `predict`, `write_results`).
"""
import contextlib
import json
import os
import signal
import sys

import weights
from file_checks import load_yaml
from generation import GenerationSettings, TextStreamer
from llava_errors import LlavaError

RESULTS_FILE = "predict_results.jsonl"

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
    return [(items[i], items[i + 1].replace("\\n", "\n")) for i in range(0, len(items), 2)]


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


def write_results(output_dir, records):
    """Append one JSON object per input in a single write, so a crash never leaves half a record."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_FILE)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(payload)
    except OSError as e:
        raise LlavaError(f"cannot write {path}: {e.strerror}") from None
    return path


def _check_output_dir(output_dir):
    """Fail before the model is built, not after minutes of generation. The folder is created and a probe
    file written: os.access() says yes to root on read-only places (sysfs, read-only mounts)."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise LlavaError(f"--output_dir {output_dir}: not a writable folder ({e.strerror or e})") from None


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


@contextlib.contextmanager
def console_to_log(path):
    """Send everything printed while MindFormers/MindSpore start up to the log file `path`: their import
    warnings, their console log handler (bound to sys.stdout when it is created, so it keeps writing to this
    file afterwards) and the C++ runtime's banners on fds 1 and 2. stdout belongs to the answer, stderr to the
    plugin's own messages; an exception still propagates and is reported after the console is restored."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)   # stays open: MindFormers' handler keeps it
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = streams
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
        _check_output_dir(self.output_dir)
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

    def load_model(self):
        """This rank's weights into the registered model; the engine that runs it."""
        self.tp = setup_parallel(self.config, self.model_config)
        self.model, self.checkpoint = load_model(self.config, self.model_config, self._model_cls, self.tp)
        _touch_device()
        self.engine = self.model.engine()

    def load(self):
        """The whole start of a run mode that needs no inputs first (chat, serve): check, build, load, announce."""
        self.check_checkpoint()
        with self.console():
            self.build()
            self.load_model()
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
    streamer = TextStreamer(tokenizer, stream=stream or sys.stdout) if rank == 0 else None
    outputs = engine.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                              settings=settings, streamer=streamer)
    return [{"image": image, "prompt": prompt, "output_text": tokenizer.decode(ids, skip_special_tokens=True),
             "output_ids": [int(t) for t in ids]} for (image, prompt), ids in zip(requests, outputs)]


def restore_ctrl_c():
    """MindSpore's runtime installs its own SIGINT handler as it starts and whenever it compiles a graph (Ctrl-C
    then ends the process with SIGTERM, saying nothing): put Python's back, so that Ctrl-C is a
    KeyboardInterrupt that the run modes handle (chat: stop the answer)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run(args, root):
    pairs = parse_predict_data(args.predict_data, args.modal_type)
    job = Job(args, root)
    loaded = load_images(pairs, job.data["processor"])   # bad paths/URLs fail in a second, before the imports
    job.check_checkpoint()
    with job.console():
        job.build()
        # checks the length budget before the model is built
        inputs = job.processor.process(loaded, max_new_tokens=job.settings.max_new_tokens)
        job.load_model()
    job.announce()

    records = predict(job.engine, job.tokenizer, pairs, inputs, job.settings, job.tp.rank)
    if job.tp.rank == 0:
        path = write_results(job.output_dir, records)
        print(f"[results appended to {path}]", file=sys.stderr)
    return 0
