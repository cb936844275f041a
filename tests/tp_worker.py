"""Run under msrun by tests/test_parallel.py: the tensor-parallel model's logits for one image + prompt.

    msrun ... tests/tp_worker.py HF_DIR CKPT_DIR IMAGE PROMPT STEPS OUT.npz

Every rank builds LlavaModel with its share of the weights (CKPT_DIR/rank_K/*.ckpt, as sliced by
run_mindformer.py) and runs prefill + STEPS greedy decode steps on inputs made by Hugging Face's own
tokenizer and image processor; rank 0 saves the logits of every step for comparison with HF generate.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "research", "llava"), os.path.join(HERE, "fixtures"), HERE, ROOT):
    sys.path.insert(0, path)


def main(hf_dir, ckpt_dir, image, prompt, steps, out):
    import json
    import glob
    import numpy as np
    import mindspore as ms
    from mindspore.communication import init
    from PIL import Image

    ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)
    init()
    from llava_config import LlavaConfig
    from llava_model import LlavaModel, load_weights
    from parallel import TensorParallel
    from oracle import HFOracle
    import checkpoint_io

    oracle = HFOracle(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=256)
    tp = TensorParallel.from_communication()
    model = LlavaModel(config, tensor_parallel=tp)
    [ckpt] = glob.glob(os.path.join(ckpt_dir, f"rank_{tp.rank}", "*.ckpt"))
    load_weights(model, checkpoint_io.load_ckpt_lean(ckpt))
    ids = np.array([oracle.ids(prompt)], np.int32)
    pixels = oracle.image_processor(Image.open(image), return_tensors="np")["pixel_values"].astype(np.float32)
    engine = model.engine()
    logits = engine.prefill(ids, pixels)
    all_logits = [logits[0]]
    for _ in range(int(steps) - 1):
        token = np.argmax(logits, -1)
        logits = engine.decode(token)
        all_logits.append(logits[0])
    if tp.rank == 0:
        np.save(out, np.stack(all_logits))


if __name__ == "__main__":
    main(*sys.argv[1:])
