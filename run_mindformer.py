"""LLaVA-1.5 with MindFormers' launcher flags: predict, chat, serve or eval.

    python run_mindformer.py --config research/llava/llava1_5_7B/predict_llava1_5_7b.yaml \
        --register_path research/llava --run_mode predict \
        --predict_data IMAGE PROMPT [IMAGE PROMPT ...] --modal_type image text \
        --load_checkpoint CKPT_OR_DIR --use_parallel False --auto_trans_ckpt False

predict: the answer is streamed to stdout while it is generated; every input's result is appended to
OUTPUT_DIR/predict_results.jsonl. Under scripts/msrun_launcher.sh the same command runs tensor-parallel on
every rank. chat (same flags, no --predict_data): a conversation in the terminal. serve (same flags, plus
--host/--port): an OpenAI-compatible HTTP server. eval (--question_file, --image_folder, --answers_file):
a benchmark's LLaVA question file answered into LLaVA's answers file (research/llava/eval_job.py). Bad input:
one line on stderr and exit code 2 (`--debug` shows the traceback).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
PROG = "run_mindformer.py"


def str2bool(value):
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def build_parser():
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="predict yaml (e.g. research/llava/llava_tiny/predict_llava_tiny.yaml)")
    p.add_argument("--register_path", default="research/llava",
                   help="folder of the plugin modules (default: research/llava)")
    p.add_argument("--run_mode", default="predict", choices=["predict", "chat", "serve", "eval"],
                   help="predict (default), chat (terminal conversation), serve (OpenAI-compatible HTTP server) or "
                        "eval (a benchmark's question file -> answers file)")
    p.add_argument("--predict_data", nargs="+", metavar="ITEM",
                   help="IMAGE PROMPT pairs (image: local path or http(s) URL); several pairs form a batch")
    p.add_argument("--modal_type", nargs="+", default=None, help="modality of each item: image text")
    p.add_argument("--load_checkpoint", help="complete .ckpt file, or a folder laid out model_dir/rank_K/*.ckpt")
    p.add_argument("--use_parallel", type=str2bool, default=None, help="True under msrun (tensor parallel)")
    p.add_argument("--auto_trans_ckpt", type=str2bool, default=None,
                   help="True: slice a complete checkpoint for the ranks of a parallel run")
    p.add_argument("--output_dir", default=None, help="where predict_results.jsonl goes (default: yaml's)")
    p.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"])
    p.add_argument("--device_id", type=int, default=None)
    p.add_argument("--mode", type=int, default=None, choices=[0, 1], help="0: Graph mode, 1: PyNative")
    p.add_argument("--vocab_file", default=None, help="tokenizer.model (overrides the yaml's)")
    g = p.add_argument_group("generation (override the yaml's model_config)")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="new tokens per answer at most (beats the yaml's max_new_tokens / max_decode_length)")
    g.add_argument("--max_decode_length", type=int, default=None,
                   help="MindFormers' name for --max_new_tokens (giving both with different values is an error)")
    g.add_argument("--do_sample", type=str2bool, default=None)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--repetition_penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    s = p.add_argument_group("serve")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--max_batch", type=int, default=8, help="requests answered together at most (default 8)")
    s.add_argument("--prefill_chunk", type=int, default=None,
                   help="prompt tokens a step takes at most beside the running answers (default 256)")
    s.add_argument("--max_queue", type=int, default=64,
                   help="requests waiting at most; more are answered 429 (default 64)")
    c = p.add_argument_group("caches (chat and serve)")
    c.add_argument("--prefix_cache_gb", type=float, default=1.0,
                   help="KV memory for cached conversation prefixes beyond the rows' (GiB, default 1; 0 = off: "
                        "nothing is reused)")
    c.add_argument("--image_cache_mb", type=float, default=256,
                   help="memory for cached image features (MiB, default 256; 0 = off)")
    s.add_argument("--served_model_name", default=None, help="model id in the API (default: the checkpoint's name)")
    # who may use the server and what it may fetch (docs/serving.md: the threat model)
    s.add_argument("--api_key", action="append", default=None, metavar="KEY",
                   help="a key clients send as 'Authorization: Bearer KEY' (repeatable; /health stays open)")
    s.add_argument("--api_key_file", default=None, metavar="PATH", help="more keys, one a line (# comments)")
    s.add_argument("--allowed_hosts", nargs="+", default=None, metavar="NAME",
                   help="Host header names answered (default: localhost names and --host; IP addresses always; "
                        "'*' = any): against DNS rebinding")
    s.add_argument("--allowed_origins", nargs="+", default=None, metavar="ORIGIN",
                   help="web origins (https://app.example.com) that may call the API from a browser (CORS); "
                        "default none: only the server's own page")
    s.add_argument("--allow_media_urls", type=str2bool, nargs="?", const=True, default=True,
                   help="fetch http(s) image URLs (default True; False: data: URLs only)")
    s.add_argument("--allow_private_media", type=str2bool, nargs="?", const=True, default=False,
                   help="let image URLs reach private and loopback addresses too (a trusted network; default: "
                        "public addresses only; link-local/metadata addresses never)")
    s.add_argument("--allowed_media_domains", nargs="+", default=None, metavar="HOST",
                   help="image URLs only from these hosts (example.com, *.example.com for its subdomains)")
    s.add_argument("--media_redirects", type=int, default=None,
                   help="redirects an image download follows at most (default 5; 0 = none)")
    s.add_argument("--image_workers", type=int, default=None,
                   help="image downloads and decodes at once, in their own pool (default 4)")
    s.add_argument("--shutdown_grace_s", type=float, default=None,
                   help="on SIGTERM / Ctrl-C, seconds running answers may take to finish (default 10); then "
                        "open streams end with an error event and [DONE]")
    e = p.add_argument_group("eval (also takes --max_batch and --prefill_chunk; greedy, 128 new tokens by default)")
    e.add_argument("--question_file", default=None, help="LLaVA's question records (JSON lines: question_id, "
                   "image, text, category)")
    e.add_argument("--image_folder", default=None, help="folder the questions' image names are relative to")
    e.add_argument("--answers_file", default=None, help="LLaVA's answer records are appended here (JSON lines); "
                   "questions already in it are skipped (resume)")
    e.add_argument("--prompt_suffix", default=None, help="text added to every question on a line of its own")
    e.add_argument("--conv_mode", default="vicuna_v1", choices=["vicuna_v1", "llava_hf"],
                   help="prompt format: LLaVA's vicuna_v1 (its evaluation's; default) or llava-hf's chat template")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def _setup_plugin(register_path):
    """Make the plugin modules importable as top-level modules, as MindFormers' --register_path does."""
    path = register_path if os.path.isabs(register_path) else os.path.join(ROOT, register_path)
    if not os.path.isdir(path) and os.path.isdir(os.path.abspath(register_path)):
        path = os.path.abspath(register_path)
    path = os.path.realpath(path)
    if not os.path.isfile(os.path.join(path, "llava_model.py")):
        print(f"{PROG}: error: --register_path {register_path}: not the llava plugin folder "
              f"(no llava_model.py)", file=sys.stderr)
        sys.exit(2)
    os.environ["REGISTER_PATH"] = path
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def check_args(args):
    """What argparse cannot check, where the command line enters: one line and exit 2 instead of a failure
    deep inside a run.

    * Text that is not UTF-8: bytes that do not decode arrive as lone surrogates (Python's surrogateescape) and
      would break the tokenizer, the yaml's paths in MindFormers' config and its logs. --predict_data is left
      to the predict mode (its images are POSIX paths, which may hold any bytes; its prompts are checked there).
    * --max_new_tokens and --max_decode_length name the same setting (MindFormers' name and this project's);
      both beat the yaml. Two different values would leave one silently ignored: refused."""
    for name, value in vars(args).items():
        if name == "predict_data":
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    byte = ord(item[e.start]) - 0xDC00
                    where = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"U+{ord(item[e.start]):04X}"
                    return (f"--{name} is not valid UTF-8 ({where} at position "
                            f"{len(item[:e.start].encode('utf-8'))}): use UTF-8 text, or rename the file")
    if args.max_new_tokens is not None and args.max_decode_length is not None \
            and args.max_new_tokens != args.max_decode_length:
        return (f"--max_new_tokens {args.max_new_tokens} and --max_decode_length {args.max_decode_length} "
                f"disagree: they are the same setting (MindFormers calls it max_decode_length); give one")
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    _setup_plugin(args.register_path)
    from llava_errors import LlavaError
    import importlib
    mode = importlib.import_module({"predict": "llava_predict", "chat": "chat", "serve": "server",
                                    "eval": "eval_job"}[args.run_mode])
    try:
        return mode.run(args, root=ROOT)
    except LlavaError as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # the run mode says what was kept, if anything was under way
        print(f"{PROG}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
