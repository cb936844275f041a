"""MindFormers' own entry points, driven as a MindFormers user drives them (tests/test_mindformers.py runs this
file in a subprocess, from a MindFormers-checkout-like folder holding the plugin at research/llava).

    mindformers_run.py script ARGS...     what MindFormers' repository run_mindformer.py does for --run_mode predict
    mindformers_run.py trainer OUT.json YAML CKPT [stock] IMAGE PROMPT ...   Trainer(args=config).predict(...)
    mindformers_run.py pipeline OUT.json YAML CKPT IMAGE PROMPT ...          mindformers.pipeline(task=...)

`script` follows run_mindformer.py (r1.8.0 = master): flags parsed with argparse (str2bool), --config and
--register_path made absolute against the script's own folder, REGISTER_PATH set and the folder appended to
sys.path, MindFormerConfig(config, run_mode=...), the flag overrides, the predict data turned into one query
`[[{modal: item}, ...]]` by create_multi_modal_predict_data (which checks image files' extensions,
case-sensitively), then set_output_path, build_context, Trainer(config).predict(predict_checkpoint=
config.load_checkpoint, input_data=config.input_data, batch_size=config.predict_batch_size, adapter_id=...).
"""
import argparse
import json
import os
import sys

MULTI_MODAL_FILETYPES = {"video": (".mp4", ".avi", ".mkv"), "image": (".jpg", ".jpeg", ".png", ".bmp")}
TASK = "multi_modal_to_text_generation"


def str2bool(b):
    if b.lower() not in ["false", "true"]:
        raise Exception("Invalid Bool Value")
    return b.lower() == "true"


def multi_modal_query(items, modal_types):
    if len(items) != len(modal_types):
        raise ValueError("the length of predict_data and modal_type should be the same")
    query = []
    for item, modal in zip(items, [m.lower() for m in modal_types]):
        if modal == "text":
            query.append({modal: item})
            continue
        if modal not in MULTI_MODAL_FILETYPES:
            raise ValueError(f"The modal_type {modal} is not supported")
        if not item.endswith(MULTI_MODAL_FILETYPES[modal]):
            raise ValueError(f"the file type of {item} is not supported with modal_type={modal}")
        query.append({modal: item})
    return query


def script(argv):
    from mindformers import Trainer, build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils.file_utils import set_output_path

    work_path = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--mode", type=int)
    p.add_argument("--device_target")
    p.add_argument("--run_mode")
    p.add_argument("--predict_data", nargs="+")
    p.add_argument("--modal_type", nargs="+")
    p.add_argument("--predict_batch_size", type=int)
    p.add_argument("--load_checkpoint")
    p.add_argument("--auto_trans_ckpt", type=str2bool)
    p.add_argument("--use_parallel", type=str2bool)
    p.add_argument("--output_dir")
    p.add_argument("--register_path")
    p.add_argument("--do_sample", type=str2bool)
    args = p.parse_args(argv)
    if not os.path.isabs(args.config):
        args.config = os.path.join(work_path, args.config)
    if args.register_path is not None:
        if not os.path.isabs(args.register_path):
            args.register_path = os.path.join(work_path, args.register_path)
        os.environ["REGISTER_PATH"] = args.register_path
        if args.register_path not in sys.path:
            sys.path.append(args.register_path)
    config = MindFormerConfig(args.config, run_mode=args.run_mode) if args.run_mode else MindFormerConfig(args.config)
    if args.device_target is not None:
        config.context.device_target = args.device_target
    if args.mode is not None:
        config.context.mode = args.mode
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.do_sample is not None:
        config.model.model_config.do_sample = args.do_sample
    data = args.predict_data
    if len(data) == 1 and args.modal_type is None:
        data = data[0].replace(r"\n", "\n")
    if args.modal_type is not None:
        data = [multi_modal_query(data, args.modal_type)]
    config.input_data = data
    if args.predict_batch_size is not None:
        config.predict_batch_size = args.predict_batch_size
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config)
    trainer.predict(predict_checkpoint=config.load_checkpoint, input_data=config.input_data,
                    batch_size=config.predict_batch_size, adapter_id=config.adapter_id)


def _config(yaml_path, ckpt, out_dir, stock=False):
    from mindformers import MindFormerConfig, build_context
    plugin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "research", "llava")
    os.environ["REGISTER_PATH"] = plugin
    sys.path.append(plugin)
    config = MindFormerConfig(yaml_path, run_mode="predict")
    config.output_dir = out_dir
    config.load_checkpoint = ckpt
    if stock:   # MindFormers' own multi-modal trainer and its checkpoint loading (load_ckpt)
        config.trainer = MindFormerConfig(type="MultiModalToTextGenerationTrainer", model_name="llava")
        config.save_file = os.path.join(out_dir, "result.txt")
    build_context(config)
    return config


def trainer(out_json, yaml_path, ckpt, *rest):
    from mindformers import Trainer
    stock = rest[0] == "stock"
    items = rest[1:] if stock else rest
    config = _config(yaml_path, ckpt, os.path.dirname(out_json), stock)
    query = [[{"image": items[i]}, {"text": items[i + 1]}] for i in range(0, len(items), 2)]
    result = Trainer(args=config).predict(predict_checkpoint=ckpt, input_data=query)
    with open(out_json, "w") as f:
        json.dump(result, f)


def pipeline(out_json, yaml_path, ckpt, *items):
    import mindspore as ms
    from mindformers import pipeline as mf_pipeline
    from mindformers.models import build_network, build_processor
    config = _config(yaml_path, ckpt, os.path.dirname(out_json))
    model = build_network(config.model)
    ms.load_param_into_net(model, ms.load_checkpoint(ckpt))
    processor = build_processor(config.processor)
    pipe = mf_pipeline(task=TASK, model=model, processor=processor)
    query = [[{"image": items[i]}, {"text": items[i + 1]}] for i in range(0, len(items), 2)]
    texts = pipe(query)
    ids = [pipe.forward(pipe.preprocess(q))["output_ids"][0] for q in query]
    with open(out_json, "w") as f:
        json.dump({"texts": texts, "ids": [[int(t) for t in row] for row in ids],
                   "model_class": f"{type(model).__module__}.{type(model).__name__}"}, f)


if __name__ == "__main__":
    {"script": lambda a: script(a), "trainer": lambda a: trainer(*a), "pipeline": lambda a: pipeline(*a)}[
        sys.argv[1]](sys.argv[2:])
