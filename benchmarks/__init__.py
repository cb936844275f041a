"""Benchmark of LlavaModel (MindSpore) against Hugging Face transformers + torch and llama.cpp on the same
CPU (not a test).

Run it with `python -m benchmarks --preset tiny|mid|7b` (or `python scripts/bench.py ...`); `--help` lists the
options and docs/performance.md describes the method and the results. One job per module:

  workload  the fixed request (image, prompt) and where the repository's files are
  system    the machine: CPU, memory bandwidth, RSS, CPU time, core pinning, versions
  harness   the parent/child protocol, alternating timed requests repeated on disturbance, medians
  ours      our side, through the engine's public API (LlavaModel.engine())
  hf        the Hugging Face side, built on the tests' oracle (tests/oracle.py)
  llamacpp  the llama.cpp side: build llama-bench from llama-cpp-python's sdist, GGUF conversion, llama-bench
  compare   the tiny/mid comparison: both sides in child processes, then llama.cpp -> one result dict
  seven_b   the real 7B shapes with random float16 weights: ours (int8, float16) beside llama.cpp (q8_0, f16)
  report    the markdown tables and the result files
  cli       the command line
"""
