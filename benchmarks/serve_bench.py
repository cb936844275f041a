"""Serving benchmark: ours served beside the warm engine, the one-shot CLI, an earlier scheduler and llama.cpp's
`llama-server`, all in one run on the same machine.

    python benchmarks/serve_bench.py --preset mid [--baseline REV] [--llamacpp auto|off] [--out benchmarks/]

Every side uses the same converted random-weight checkpoint (the tests' HF-layout fixture), 2 threads.

* engine: the warm engine (`python -m benchmarks`' ours side in a child process): time to first token of the
  image question and decode tokens/s after it, median of a few runs;
* predict: one `run_mindformer.py --run_mode predict` process per answer of --long tokens (130): decode
  tokens/s from its first to its last streamed byte (tokens from predict_results.jsonl);
* served (one warm `--run_mode serve`, OpenAI chat API, streamed):
  (a) a short text question's time to first token alone, and while another client's long answer streams;
  (b) one client: the image question's TTFT and decode tokens/s (tokens - 1 over first to last chunk);
  (c) a mixed load: 8 clients, answers of 8..256 tokens, arriving 0.25 s apart: p50/p95 TTFT, tokens/s;
  (d) a ~700-token text prompt: one client's TTFT and decode tokens/s, and 4 clients' total tokens/s;
  (e) remembered turns (16-token answers, 2 conversations, medians): the TTFT of a first turn (the image and a
      question not asked before), of its follow-up (the same messages + the streamed answer + a new question)
      and of a fresh conversation's new question about the same image, their ratios to the first turn (goals
      <= 0.2 and <= 0.4) and to a first turn on an image not sent before (rocket.jpg, "cold"), and the
      `usage.prompt_tokens_details.cached_tokens` each final chunk reports (None when absent); the same
      first / follow-up pair on the (d) prompt, beside llama-server's;
* baseline (--baseline REV, default the commit before continuous batching): (a) and (c) on that revision's
  server (a git worktree), in the same run;
* llama-server (built by `python -m benchmarks.llamacpp --build`): (d) on the decoder's f32 GGUF, `-np 4`,
  continuous batching (its default), the same text prompt through its /completion endpoint (cache_prompt off,
  ignore_eos), `-t 2`; then (e)'s text pair with cache_prompt on (cached tokens: its timings' cache_n).
Answers of random weights can end at an eos early: tokens are what the servers report. Results:
benchmarks/serve_<preset>.{json,md}.
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
COLD_IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "rocket.jpg")     # (e): sent by nothing else
QUESTION = "Describe the image in English:"
SHORT = "Hi, what is two plus two?"
STORY = ("The old lighthouse keeper climbed the stairs each evening to light the lamp, and the ships that "
         "passed in the night saw its beam across the dark water. ")
MIXED = (8, 256, 16, 128, 32, 192, 64, 96)
# (e): per conversation, its first question and the fresh conversation's question about the same image (none
# asked before: QUESTION was, by every earlier section); then every follow-up asks FOLLOW_UP
TURNS = (("What is in the picture? Answer briefly:", "Which animal could this be?"),
         ("Which colours does the image show?", "Where could this photo have been taken?"))
FOLLOW_UP = "Why do you think so?"
SEQ_LENGTH = {"tiny": 512, "mid": 1024}
BASELINE = "f3079df"          # the scheduler that formed a batch only when the previous one had finished
THREADS = 2


def write_yaml(hf_dir, path, seq_length):
    from helpers import TOKENIZER_MODEL, yaml_for
    return yaml_for(hf_dir, path, vocab_file=TOKENIZER_MODEL, seq_length=seq_length)


def say(msg):
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def env():
    return dict(os.environ, GLOG_v="3", OMP_NUM_THREADS=str(THREADS))


# ---------------------------------------------------------------------------------------------- clients
class Stream:
    """One streamed request's times: first chunk with text, last chunk, tokens; its text and the prompt tokens
    the server says it took from its cache (None when it does not say)."""

    def __init__(self, first, last, tokens, prompt_tokens=None, text="", cached=None):
        self.first, self.last, self.tokens, self.prompt_tokens = first, last, tokens, prompt_tokens
        self.text, self.cached = text, cached

    @property
    def decode_tok_s(self):
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def _sse(url, body):
    import httpx
    t0 = time.perf_counter()
    first = last = None
    with httpx.stream("POST", url, json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - t0
            yield now, json.loads(line[6:])
            last = now
            first = first if first is not None else now


def data_url(path):
    kind = "png" if path.endswith(".png") else "jpeg"
    with open(path, "rb") as f:
        return f"data:image/{kind};base64," + base64.b64encode(f.read()).decode()


class FreshImages:
    """IMAGE with its centre pixels changed per call, as a PNG in `work`: a photo no request sent before (the
    centre survives the processor's crop), so its CLIP features and its prompt's KV blocks are computed, not
    taken from our caches (the figures that compare with the engine, the baseline and llama-server are all
    cold; the answers report cached_tokens to show it)."""

    def __init__(self, work):
        self.work, self.n = work, 0

    def __call__(self):
        from PIL import Image
        self.n += 1
        image = Image.open(IMAGE).convert("RGB")
        w, h = image.size
        image.paste((self.n % 256, self.n // 256 % 256, 7), (w // 2 - 4, h // 2 - 4, w // 2 + 4, h // 2 + 4))
        path = os.path.join(self.work, f"fresh-{self.n}.png")
        image.save(path)
        return path


class OurServer:
    def __init__(self, root, yaml_path, ckpt, work, max_batch=8, extra=()):
        import httpx
        from helpers import free_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(work, f"serve-{self.port}.log"), "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode",
                                      "serve", "--load_checkpoint", ckpt, "--output_dir", os.path.join(work, "serve"),
                                      "--port", str(self.port), "--max_batch", str(max_batch),
                                      "--served_model_name", "bench", *extra],
                                     cwd=root, env=dict(env(), PYTHONPATH=root), stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        while True:
            assert self.proc.poll() is None, f"the server died (log {self.log.name})"
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.start_s = time.perf_counter() - t0
        self.image = data_url(IMAGE)

    def stream(self, text, max_tokens, image=True, history=()):
        """`image`: True (IMAGE), False or an image's path; `history`: the conversation's earlier (user text,
        assistant text) turns, the image with its first user turn."""
        turns = [*history, (text, None)]
        messages = []
        for i, (user, answer) in enumerate(turns):
            content = [{"type": "text", "text": user}]
            if image and not i:
                url = self.image if image is True else data_url(image)
                content.insert(0, {"type": "image_url", "image_url": {"url": url}})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                "messages": messages}
        first, last, tokens, prompt, cached, text = None, None, 0, None, None, []
        for now, chunk in _sse(self.base + "/v1/chat/completions", body):
            if chunk.get("usage"):
                usage = chunk["usage"]
                tokens, prompt = usage["completion_tokens"], usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first if first is not None else now
                last = now
                text.append(chunk["choices"][0]["delta"]["content"])
        return Stream(first if first is not None else last, last, tokens, prompt, "".join(text), cached)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


class LlamaServer:
    def __init__(self, gguf, ctx, parallel, work):
        import httpx
        from benchmarks import llamacpp
        from helpers import free_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(work, "llama-server.log"), "w")
        self.proc = subprocess.Popen([llamacpp.server_binary(), "-m", gguf, "-t", str(THREADS), "-tb", str(THREADS),
                                      "-c", str(ctx * parallel), "-np", str(parallel), "--port", str(self.port),
                                      "--host", "127.0.0.1"],
                                     env=llamacpp.BENCH_ENV, stdout=self.log, stderr=self.log)
        while True:
            assert self.proc.poll() is None, f"llama-server died (log {self.log.name})"
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.cache_prompt = False       # (e) turns it on

    def stream(self, text, max_tokens, image=False, history=()):
        """`history`: earlier (prompt text, answer text) turns: the earlier prompt, its answer as streamed."""
        earlier = "".join(f"USER: {user} ASSISTANT:{answer} " for user, answer in history)
        body = {"prompt": f"{earlier}USER: {text} ASSISTANT:", "n_predict": max_tokens, "stream": True,
                "cache_prompt": self.cache_prompt, "ignore_eos": True}
        first, last, tokens, prompt, cached, text = None, None, 0, None, None, []
        for now, chunk in _sse(self.base + "/completion", body):
            if chunk.get("stop"):
                timings = chunk.get("timings", {})
                tokens = timings.get("predicted_n", chunk.get("tokens_predicted", tokens))
                prompt, cached = timings.get("prompt_n"), timings.get("cache_n")
            else:
                first = first if first is not None else now
                last = now
            text.append(chunk.get("content") or "")
        if prompt is not None and cached is not None:
            prompt += cached            # prompt_n counts the computed tokens only
        return Stream(first, last, tokens, prompt, "".join(text), cached)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def together(server, asks, delays=None):
    """Streams started at once (or after `delays` seconds each) -> (their Streams, wall seconds)."""
    results = [None] * len(asks)

    def client(i):
        if delays:
            time.sleep(delays[i])
        results[i] = server.stream(*asks[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(asks))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def short_while_long(server, fresh, long_tokens=256):
    """(a): the short question's TTFT alone (median of 3) and while a long image answer streams."""
    alone = statistics.median(server.stream(SHORT, 4, False).first for _ in range(3))
    box = {}
    image = fresh()
    long = threading.Thread(target=lambda: box.update(long=server.stream(QUESTION, long_tokens, image)))
    long.start()
    time.sleep(3.0)                     # the long answer is decoding by now
    busy = server.stream(SHORT, 4, False)
    long.join()
    return {"alone_s": alone, "beside_long_s": busy.first, "long_tokens": box["long"].tokens,
            "ratio": busy.first / alone}


def mixed(server, fresh):
    """(c): 8 clients, answers of 8..256 tokens, arriving 0.25 s apart, each about a photo not sent before."""
    asks = [(QUESTION, n, fresh()) for n in MIXED]
    results, wall = together(server, asks, delays=[0.25 * i for i in range(len(asks))])
    ttft = [r.first for r in results]
    tokens = sum(r.tokens for r in results)
    return {"p50_ttft_s": quantile(ttft, 0.5), "p95_ttft_s": quantile(ttft, 0.95), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall}


def text_prompt(server, text, new_tokens):
    """(d): one client's TTFT / decode tokens/s (median of 3) and 4 clients' total tokens/s; every prompt
    starts with its own head, so no prefix cache helps (llama-server runs with cache_prompt off)."""
    heads = iter(range(1, 100))
    one = [server.stream(f"Story {next(heads)}. {text}", new_tokens, False) for _ in range(3)]
    four, wall = together(server, [(f"Story {next(heads)}. {text}", new_tokens, False) for _ in range(4)])
    return {"prompt_tokens": one[0].prompt_tokens, "ttft_s": statistics.median(r.first for r in one),
            "decode_tok_s": statistics.median(r.decode_tok_s for r in one),
            "clients4_tokens_per_s": sum(r.tokens for r in four) / wall,
            "clients4_tokens": sum(r.tokens for r in four)}


def _turns(names, rows):
    """(e): per name (a column of rows of Streams) its median TTFT, cached and prompt tokens; after the first
    name, the median ratio of its TTFT to the first name's."""
    out = {}
    for name, col in zip(names, zip(*rows)):
        out[name] = {"ttft_s": statistics.median(s.first for s in col), "cached_tokens": [s.cached for s in col],
                     "prompt_tokens": [s.prompt_tokens for s in col]}
        if name != names[0]:
            out[name]["ratio"] = statistics.median(s.first / r[0].first for s, r in zip(col, rows))
    return out


def text_turns(server, story, max_tokens=16, runs=2):
    """(e), text: the (d) prompt (a new head each run: a first turn is one), then the same + its answer + a
    new question."""
    rows = []
    for i in range(runs):
        text = f"Tale {i + 1}. {story}"
        first = server.stream(text, max_tokens, False)
        rows.append((first, server.stream(FOLLOW_UP, max_tokens, False, history=[(text, first.text)])))
    return _turns(("first", "follow_up"), rows)


def remembered_turns(server, story, max_tokens=16):
    """(e): a first turn on an image not sent before; per TURNS conversation its first turn, its follow-up and
    a fresh conversation's new question about the same image; text_turns."""
    r = {}
    if os.path.exists(COLD_IMAGE):
        cold = server.stream(QUESTION, max_tokens, COLD_IMAGE)
        r["cold_first"] = {"ttft_s": cold.first, "cached_tokens": cold.cached, "prompt_tokens": cold.prompt_tokens}
    rows = []
    for question, other in TURNS:
        first = server.stream(question, max_tokens)
        follow = server.stream(FOLLOW_UP, max_tokens, history=[(question, first.text)])
        rows.append((first, follow, server.stream(other, max_tokens)))
    r.update(_turns(("first", "follow_up", "same_image"), rows))
    if "cold_first" in r:
        for name in ("first", "follow_up", "same_image"):
            r[name]["vs_cold"] = r[name]["ttft_s"] / r["cold_first"]["ttft_s"]
    r["text"] = text_turns(server, story, max_tokens)
    return r


# ---------------------------------------------------------------------------------------------- sides
def warm_engine(hf_dir, new_tokens, seq_length):
    """The warm engine's figures (benchmarks' ours side): TTFT and decode tokens/s, median of 3 runs."""
    from benchmarks import harness
    from benchmarks.workload import command
    child = harness.Child("ours", command("--side", "ours", "--hf-dir", hf_dir, "--threads", THREADS,
                                          "--new-tokens", new_tokens, "--seq-length", seq_length), THREADS)
    try:
        child.recv()
        for _ in range(2):
            child.ask("run")
        runs = [child.ask("run") for _ in range(3)]
        child.finish()
    except BaseException:
        child.kill()
        raise
    return {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs)}


