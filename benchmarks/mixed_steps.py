"""A joining prompt's chunk in the same step as the running rows' next tokens ("mixed", what the server's
plan does), against a step of the chunk and a step of the decode tokens one after the other ("alternating"),
same engine, same process, rounds interleaved so that other load on the machine hits both alike.

    python -m benchmarks.mixed_steps [--preset mid] [--decoding 4] [--chunk 256] [--context 600] [--rounds 7]

`--decoding` rows sit at `--context` positions and decode one token each per round; one more row's prompt
runs `--chunk` tokens per round. Prints per round the median seconds of each way and their ratio. Not a test.
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "research", "llava"), os.path.join(ROOT, "tests"),
             os.path.join(ROOT, "tests", "fixtures"), ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--decoding", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from conftest import hf_checkpoint
    from generation import GenerationSettings
    from llava_config import LlavaConfig
    from llava_model import LlavaModel
    from parallel import TensorParallel
    import weights
    from benchmarks import system
    hf_dir = hf_checkpoint(args.preset, shard_mb=200 if args.preset == "mid" else None)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=2048)
    with ms.nn.utils.no_init_parameters():
        model = LlavaModel(config)
    single = TensorParallel()
    weights.load_into(model, weights.rank_checkpoint(hf_dir, single, config), single)
    engine = model.engine()
    engine.configure_caches(prefix=False, image_bytes=0)
    engine.reserve(args.decoding + 1)
    engine.warmup(args.chunk + args.decoding, measure=False)
    long = min(config.seq_length - 8, args.rounds * 2 * args.chunk) + 1
    settings = GenerationSettings.from_config(config, max_new_tokens=4 * args.rounds + 4, eos_token_id=[-1])
    decoding = []
    for i in range(args.decoding):          # rows at --context positions, decoding
        row = engine.add([1] + [1000 + (i * 7 + j) % 20000 for j in range(args.context - 1)], None, settings)
        while row.prefilling:
            engine.step([(row, min(row.pending, args.chunk))])
        decoding.append(row)
    one = GenerationSettings.from_config(config, max_new_tokens=1, eos_token_id=[-1])

    def join():
        return engine.add([1] + [3000 + j % 20000 for j in range(long - 1)], None, one)

    joining = join()
    mixed, alternating = [], []
    for _ in range(args.rounds):
        if joining.pending < 2 * args.chunk:          # a new prompt joins where the last one ended
            engine.release(joining)
            joining = join()
        t0 = time.perf_counter()
        engine.step([(r, 1) for r in decoding] + [(joining, args.chunk)])
        mixed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.step([(r, 1) for r in decoding])
        engine.step([(joining, args.chunk)])
        alternating.append(time.perf_counter() - t0)
    engine.release_all()
    m, a = statistics.median(mixed), statistics.median(alternating)
    machine = system.machine_info()
    print(f"{args.preset}, {machine['cpu']}, {args.threads} threads: {args.decoding} rows decoding at "
          f"~{args.context} positions + a {args.chunk}-token prompt chunk per round, median of {args.rounds}")
    print(f"mixed (one step): {m:.3f} s; alternating (two steps): {a:.3f} s; mixed / alternating {m / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
