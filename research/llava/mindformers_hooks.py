"""What MindFormers' own entry points need from this plugin beyond the registered classes.

Importing this module (every registered plugin module does) installs, once per process:

* One module identity for the yaml's `auto_register: llava_x.Class` keys. MindFormers' auto_register copies
  the named file into a modules cache (`./modules/openmind_modules/<dir>/` by default, i.e. the working
  folder) and executes the copy as `openmind_modules.<dir>.llava_x`: a second set of classes that the
  plugin's own imports (`from llava_config import LlavaConfig`) never see. Here a plugin file named by
  `auto_register` resolves to the top-level module the plugin itself imports, and the cache goes to a private
  temporary folder removed at exit (unless the user set OM_MODULES_CACHE). This runs early enough because
  auto_register imports a file's own imports (`check_imports`) before it creates the cache or loads the copy.
* The pipeline task `multi_modal_to_text_generation`: MindFormers 1.9 still registers its pipeline and trainer
  classes but dropped the task from `MindFormerBook`'s pipeline list, so `pipeline(task=...)` and the
  Trainer's `predict_process` refuse it.
"""
import atexit
import importlib
import os
import shutil
import sys
import tempfile
from collections import OrderedDict

PLUGIN_DIR = os.path.dirname(os.path.realpath(__file__))
PIPELINE_TASK = "multi_modal_to_text_generation"
_STATE = {"installed": False}


def plugin_module(module_path):
    """The top-level plugin module for MindFormers' cached copy `.../<name>.py` of a file of this folder, when
    REGISTER_PATH is this folder and the name is a module of it; else None (MindFormers' own behaviour)."""
    register_path = os.environ.get("REGISTER_PATH")
    if not register_path or os.path.realpath(register_path) != PLUGIN_DIR:
        return None
    name = os.path.splitext(os.path.basename(str(module_path)))[0]
    if not name.isidentifier() or not os.path.isfile(os.path.join(PLUGIN_DIR, name + ".py")):
        return None
    if PLUGIN_DIR not in [os.path.realpath(p) for p in sys.path if p]:
        sys.path.insert(0, PLUGIN_DIR)
    module = importlib.import_module(name)
    if os.path.dirname(os.path.realpath(getattr(module, "__file__", "") or "")) != PLUGIN_DIR:
        return None  # another module of that name shadows the plugin's: leave it to MindFormers
    return module


def _single_module_identity():
    from mindformers.tools.hub import dynamic_module_utils
    from mindformers.tools.hub.hub import HubConstants

    original = dynamic_module_utils.get_class_in_module

    def get_class_in_module(class_name, module_path, force_reload=False):
        module = plugin_module(module_path)
        if module is None:
            return original(class_name, module_path, force_reload=force_reload)
        return getattr(module, class_name)

    get_class_in_module.__wrapped__ = original
    dynamic_module_utils.get_class_in_module = get_class_in_module
    if "OM_MODULES_CACHE" not in os.environ:
        # MindFormers still copies the files before loading a class; keep that copy out of the working folder,
        # in a temporary folder made only when MindFormers first needs it (not by every import of the plugin).
        init_modules = dynamic_module_utils.init_mf_modules

        def init_mf_modules():
            if not _STATE.get("cache"):
                _STATE["cache"] = tempfile.mkdtemp(prefix="llava-mindformers-modules-")
                atexit.register(shutil.rmtree, _STATE["cache"], True)
                HubConstants.OM_MODULES_CACHE = _STATE["cache"]
            return init_modules()

        init_mf_modules.__wrapped__ = init_modules
        dynamic_module_utils.init_mf_modules = init_mf_modules


def _register_pipeline_task():
    from mindformers.mindformer_book import MindFormerBook
    tasks = MindFormerBook.get_pipeline_support_task_list()   # the dict pipeline() and predict_process consult
    if PIPELINE_TASK not in tasks:
        general = MindFormerBook.get_trainer_support_task_list()["general"]["common"]
        tasks[PIPELINE_TASK] = OrderedDict([("common", general)])


def install():
    """Install the hooks once per process (idempotent)."""
    if _STATE["installed"]:
        return
    _STATE["installed"] = True
    _single_module_identity()
    _register_pipeline_task()


def tensor_parallel_for(parallel_config):
    """The TensorParallel group for a model MindFormers builds with `parallel_config` (its build_network
    passes the yaml's): the communication group when `model_parallel` > 1, else a single rank."""
    from llava_errors import LlavaError
    from parallel import TensorParallel
    mp = 1
    if parallel_config is not None:
        mp = getattr(parallel_config, "model_parallel", None)
        if mp is None and hasattr(parallel_config, "get"):
            mp = parallel_config.get("model_parallel", 1)
        mp = int(mp or 1)
    if mp == 1:
        return TensorParallel()
    try:
        tp = TensorParallel.from_communication()
    except (RuntimeError, ValueError) as e:
        raise LlavaError(f"parallel_config.model_parallel={mp} needs a distributed job (use_parallel True under "
                         f"msrun_launcher.sh with {mp} workers): {str(e).splitlines()[0] if str(e) else e}") from None
    if tp.world != mp:
        raise LlavaError(f"parallel_config.model_parallel={mp} but the job was launched with {tp.world} "
                         f"rank(s); set model_parallel to the launcher's worker count")
    return tp


install()