def predict_cli(yaml_path, ckpt, work, new_tokens):
    """One predict process: decode tokens/s from the first to the last byte of its streamed answer."""
    out = os.path.join(work, "predict")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode", "predict",
                             "--predict_data", IMAGE, QUESTION, "--modal_type", "image", "text",
                             "--load_checkpoint", ckpt, "--output_dir", out, "--max_new_tokens", str(new_tokens)],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = last = None
    while True:
        b = proc.stdout.read(1)
        if not b:
            break
        last = time.perf_counter() - t0
        first = first if first is not None else last
    proc.wait()
    assert proc.returncode == 0, "predict failed"
    with open(os.path.join(out, "predict_results.jsonl")) as f:
        tokens = len(json.loads(f.readlines()[-1])["output_ids"])
    return {"first_byte_s": first, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / (last - first) if last > first else float("nan")}


def our_served(root, yaml_path, ckpt, work, story, new_tokens, full=True):
    server = OurServer(root, yaml_path, ckpt, work)
    try:
        r = {"start_s": server.start_s}
        for n in (1, 4, 8):            # warm-up: whatever still compiles on first use (an older scheduler)
            together(server, [(QUESTION, 8)] * n)
            together(server, [(story, 8, False)] * n)
        server.stream(SHORT, 4, False)
        fresh = FreshImages(work)
        r["short_while_long"] = short_while_long(server, fresh)
        r["mixed"] = mixed(server, fresh)
        if full:
            one = [server.stream(QUESTION, new_tokens, fresh()) for _ in range(3)]
            r["one_client"] = {"ttft_s": statistics.median(s.first for s in one),
                               "decode_tok_s": statistics.median(s.decode_tok_s for s in one),
                               "tokens": one[0].tokens, "prompt_tokens": one[0].prompt_tokens,
                               "cached_tokens": [s.cached for s in one]}
            r["text"] = text_prompt(server, story, 128)
            r["turns"] = remembered_turns(server, story)
        return r
    finally:
        server.close()


