"""The predict job behind run_mindformer.py: config → context → registry → inputs → model → results.

MindFormers' `Trainer(config).predict` path builds networks through semi-auto parallel checkpoint
transformation and Ascend-oriented loading, which does not run on CPU; this module keeps MindFormers'
launcher flags, yaml layout, `MindFormerConfig`, `build_context` and registry (`MindFormerRegister`) and
calls the registered LLaVA classes directly (README, "How predict runs").
"""
import contextlib
import json
import logging
import os
import sys

import yaml

import weights
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
    if not os.path.isfile(path):
        raise LlavaError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlavaError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
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


def load_config(args, root):
    from mindformers import MindFormerConfig
    path = _resolve(args.config, root)
    read_yaml(path)
    config = MindFormerConfig(path)
    config.run_mode = "predict"
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
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    if args.vocab_file is not None:
        config.processor.tokenizer.vocab_file = args.vocab_file
    vocab = config.processor.tokenizer.get("vocab_file")
    if not vocab:
        raise LlavaError(f"--config {path}: processor.tokenizer.vocab_file is not set (or pass --vocab_file)")
    config.processor.tokenizer.vocab_file = _resolve(vocab, root)
    for key in GENERATION_FLAGS:
        value = getattr(args, key)
        if value is not None:
            config.model.model_config[key] = value
    config.output_dir = os.path.abspath(config.output_dir or "./output")
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
def stdout_to_stderr():
    """Route fd 1 to stderr while MindFormers/MindSpore start up: their log handlers and C++ runtime print
    to stdout, which belongs to the answer (scripts read it)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quiet_mindformers_console(level=logging.WARNING):
    """MindFormers logs INFO to the console; keep its console at WARNING (its log files stay complete)."""
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("mindformers") and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if type(handler).__name__ == "LimitedRepeatHandler":
                    handler.setLevel(max(handler.level, level))


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


def run(args, root):
    pairs = parse_predict_data(args.predict_data, args.modal_type)
    data = read_yaml(_resolve(args.config, root))
    output_dir = os.path.abspath(args.output_dir or data.get("output_dir") or "./output")
    _check_output_dir(output_dir)
    loaded = load_images(pairs, data["processor"])   # bad paths/URLs fail in a second, before the imports
    weights.check_early(args.load_checkpoint if args.load_checkpoint is not None else data.get("load_checkpoint"))
    # MindFormers writes its log under ./output unless told otherwise: keep it inside --output_dir.
    os.environ.setdefault("LOG_MF_PATH", os.path.join(output_dir, "log"))
    os.environ.setdefault("LOCAL_DEFAULT_PATH", output_dir)   # MindFormers' output root (parallel: ./output/strategy)
    with stdout_to_stderr():
        from mindformers import build_context
        quiet_mindformers_console()
        config = load_config(args, root)
        config.output_dir = output_dir
        build_device_context(config, build_context)

        model_config, tokenizer, processor, model_cls = build_components(config)
        settings = GenerationSettings.from_config(model_config)
        # loads and checks every image, and the length budget, before the model is built
        inputs = processor.process(loaded, max_new_tokens=settings.max_new_tokens)
        tp = setup_parallel(config, model_config)
        ckpt = weights.rank_checkpoint(config.load_checkpoint, tp, model_config, config.auto_trans_ckpt, output_dir)
        from mindspore.nn.utils import no_init_parameters
        with no_init_parameters():  # weights come from the checkpoint: never allocate them twice
            model = model_cls(config=model_config, tensor_parallel=tp)
        weights.load_into(model, ckpt, tp)
        _touch_device()
        if tp.enabled:
            nbytes = sum(p.nbytes for p in model.weight_parameters().values())
            lm = sum(p.nbytes for n, p in model.weight_parameters().items() if n.startswith("language_model."))
            print(f"[rank {tp.rank}/{tp.world}] loaded {ckpt.path}: {nbytes} weight bytes "
                  f"({lm} in the language model)", file=sys.stderr)

    # every rank computes the same tokens (logits are gathered); rank 0 alone speaks and writes
    streamer = TextStreamer(tokenizer, stream=sys.stdout) if tp.rank == 0 else None
    outputs = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                             streamer=streamer)
    if tp.rank != 0:
        return 0
    records = [{"image": image, "prompt": prompt, "output_text": tokenizer.decode(ids, skip_special_tokens=True),
                "output_ids": [int(t) for t in ids]} for (image, prompt), ids in zip(pairs, outputs)]
    path = write_results(output_dir, records)
    print(f"[results appended to {path}]", file=sys.stderr)
    return 0
