"""The eval mode's throughput: questions per minute with several rows at once against one at a time, with the
prefix and image caches on and off, each a whole `run_mindformer.py --run_mode eval` process (load and
compile included, as a user runs it; beside it the rate the eval mode itself reports, questions only), on the
tests' random-weight checkpoint.

    python -m benchmarks.eval_bench [--preset mid] [--new-tokens 32] [--runs all|rows]

16 questions: 4 texts about each of the 4 fixture images (questions about one image share its KV blocks and
its CLIP features when the caches are on). Prints a markdown table: wall seconds and questions per minute per
setting, and whether every setting wrote the same answers. Not a test.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "fixtures"),
             os.path.join(ROOT, "research", "llava")):
    if path not in sys.path:
        sys.path.insert(0, path)

TEXTS = ("What is in the image?", "Describe the image briefly.", "What colours do you see?",
         "Is there a person in the image? Answer yes or no.")
NO_CACHES = ("--prefix_cache_gb", "0", "--image_cache_mb", "0")
SETTINGS = (("8 rows at once", ("--max_batch", "8")), ("1 row at a time", ("--max_batch", "1")),
            ("8 rows, no caches", ("--max_batch", "8", *NO_CACHES)),
            ("1 row, no caches", ("--max_batch", "1", *NO_CACHES)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", choices=("all", "rows"), default="all", help="rows: the two settings with caches")
    args = ap.parse_args(argv)
    from conftest import hf_checkpoint
    from helpers import IMAGES, yaml_for
    from benchmarks import system
    hf_dir = hf_checkpoint(args.preset, shard_mb=200 if args.preset == "mid" else None)
    work = tempfile.mkdtemp(prefix="llava-eval-bench-")
    yaml_path = yaml_for(hf_dir, os.path.join(work, "model.yaml"), seq_length=1024 if args.preset == "mid" else 512)
    questions = os.path.join(work, "questions.jsonl")
    images = sorted(os.listdir(IMAGES))
    with open(questions, "w") as f:
        for i, (text, image) in enumerate(((t, im) for t in TEXTS for im in images), 1):
            f.write(json.dumps({"question_id": i, "image": image, "text": text}) + "\n")
    n = len(TEXTS) * len(images)
    rows, answers = [], []
    for name, extra in SETTINGS[:2] if args.runs == "rows" else SETTINGS:
        out = os.path.join(work, f"answers-{len(rows)}.jsonl")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode", "eval",
                               "--load_checkpoint", hf_dir, "--question_file", questions, "--image_folder", IMAGES,
                               "--answers_file", out, "--output_dir", os.path.join(work, "out"),
                               "--max_new_tokens", str(args.new_tokens), *extra],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        with open(out) as f:
            answers.append([json.loads(line)["text"] for line in f])
        summary = [line for line in proc.stderr.splitlines() if "answers appended" in line]
        rate = re.search(r"\(([0-9.]+) questions/min", summary[-1]) if summary else None
        rows.append((name, wall, float(rate.group(1)) if rate else float("nan")))
    m = system.machine_info()
    print(f"{args.preset}, {m['cpu']}, {m['cores']} cores; {n} questions, {args.new_tokens} new tokens each; "
          f"one whole process per setting (load and compile included)\n")
    print("| setting | process wall (s) | questions/min, whole process | questions/min, the eval mode's own |\n"
          "| --- | ---: | ---: | ---: |")
    for name, wall, rate in rows:
        print(f"| {name} | {wall:.1f} | {60 * n / wall:.1f} | {rate:.1f} |")
    print(f"\nevery setting wrote the same answers: {all(a == answers[0] for a in answers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
