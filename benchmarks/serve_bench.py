"""Serving benchmark: a served request's time to first token against predict's, and total tokens/s with 1, 4
and 8 concurrent streaming clients against one request at a time.

    python benchmarks/serve_bench.py --preset mid [--new-tokens 32] [--out benchmarks/]

Both sides use the same converted random-weight checkpoint (the tests' HF-layout fixture) and the tests' photo.
predict: `run_mindformer.py --run_mode predict`, wall time from the command's start to the first byte of the
answer (what a user of one-shot predict waits: imports, model load, compilation, prefill) and, for reference,
the same minus the time to the model being ready. serve: one warm `run_mindformer.py --run_mode serve`; a
request's time to first token is from sending it to the first streamed content chunk. Throughput: N streaming
clients at once, each asking about the photo with its own question and max_tokens=--new-tokens (EOS can end an
answer early: tokens are counted from the usage the server reports), total completion tokens / wall time; the
"one at a time" row sends the same 8 requests one after another. Before measuring, the server is warmed up with
the same loads (new batch sizes and prompt-length buckets compile once). Results: benchmarks/serve_<preset>.{json,md}.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "research", "llava"), os.path.join(ROOT, "tests"),
             os.path.join(ROOT, "tests", "fixtures"), ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "chelsea.jpg")
QUESTIONS = ["Describe the image in English:", "What animal is this?", "What colour is it?",
             "Where is it sitting?", "Is it awake?", "What is in the background?", "How old might it be?",
             "Write a caption for this photo."]
SEQ_LENGTH = {"tiny": 512, "mid": 1024}


def write_yaml(hf_dir, path, seq_length):
    from helpers import TOKENIZER_MODEL, yaml_for
    return yaml_for(hf_dir, path, vocab_file=TOKENIZER_MODEL, seq_length=seq_length)


def predict_ttft(yaml_path, ckpt, work, new_tokens):
    """Seconds from the predict command's start to the first byte of its answer on stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode", "predict",
                             "--predict_data", IMAGE, QUESTIONS[0], "--modal_type", "image", "text",
                             "--load_checkpoint", ckpt, "--output_dir", os.path.join(work, "predict"),
                             "--max_new_tokens", str(new_tokens)],
                            cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.communicate()
    assert proc.returncode == 0, "predict failed"
    return first


class Server:
    def __init__(self, yaml_path, ckpt, work, max_batch):
        import httpx
        from helpers import free_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode",
                                      "serve", "--load_checkpoint", ckpt, "--output_dir", os.path.join(work, "serve"),
                                      "--port", str(self.port), "--max_batch", str(max_batch)],
                                     cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        while True:
            assert self.proc.poll() is None, "the server died"
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.start_s = time.perf_counter() - t0
        with open(IMAGE, "rb") as f:
            self.image = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()

    def stream(self, question, new_tokens):
        """(seconds to the first content chunk, seconds to the end, completion tokens) of one streamed request;
        the prompt's length (from the usage) is kept in self.prompt_tokens."""
        import httpx
        body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": new_tokens,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.image}},
                                                          {"type": "text", "text": question}]}]}
        t0 = time.perf_counter()
        first, tokens = None, 0
        with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    self.prompt_tokens = chunk["usage"]["prompt_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
        return first, time.perf_counter() - t0, tokens

    def concurrent(self, n, new_tokens):
        results = [None] * n

        def client(i):
            results[i] = self.stream(QUESTIONS[i % len(QUESTIONS)], new_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        tokens = sum(r[2] for r in results)
        return {"clients": n, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                "median_ttft_s": statistics.median(r[0] for r in results)}

    def sequential(self, n, new_tokens):
        t0 = time.perf_counter()
        tokens = sum(self.stream(QUESTIONS[i % len(QUESTIONS)], new_tokens)[2] for i in range(n))
        wall = time.perf_counter() - t0
        return {"clients": f"{n}, one at a time", "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def render(r):
    lines = [f"# Serving benchmark: `{r['preset']}`", "",
             f"{r['machine']}; {r['new_tokens']} new tokens per request; image + question prompts "
             f"({r['prompt_tokens']} tokens); server `--max_batch 8`; {r['date']}.", "",
             "| time to first token | seconds |", "| --- | ---: |",
             f"| predict: command start to first answer byte (imports, load, compile, prefill) | {r['predict_ttft_s']:.2f} |",
             f"| serve: request to first streamed token, warm server (median of {len(r['served_ttft_s'])}) | "
             f"{statistics.median(r['served_ttft_s']):.2f} |",
             f"| serve: start-up until ready (once) | {r['server_start_s']:.1f} |", "",
             "| clients | wall (s) | completion tokens | tokens/s | median time to first token (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in r["throughput"]:
        ttft = f"{row['median_ttft_s']:.2f}" if "median_ttft_s" in row else "–"
        lines.append(f"| {row['clients']} | {row['wall_s']:.2f} | {row['tokens']} | {row['tokens_per_s']:.1f} | {ttft} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SEQ_LENGTH), default="mid")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="single served requests for the time to first token")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    from conftest import hf_checkpoint
    hf_dir = hf_checkpoint(args.preset, shard_mb=200 if args.preset == "mid" else None)
    work = tempfile.mkdtemp(prefix="llava-serve-bench-")
    yaml_path = write_yaml(hf_dir, os.path.join(work, "model.yaml"), SEQ_LENGTH[args.preset])
    ckpt = os.path.join(work, "model.ckpt")
    subprocess.run([sys.executable, "convert_weight.py", "--model", "llava", "--input_path", hf_dir,
                    "--output_path", ckpt, "--quiet"], cwd=ROOT, check=True, env=dict(os.environ, GLOG_v="3"))
    import platform
    r = {"preset": args.preset, "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d"),
         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    r["predict_ttft_s"] = predict_ttft(yaml_path, ckpt, work, args.new_tokens)
    server = Server(yaml_path, ckpt, work, max_batch=8)
    try:
        r["server_start_s"] = server.start_s
        # warm-up: every new batch size and prompt-length bucket compiles its graphs once (seconds each); how
        # concurrent requests split into batches depends on their arrival, so each load runs a few times
        for n in (8, 8, 8, 4, 4, 1):
            server.concurrent(n, 4)
        r["served_ttft_s"] = [server.stream(QUESTIONS[0], args.new_tokens)[0] for _ in range(args.repeats)]
        r["prompt_tokens"] = server.prompt_tokens
        r["throughput"] = [server.sequential(8, args.new_tokens)] + \
            [server.concurrent(n, args.new_tokens) for n in (1, 4, 8)]
    finally:
        server.close()
    with open(os.path.join(args.out, f"serve_{args.preset}.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(args.out, f"serve_{args.preset}.md"), "w") as f:
        f.write(render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
