"""How far low-precision weights move the model: float32 LlavaModel vs the same checkpoint loaded with
model_config.weight_dtype = int8 / float16 / bfloat16, on one image + prompt.

    python -m benchmarks.lowbit_error [--preset mid] [--steps 32] [--dtypes int8 float16 bfloat16]

The float32 model decodes greedily; each low-precision model is teacher-forced with those tokens, so every
step compares logits for the same context: max and mean |logit difference| (and relative to the largest
float32 logit) over the prompt's last position and every step, and top-1 agreement (the low-precision
model's argmax equals the float32 model's token) over the steps. Prints a markdown table.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (os.path.join(ROOT, "research", "llava"), os.path.join(ROOT, "tests", "fixtures"),
              os.path.join(ROOT, "tests")):
    sys.path.insert(0, _path)

IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "chelsea.jpg")
PROMPT = "Describe the image in English:"


def load(hf_dir, weight_dtype, seq_length):
    import weights
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
    from parallel import TensorParallel
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=seq_length, weight_dtype=weight_dtype)
    tp = TensorParallel()
    model = LlavaModel(config, tensor_parallel=tp)
    weights.load_into(model, weights.rank_checkpoint(hf_dir, tp, config), tp)
    return model


def logits_along(model, ids, pixels, tokens):
    """Prefill logits, then one decode step per token of `tokens` (teacher-forced): [len(tokens) + 1, V]."""
    engine = model.engine()
    out = [engine.prefill(ids, pixels)]
    for t in tokens:
        out.append(engine.decode(np.array([t])))
    return np.concatenate(out)


def main(argv=None):
    import mindspore as ms
    from conftest import hf_checkpoint
    from oracle import HFOracle
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lowbit_error")
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["int8", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    hf_dir = hf_checkpoint(args.preset)
    oracle = HFOracle(hf_dir)                   # the llava-hf tokenizer and image processor only
    ids = np.array([oracle.ids(PROMPT)], np.int32)
    pixels = oracle.pixels(IMAGE).numpy()
    seq_length = ids.shape[1] + args.steps + 8
    reference = load(hf_dir, "float32", seq_length)
    engine = reference.engine()
    ref = [engine.prefill(ids, pixels)]
    tokens = []
    for _ in range(args.steps):
        tokens.append(int(ref[-1].argmax(-1)[0]))
        ref.append(engine.decode(np.array([tokens[-1]])))
    ref = np.concatenate(ref)[:-1]                  # the logits that chose each token
    del reference, engine
    scale = float(np.abs(ref).max())
    lines = [f"{args.preset}: {ids.shape[1]}-token prompt, {args.steps} greedy steps of the float32 model",
             "", "| weights | max abs logit diff | mean abs logit diff | max diff / max logit | top-1 agreement |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for weight_dtype in args.dtypes:
        model = load(hf_dir, weight_dtype, seq_length)
        ours = logits_along(model, ids, pixels, tokens[:-1])
        diff = np.abs(ours - ref)
        agree = int((ours.argmax(-1) == np.array(tokens)).sum())
        lines.append(f"| {weight_dtype} | {diff.max():.4f} | {diff.mean():.5f} | {diff.max() / scale:.4f} | "
                     f"{agree}/{args.steps} |")
        print(lines[-1], flush=True)
        del model
    print("\n".join(lines))


if __name__ == "__main__":
    main()
