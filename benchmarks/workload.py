"""The benchmark's fixed request and where the repository's files and fixtures are.

Importing it puts the plugin's top-level modules (`llava_config`, `llava_model`, ... as MindFormers'
`--register_path research/llava` imports them), the fixture builder and the tests' oracle on sys.path.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "llava")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TESTS = os.path.join(ROOT, "tests")
for _p in (PLUGIN, FIXTURES, TESTS, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

IMAGE = os.path.join(FIXTURES, "images", "chelsea.jpg")
PROMPT = "Describe the image in English:"
TOKENIZER_MODEL = os.path.join(FIXTURES, "tokenizer.model")
KEYS_7B = os.path.join(FIXTURES, "llava_1_5_7b_keys.json")
RESULTS = os.path.join(ROOT, "benchmarks")


def fixture_dir(preset):
    """The preset's HF-layout fixture folder, built and cached as the tests do (mid sharded like the 7B)."""
    import conftest
    return conftest.hf_checkpoint(preset, shard_mb=200 if preset == "mid" else None)


def command(*args):
    """argv that runs this package's command line in a child process (run it with cwd=ROOT)."""
    return [sys.executable, "-m", "benchmarks", *map(str, args)]
