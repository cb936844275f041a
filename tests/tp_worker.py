"""Run under msrun by tests/test_parallel.py and tests/test_lowbit.py: a tensor-parallel model's logits for one
image + prompt.

    msrun ... tests/tp_worker.py HF_DIR WEIGHTS WEIGHT_DTYPE SEQ_LENGTH IMAGE PROMPT STEPS OUT.npy

Every rank builds LlavaModel (model_config.weight_dtype = WEIGHT_DTYPE) and loads its share of WEIGHTS (rank
folders as run_mindformer.py slices them, or the llava-hf folder itself) through the product's loader, then runs
prefill + STEPS - 1 greedy decode steps on inputs made by Hugging Face's own tokenizer and image processor; rank
0 saves the logits of every step for comparison with HF generate / the single-process model.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "research", "llava"), os.path.join(HERE, "fixtures"), HERE, ROOT):
    sys.path.insert(0, path)


def main(hf_dir, weights_path, weight_dtype, seq_length, image, prompt, steps, out):
    import json
    import numpy as np
    import mindspore as ms
    from mindspore.communication import init
    from PIL import Image

    ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)
    init()
    import weights
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
    from oracle import HFOracle
    from parallel import TensorParallel

    oracle = HFOracle(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=int(seq_length), weight_dtype=weight_dtype)
    tp = TensorParallel.from_communication()
    model = LlavaModel(config, tensor_parallel=tp)
    weights.load_into(model, weights.rank_checkpoint(weights_path, tp, config), tp)
    ids = np.array([oracle.ids(prompt)], np.int32)
    pixels = oracle.image_processor(Image.open(image), return_tensors="np")["pixel_values"].astype(np.float32)
    engine = model.engine()
    logits = engine.prefill(ids, pixels)
    all_logits = [logits[0]]
    for _ in range(int(steps) - 1):
        logits = engine.decode(np.argmax(logits, -1))
        all_logits.append(logits[0])
    if tp.rank == 0:
        np.save(out, np.stack(all_logits))


if __name__ == "__main__":
    main(*sys.argv[1:])
