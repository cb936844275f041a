#!/usr/bin/env python
"""Benchmark LlavaModel against Hugging Face transformers + torch: the same command as `python -m benchmarks`
(the code is the benchmarks/ package; `--help` for the options, docs/performance.md for the method)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
