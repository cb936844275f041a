#!/usr/bin/env python
"""Score an answers file (run_mindformer.py --run_mode eval, or LLaVA's own) against a benchmark's ground truth.

    python scripts/eval/score.py pope    --answers A.jsonl --question_file llava_pope_test.jsonl --annotation_dir coco/
    python scripts/eval/score.py sqa     --answers A.jsonl --base_dir scienceqa/ [--split test]
    python scripts/eval/score.py mme     --answers A.jsonl --mme_folder MME_Benchmark_release_version/
    python scripts/eval/score.py textvqa --answers A.jsonl --annotation_file TextVQA_0.5.1_val.json
    (any of them: --json prints the figures as one JSON object instead of the table)

The rules (LLaVA's and the benchmarks' published ones) live in research/llava/eval_scoring.py. Bad or
mismatched files: one line on stderr, exit code 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "research", "llava"))
import eval_scoring  # noqa: E402
from llava_errors import LlavaError  # noqa: E402

PROG = "score.py"


def _pope(args):
    result = eval_scoring.score_pope(args.answers, args.question_file, args.annotation_dir)
    lines = ["split        answered  accuracy  precision  recall     F1  yes-ratio"]
    for split, m in result.items():
        lines.append(f"{split:<12} {m['answered']:>4}/{m['questions']:<4} {100 * m['accuracy']:8.2f} "
                     f"{100 * m['precision']:10.2f} {100 * m['recall']:7.2f} {100 * m['f1']:6.2f} "
                     f"{100 * m['yes_ratio']:10.2f}")
    f1 = [m["f1"] for m in result.values()]
    lines.append(f"mean F1 over the splits: {100 * sum(f1) / len(f1):.2f}")
    return result, lines


def _sqa(args):
    r = eval_scoring.score_sqa(args.answers, args.base_dir, args.split)
    lines = [f"ScienceQA {args.split}: accuracy {r['accuracy']:.2f}% ({r['correct']}/{r['count']}), "
             f"IMG accuracy {r['img_accuracy']:.2f}% ({r['img_correct']}/{r['img_count']})"]
    if r["missing"]:
        lines.append(f"{r['missing']} problem(s) have no answer and count as wrong")
    return r, lines


def _mme(args):
    r = eval_scoring.score_mme(args.answers, args.mme_folder)
    lines = ["subtask                   acc   acc+   score"]
    for name, t in r["tasks"].items():
        note = f"  ({t['missing']} unanswered)" if t["missing"] else ""
        lines.append(f"{name:<22} {100 * t['acc']:6.2f} {100 * t['acc_plus']:6.2f} {t['score']:7.2f}{note}")
    lines.append(f"Perception {r['Perception']:.2f}   Cognition {r['Cognition']:.2f}")
    return r, lines


def _textvqa(args):
    r = eval_scoring.score_textvqa(args.answers, args.annotation_file)
    return r, [f"TextVQA: {r['n']} answers, accuracy {r['accuracy']:.2f}%"]


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    for name, helptext, func, extra in (
            ("pope", "POPE: accuracy, precision, recall, F1, yes-ratio per split", _pope,
             [("--question_file", {"required": True}), ("--annotation_dir", {"required": True})]),
            ("sqa", "ScienceQA: accuracy and IMG accuracy", _sqa,
             [("--base_dir", {"required": True, "help": "folder of problems.json and pid_splits.json"}),
              ("--split", {"default": "test"})]),
            ("mme", "MME: per-subtask acc, acc+, score; perception and cognition totals", _mme,
             [("--mme_folder", {"required": True, "help": "MME_Benchmark_release_version"})]),
            ("textvqa", "TextVQA: VQA accuracy", _textvqa, [("--annotation_file", {"required": True})])):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--answers", required=True, help="the answers file (JSON lines)")
        for flag, kw in extra:
            s.add_argument(flag, **kw)
        s.add_argument("--json", action="store_true", help="print the figures as JSON")
        s.set_defaults(func=func)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result, lines = args.func(args)
    except LlavaError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
