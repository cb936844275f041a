"""LLaVA-1.5 for MindSpore/MindFormers.

MindFormers imports plugin files as top-level modules from `--register_path research/llava`
(`llava_config`, `llava_model`, ...). So that each class is registered exactly once whichever way the
plugin is reached, importing the package `research.llava` puts this folder on `sys.path` and re-exports
the top-level modules' classes instead of importing the files a second time under another name.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from llava_config import LlavaCLIPConfig, LlavaConfig, LlavaTextConfig  # noqa: E402
from llava_errors import LlavaError  # noqa: E402
from llava_model import LlavaModel, load_weights  # noqa: E402
from llava_processor import LlavaProcessor  # noqa: E402
from llava_tokenizer import LlavaTokenizer  # noqa: E402
from llava_trainer import LlavaTrainer  # noqa: E402

__all__ = ["LlavaCLIPConfig", "LlavaConfig", "LlavaTextConfig", "LlavaError", "LlavaModel", "load_weights",
           "LlavaProcessor", "LlavaTokenizer", "LlavaTrainer"]
