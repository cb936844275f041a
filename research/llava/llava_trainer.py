"""LlavaTrainer: the yaml's `trainer.type`, so that MindFormers' own entry points run this plugin's predict job.

MindFormers' repository `run_mindformer.py --run_mode predict` and `mindformers.Trainer(args=config).predict(...)`
build the trainer named in the yaml and call its `predict(config=..., input_data=..., ...)`. The stock
MultiModalToTextGenerationTrainer would load weights through MindFormers' checkpoint transformation (with
`auto_trans_ckpt True`: strategy files of semi-auto parallel, not available for this explicitly split model) and
write `multi_modal_to_text_generation_result.txt` into the working folder. This trainer runs the same job as
this project's run_mindformer.py instead: the registered config/tokenizer/processor/model from the yaml, the
plugin's prompt template, strict loading of a complete checkpoint (sliced per rank with `auto_trans_ckpt True`)
or of `model_dir/rank_K/*.ckpt`, explicit tensor parallelism, the answer streamed to stdout by rank 0 and
`OUTPUT_DIR/predict_results.jsonl`. It returns the records (one per request).
"""
import os
import sys

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.trainer.multi_modal_to_text_generation import MultiModalToTextGenerationTrainer

from llava_errors import LlavaError
from mindformers_hooks import PLUGIN_DIR, tensor_parallel_for

REPO_ROOT = os.path.dirname(os.path.dirname(PLUGIN_DIR))


def requests_from_input(input_data):
    """MindFormers' spellings of predict data -> [(image or [images], prompt)]:
    run_mindformer.py with --modal_type gives [[{"image": A}, {"text": P}, ...]]; without it a list of strings
    `IMAGE PROMPT ...` (or one string); from Python also (image, prompt) pairs."""
    import llava_predict
    from llava_processor import LlavaProcessor
    if isinstance(input_data, str):
        input_data = [input_data]
    if not isinstance(input_data, (list, tuple)) or not input_data:
        raise LlavaError(f"predict data must be IMAGE PROMPT pairs or MindFormers' [{{'image': ...}}, "
                         f"{{'text': ...}}] queries, got {type(input_data).__name__}")
    if all(isinstance(x, str) for x in input_data):
        return llava_predict.parse_predict_data(list(input_data), None)
    pairs = LlavaProcessor.pairs_from_query_list(list(input_data))
    return [(images[0] if isinstance(images, list) and len(images) == 1 else images, prompt)
            for images, prompt in pairs]


def _resolve_vocab(config):
    """A relative vocab_file is taken from the working folder, else from this repository's root."""
    tok = config.processor.tokenizer
    vocab = tok.get("vocab_file")
    if vocab and not os.path.isabs(vocab) and not os.path.exists(vocab):
        candidate = os.path.join(REPO_ROOT, vocab)
        if os.path.exists(candidate):
            tok.vocab_file = candidate


def _barrier(tp):
    """All ranks wait here (one all-reduce): MindFormers' rank 0 re-creates OUTPUT_DIR/transformed_checkpoint
    when auto_trans_ckpt is set, which must be over before any rank writes its slice there."""
    if tp.enabled:
        from mindspore import Tensor
        from parallel import AllReduceSum
        AllReduceSum(tp)(Tensor([1.0])).asnumpy()


def predict_job(config, requests, network=None, stream=None):
    """The plugin's predict job on a MindFormerConfig whose context is built: -> one record per request,
    {"image", "prompt", "output_text", "output_ids"}; rank 0 streams the answer and appends the records to
    OUTPUT_DIR/predict_results.jsonl."""
    import llava_predict
    import weight_map
    import weights
    from engine import check_budget
    from generation import GenerationSettings

    config.output_dir = os.path.abspath(config.output_dir or "./output")
    _resolve_vocab(config)
    model_config, tokenizer, processor, model_cls = llava_predict.build_components(config)
    settings = GenerationSettings.from_config(model_config)
    inputs = processor.process(requests)
    check_budget(model_config, inputs["input_ids"], inputs["attention_mask"], settings.max_new_tokens)
    if network is None:
        # MindFormers' Trainer has turned parallel_config into a TransformerOpParallelConfig object by now
        tp = tensor_parallel_for(config.parallel_config)
        weight_map.check_parallel(model_config, tp.world)
        _barrier(tp)
        network, _ = llava_predict.load_model(config, model_config, model_cls, tp)
    elif config.load_checkpoint:
        checkpoint = weights.rank_checkpoint(config.load_checkpoint, network.tp, network.config,
                                             config.auto_trans_ckpt, config.output_dir)
        weights.load_into(network, checkpoint, network.tp)
    records = llava_predict.predict(network.engine(), tokenizer, requests, inputs, settings, network.tp.rank, stream)
    if network.tp.rank == 0:
        path = llava_predict.write_results(config.output_dir, records)
        print(f"[results appended to {path}]", file=sys.stderr)
    return records


@MindFormerRegister.register(MindFormerModuleType.TRAINER)
class LlavaTrainer(MultiModalToTextGenerationTrainer):
    """`trainer: {type: LlavaTrainer, auto_register: llava_trainer.LlavaTrainer}`: predict only."""

    def __init__(self, model_name: str = "llava", **kwargs):
        super().__init__(model_name=model_name)

    def train(self, *args, **kwargs):
        raise LlavaError("LlavaTrainer supports run_mode predict only (this plugin is inference-only)")

    finetune = train

    def evaluate(self, *args, **kwargs):
        raise LlavaError("LlavaTrainer supports run_mode predict only (this plugin is inference-only)")

    def predict(self, config=None, input_data=None, network=None, processor=None, **kwargs):
        """Called by mindformers.Trainer.predict with the full config; tokenizer/image_processor/batch_size
        and other MindFormers keywords are not used (the yaml's processor and one batch of all requests)."""
        if config is None:
            raise LlavaError("LlavaTrainer.predict needs the run's MindFormerConfig (config=...)")
        if input_data is None:
            raise LlavaError("no predict data: pass --predict_data IMAGE PROMPT (with --modal_type image text)")
        if processor is not None:
            raise LlavaError("LlavaTrainer builds its processor from the yaml's processor section")
        return predict_job(config, requests_from_input(input_data), network=network)