def baseline_served(rev, yaml_path, ckpt, work, story, new_tokens):
    tree = os.path.join(work, "baseline")
    subprocess.run(["git", "worktree", "add", "--detach", tree, rev], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = our_served(tree, yaml_path, ckpt, work, story, new_tokens, full=False)
        r["revision"] = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
        return r
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=False)


def llama_served(hf_dir, story, work, seq_length):
    from benchmarks import llamacpp
    gguf = llamacpp.gguf_file(hf_dir, "f32")
    server = LlamaServer(gguf, seq_length, 4, work)
    try:
        server.stream(story, 8)
        r = text_prompt(server, story, 128)
        server.cache_prompt = True
        r["turns"] = text_turns(server, story)
        r["version"] = llamacpp.version()
        return r
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- report
def _f(x, d=2):
    return f"{x:.{d}f}" if isinstance(x, (int, float)) else str(x)


def render_turns(e, lc):
    """(e)'s two tables (markdown lines); none without (e)."""
    if not e:
        return []
    cold = e.get("cold_first") or {}
    lines = ["", "| (e) remembered turns, 16-token answers, median of 2 conversations | TTFT (s) | / first turn | "
             "/ cold first turn | goal | cached tokens |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    if cold:
        lines.append(f"| image not sent before (rocket.jpg), first turn (cold) | {_f(cold['ttft_s'])} | | 1.00 | | "
                     f"{cold['cached_tokens']} |")
    for key, name, goal in (("first", "image sent before, a new question: first turn", ""),
                            ("follow_up", "its follow-up: the same + its answer + a new question", "<= 0.2"),
                            ("same_image", "a fresh conversation's new question about the same image", "<= 0.4")):
        x = e[key]
        lines.append(f"| {name} | {_f(x['ttft_s'])} | {_f(x.get('ratio', 1.0))} | {_f(x.get('vs_cold', '–'))} | "
                     f"{goal} | {', '.join(map(str, x['cached_tokens']))} |")
    t = e["text"]
    lines += ["", f"| (e) text prompt of {t['first']['prompt_tokens'][0]} tokens, then its follow-up | ours | "
              "llama-server f32 (cache_prompt) | ours / llama |", "| --- | ---: | ---: | ---: |"]
    for key, name in (("first", "first turn: TTFT (s)"), ("follow_up", "follow-up: TTFT (s)")):
        theirs = lc.get(key, {}).get("ttft_s", "–")
        ratio = _f(t[key]["ttft_s"] / theirs) if isinstance(theirs, (int, float)) and theirs else ""
        lines.append(f"| {name} | {_f(t[key]['ttft_s'])} | {_f(theirs)} | {ratio} |")
    lines.append(f"| follow-up / first turn | {_f(t['follow_up']['ratio'])} | "
                 f"{_f(lc.get('follow_up', {}).get('ratio', '–'))} | |")
    lines.append(f"| follow-up: cached tokens | {', '.join(map(str, t['follow_up']['cached_tokens']))} | "
                 f"{', '.join(map(str, lc.get('follow_up', {}).get('cached_tokens', ['–'])))} | |")
    return lines


def render(r):
    s, e, p = r["served"], r["engine"], r["predict"]
    a, c, one, t = s["short_while_long"], s["mixed"], s["one_client"], s["text"]
    b = r.get("baseline") or {}
    lc = r.get("llama_server") or {}
    lines = [f"# Serving benchmark: `{r['preset']}`", "",
             f"{r['machine']}; {THREADS} threads per side; one run, {r['date']}. Server `--max_batch 8`, default "
             f"`--prefill_chunk`; image prompts of {one.get('prompt_tokens')} tokens (576 image tokens).", "",
             "| | ours | baseline" + (f" ({b.get('revision')})" if b else "") + " |", "| --- | ---: | ---: |",
             f"| (a) short question alone: TTFT (s) | {_f(a['alone_s'])} | {_f(b.get('short_while_long', {}).get('alone_s', '–'))} |",
             f"| (a) the same while a {a['long_tokens']}-token answer streams: TTFT (s) | {_f(a['beside_long_s'])} | "
             f"{_f(b.get('short_while_long', {}).get('beside_long_s', '–'))} |",
             f"| (a) ratio (goal <= 2) | {_f(a['ratio'])} | {_f(b.get('short_while_long', {}).get('ratio', '–'))} |",
             f"| (c) mixed load, 8 clients: p50 TTFT (s) | {_f(c['p50_ttft_s'])} | {_f(b.get('mixed', {}).get('p50_ttft_s', '–'))} |",
             f"| (c) p95 TTFT (s) | {_f(c['p95_ttft_s'])} | {_f(b.get('mixed', {}).get('p95_ttft_s', '–'))} |",
             f"| (c) total tokens/s | {_f(c['tokens_per_s'], 1)} | {_f(b.get('mixed', {}).get('tokens_per_s', '–'), 1)} |",
             "", "| one client, image question | served | warm engine | served / engine |", "| --- | ---: | ---: | ---: |",
             f"| (b) TTFT (s) | {_f(one['ttft_s'])} | {_f(e['ttft_s'])} | {_f(one['ttft_s'] / e['ttft_s'])} |",
             f"| (b) decode tokens/s | {_f(one['decode_tok_s'], 1)} | {_f(e['decode_tok_s'], 1)} | "
             f"{_f(one['decode_tok_s'] / e['decode_tok_s'])} |",
             f"| predict CLI, one process, {p['tokens']}-token answer: decode tokens/s | {_f(p['decode_tok_s'], 1)} | "
             f"{_f(e['decode_tok_s'], 1)} | {_f(p['decode_tok_s'] / e['decode_tok_s'])} |",
             "", f"| (d) text prompt of {t.get('prompt_tokens')} tokens, 128-token answers | ours | llama-server f32 | ours / llama |",
             "| --- | ---: | ---: | ---: |"]
    for key, name, d in (("ttft_s", "one client: TTFT (s)", 2), ("decode_tok_s", "one client: decode tokens/s", 1),
                         ("clients4_tokens_per_s", "4 clients: total tokens/s", 1)):
        theirs = lc.get(key, "–")
        ratio = _f(t[key] / theirs) if isinstance(theirs, (int, float)) and theirs else ""
        lines.append(f"| {name} | {_f(t[key], d)} | {_f(theirs, d)} | {ratio} |")
    lines += render_turns(s.get("turns"), lc.get("turns") or {})
    if lc.get("error"):
        lines.append(f"\nllama-server: {lc['error']}")
    lines.append(f"\nOur server was ready {s['start_s']:.1f} s after its start (load, compile every step shape).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SEQ_LENGTH), default="mid")
    ap.add_argument("--new-tokens", type=int, default=64, help="(b): the one client's answer length")
    ap.add_argument("--long", type=int, default=130, help="predict's answer length")
    ap.add_argument("--baseline", default=BASELINE, help="a git revision whose server is measured too ('' = off)")
    ap.add_argument("--llamacpp", choices=("auto", "off"), default="auto")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    from conftest import hf_checkpoint
    from benchmarks import system
    hf_dir = hf_checkpoint(args.preset, shard_mb=200 if args.preset == "mid" else None)
    work = tempfile.mkdtemp(prefix="llava-serve-bench-")
    yaml_path = write_yaml(hf_dir, os.path.join(work, "model.yaml"), SEQ_LENGTH[args.preset])
    ckpt = os.path.join(work, "model.ckpt")
    subprocess.run([sys.executable, "convert_weight.py", "--model", "llava", "--input_path", hf_dir,
                    "--output_path", ckpt, "--quiet"], cwd=ROOT, check=True, env=env())
    from llava_tokenizer import LlavaTokenizer
    from helpers import TOKENIZER_MODEL
    tok = LlavaTokenizer(vocab_file=TOKENIZER_MODEL)
    story = STORY
    # ~700 tokens on mid; a smaller model's context must still hold it, its 128-token answers and (e)'s follow-up
    while len(tok.encode(story + "What happened?")) < min(690, SEQ_LENGTH[args.preset] - 200):
        story += STORY
    story += "What happened?"
    m = system.machine_info()
    isa = "AVX-512" if m["avx512f"] else "AVX2" if m["avx2"] else "no AVX2"
    r = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "machine": f"{m['cpu']} ({isa}), {m['cores']} cores"}
    say("warm engine ...")
    r["engine"] = warm_engine(hf_dir, args.new_tokens, SEQ_LENGTH[args.preset])
    say("predict CLI ...")
    r["predict"] = predict_cli(yaml_path, ckpt, work, args.long)
    say("our server ...")
    r["served"] = our_served(ROOT, yaml_path, ckpt, work, story, args.new_tokens)
    if args.baseline:
        say(f"baseline server ({args.baseline}) ...")
        try:
            r["baseline"] = baseline_served(args.baseline, yaml_path, ckpt, work, story, args.new_tokens)
        except (subprocess.CalledProcessError, AssertionError, OSError) as e:
            r["baseline"] = {"error": str(e)}
    if args.llamacpp == "auto":
        say("llama-server ...")
        try:
            r["llama_server"] = llama_served(hf_dir, story, work, SEQ_LENGTH[args.preset])
        except Exception as e:  # noqa: BLE001  the peer is optional: say why it is missing
            r["llama_server"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    with open(os.path.join(args.out, f"serve_{args.preset}.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(args.out, f"serve_{args.preset}.md"), "w") as f:
        f.write(render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
