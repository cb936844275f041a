#!/usr/bin/env python
"""Convert between LLaVA's benchmark files and what the eval mode or a benchmark's server takes.

    python scripts/eval/convert.py gqa   --answers A.jsonl --output testdev_balanced_predictions.json
    python scripts/eval/convert.py vqav2 --answers A.jsonl --question_file llava_vqav2_mscoco_test2015.jsonl \
        --output vqav2_upload.json
    python scripts/eval/convert.py sqa_questions --input llava_test_CQM-A.json --output sqa_questions.jsonl

gqa / vqav2: the answers file -> the JSON that GQA's eval.py / the VQAv2 EvalAI server take. sqa_questions:
LLaVA's ScienceQA question file (JSON with conversations) -> the eval mode's question records (JSON lines).
Outputs appear complete or not at all. The rules live in research/llava/eval_scoring.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "research", "llava"))
import eval_scoring  # noqa: E402
from llava_errors import LlavaError  # noqa: E402

PROG = "convert.py"


def _write_jsonl(path, records):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise LlavaError(f"--output {path}: {e.strerror or e}") from None


def run(args):
    if args.kind == "gqa":
        records = eval_scoring.gqa_submission(args.answers)
        eval_scoring.write_json(args.output, records)
        return f"{len(records)} GQA predictions written to {args.output}"
    if args.kind == "vqav2":
        records, missing = eval_scoring.vqav2_submission(args.answers, args.question_file)
        eval_scoring.write_json(args.output, records)
        note = f" ({missing} without an answer: empty)" if missing else ""
        return f"{len(records)} VQAv2 answers written to {args.output}{note}"
    records = eval_scoring.sqa_questions(args.input)
    _write_jsonl(args.output, records)
    return f"{len(records)} ScienceQA questions written to {args.output}"


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("gqa", help="answers -> GQA predictions JSON")
    g.add_argument("--answers", required=True)
    v = sub.add_parser("vqav2", help="answers -> VQAv2 upload JSON")
    v.add_argument("--answers", required=True)
    v.add_argument("--question_file", required=True, help="the split's question file (every question gets a line)")
    s = sub.add_parser("sqa_questions", help="LLaVA's ScienceQA question JSON -> eval-mode question records")
    s.add_argument("--input", required=True)
    for parser in (g, v, s):
        parser.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        print(run(args), file=sys.stderr)
    except LlavaError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
