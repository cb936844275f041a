"""Run under msrun by tests/test_lowbit.py: a tensor-parallel model with low-precision weights.

    msrun ... tests/lowbit_worker.py HF_DIR WEIGHT_DTYPE IMAGE PROMPT STEPS OUT.npy

Every rank builds LlavaModel with model_config.weight_dtype = WEIGHT_DTYPE and loads its share of the llava-hf
folder through the product's loader (quantizing after its own slicing rules), then runs prefill + STEPS - 1
greedy decode steps on inputs made by Hugging Face's tokenizer and image processor; rank 0 saves the logits.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "research", "llava"), os.path.join(HERE, "fixtures"), HERE, ROOT):
    sys.path.insert(0, path)


def main(hf_dir, weight_dtype, image, prompt, steps, out):
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
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=320, weight_dtype=weight_dtype)
    tp = TensorParallel.from_communication()
    model = LlavaModel(config, tensor_parallel=tp)
    weights.load_into(model, weights.rank_checkpoint(hf_dir, tp, config), tp)
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
