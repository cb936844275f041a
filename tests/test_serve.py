"""[K] Conversations and the OpenAI-compatible server, against Hugging Face and the official `openai` client.

The reference for every answer is transformers: llava-hf's chat template through HF's own `LlavaProcessor`
(`apply_chat_template`, then the processor expands `<image>`), then `LlavaForConditionalGeneration.generate`
(greedy). The server is a real `run_mindformer.py --run_mode serve` process on 127.0.0.1, driven with the
`openai` package, httpx for raw HTTP and a local image server for http(s) images.
"""
import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from helpers import (IMAGES, ROOT, TOKENIZER_MODEL, ImageServer, ServerProcess, data_url, free_port, image_part,
                     launcher_argv, text_part)
from oracle import HFChat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CAT, COFFEE, ROCKET = (os.path.join(IMAGES, n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"))


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    torch.set_num_threads(1)
    return HFChat(tiny_hf_dir)


# ---------------------------------------------------------------------------------------------- chat template
CONVERSATIONS = {
    "one_image": [{"role": "user", "content": [image_part(CAT), text_part("What is shown?")]}],
    "text_only_string": [{"role": "user", "content": "Tell me a story."}],
    "system_and_history": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [image_part(CAT), text_part("What animal is this?")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour is it?"}],
    "image_in_second_turn": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": [text_part("Hi, how can I help?")]},
        {"role": "user", "content": [text_part("Compare:"), image_part(CAT), image_part(COFFEE)]}],
}


@pytest.fixture(scope="module")
def our_processor(tiny_hf_dir):
    from llava_config import LlavaConfig
    from llava_processor import LlavaProcessor
    from llava_tokenizer import LlavaTokenizer
    with open(os.path.join(tiny_hf_dir, "config.json")) as f:
        config = LlavaConfig.from_hf_config(json.load(f), seq_length=512)
    return LlavaProcessor(config, LlavaTokenizer(vocab_file=TOKENIZER_MODEL))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversation_ids_equal_hf_apply_chat_template(name, hf, our_processor):
    messages = CONVERSATIONS[name]
    conversation, paths = HFChat.hf_messages(messages)
    ours = our_processor.encode_chat(conversation)
    theirs = hf.inputs(messages, paths)["input_ids"][0].tolist()
    assert ours == theirs


def test_template_text_is_llava_hf_s():
    """Hand-written: what llava-hf's template renders (reference/README: earlier answers end with a space)."""
    from chat_template import ChatTemplate
    text, _ = ChatTemplate().render([{"role": "user", "content": [{"type": "image"}, text_part("What is shown?")]},
                                  {"role": "assistant", "content": "A cat."},
                                  {"role": "user", "content": "Sure?"}])
    assert text == "USER: <image>\nWhat is shown? ASSISTANT: A cat. USER: Sure? ASSISTANT:"


# ---------------------------------------------------------------------------------------------- the server
# `setup` and `server`: the served tiny model (conftest.py)
@pytest.fixture(scope="module")
def images():
    server = ImageServer(ROCKET)
    yield server
    server.close()


def ask(server, messages, max_tokens=24, **kw):
    reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, **kw)
    return reply


def streamed(server, messages, max_tokens=24, **kw):
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                        stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, reasons, chunks


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(server.base + "/health").json()["status"] == "ok"


def test_answer_and_stream_equal_hf_generate(server, hf):
    messages = [{"role": "user", "content": [image_part(data_url(CAT)), text_part("What is shown?")]}]
    ids, text = hf.answer(messages, [CAT], 24)
    reply = ask(server, messages)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if ids[-1] == 2 else "length")
    assert reply.usage.completion_tokens == len(ids)
    assert reply.usage.prompt_tokens == hf.inputs(messages, [CAT])["input_ids"].shape[1]
    s_text, reasons, chunks = streamed(server, messages, stream_options={"include_usage": True})
    assert s_text == text and reasons == [reply.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_multi_turn_with_an_image_in_the_second_turn(server, hf, images):
    first = [{"role": "user", "content": "Hello, who are you?"}]
    _, answer = hf.answer(first, [], 12)
    assert ask(server, first, max_tokens=12).choices[0].message.content == answer
    messages = first + [{"role": "assistant", "content": answer},
                        {"role": "user", "content": [image_part(images.url("/cat.jpg")),
                                                     text_part("And what is in this picture?")]}]
    _, expected = hf.answer(messages, [ROCKET], 16)
    assert ask(server, messages, max_tokens=16).choices[0].message.content == expected


def test_a_follow_up_turn_reuses_the_first_turns_kv_and_equals_hf(server, hf):
    """[P] A client resends the whole conversation; the server finds the first turn's prompt and answer in its
    prefix cache (usage.prompt_tokens_details.cached_tokens, as OpenAI reports it) and its image in the image
    cache, and the answers still equal HF generate on the full conversation."""
    astronaut = os.path.join(IMAGES, "astronaut.jpg")       # no other test asks about it first
    health = lambda: httpx.get(server.base + "/health").json()
    before = health()
    first = [{"role": "user", "content": [image_part(data_url(astronaut)), text_part("Who is this?")]}]
    _, answer = hf.answer(first, [astronaut], 12)
    reply = ask(server, first, max_tokens=12)
    assert reply.choices[0].message.content == answer
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    prompt = reply.usage.prompt_tokens
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
    _, expected = hf.answer(follow, [astronaut], 12)
    text, _, chunks = streamed(server, follow, max_tokens=12, stream_options={"include_usage": True})
    assert text == expected
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    # at least every whole 16-token block of the first turn's prompt, never the block of the last token
    assert prompt // 16 * 16 <= cached <= (chunks[-1].usage.prompt_tokens - 1) // 16 * 16
    after = health()
    assert after["prefix_hits"] >= before["prefix_hits"] + 1
    assert after["image_cache_hits"] >= before["image_cache_hits"] + 1     # CLIP ran for the first turn only
    assert after["image_cache_misses"] == before["image_cache_misses"] + 1


def test_logprobs_equal_hf_log_softmax_of_each_step(server, hf):
    """[S] logprobs + top_logprobs (OpenAI's chat fields), streamed and not: each answer token's
    log-probability and its top 3 alternatives equal torch's log_softmax of HF's logits at that step (greedy:
    the token is HF's top 1), with the token's text and UTF-8 bytes."""
    messages = [{"role": "user", "content": [image_part(data_url(CAT)), text_part("What is shown?")]}]
    ids, _ = hf.answer(messages, [CAT], 6)
    inputs = hf.inputs(messages, [CAT])
    prompt = inputs["input_ids"]
    with torch.no_grad():
        full = torch.cat([prompt, torch.tensor([ids])], 1)
        logits = hf.model(input_ids=full, pixel_values=inputs["pixel_values"],
                          attention_mask=torch.ones_like(full)).logits[0, prompt.shape[1] - 1:-1]
    ref = torch.log_softmax(logits.double(), -1)
    expected = [t for t in ids if t != 2]                  # the eos token is not part of the content
    reply = ask(server, messages, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                        stream=True, logprobs=True, top_logprobs=3))
    streamed_items = [item for c in chunks if c.choices and c.choices[0].logprobs
                      for item in c.choices[0].logprobs.content]
    tok = hf.processor.tokenizer
    for items in (content, streamed_items):
        assert len(items) == len(expected)
        for step, (item, token) in enumerate(zip(items, expected)):
            piece = tok.convert_ids_to_tokens(token).replace("\u2581", " ")
            assert item.token == piece and item.bytes == list(piece.encode())
            assert abs(item.logprob - ref[step, token].item()) < 1e-3
            top = torch.topk(ref[step], 3)
            assert [abs(a.logprob - b) < 1e-3 for a, b in zip(item.top_logprobs, top.values.tolist())] == [True] * 3
            assert item.top_logprobs[0].token == piece     # greedy: the chosen token is the most likely
    assert ask(server, messages, max_tokens=2).choices[0].logprobs is None
    bad = httpx.post(server.base + "/v1/chat/completions",
                     json={"model": "tiny", "messages": messages, "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_two_images_system_prompt_and_history(server, hf):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image_part(data_url(CAT)), image_part(data_url(COFFEE)),
                                             text_part("What differs?")]},
                {"role": "assistant", "content": "The colours."},
                {"role": "user", "content": "Anything else?"}]
    _, expected = hf.answer(messages, [CAT, COFFEE], 16)
    assert ask(server, messages, max_tokens=16).choices[0].message.content == expected


def test_stop_strings_end_the_answer_before_them(server, hf):
    messages = [{"role": "user", "content": "Describe a sunny day."}]
    _, text = hf.answer(messages, [], 32)
    words = text.split()
    assert len(words) > 4
    stop = " " + words[3]                       # a string the greedy answer really contains
    expected = text[:text.index(stop)]
    reply = ask(server, messages, max_tokens=32, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    s_text, reasons, _ = streamed(server, messages, max_tokens=32, stop=stop)
    assert s_text == expected and reasons == ["stop"]


def test_eight_concurrent_clients_are_batched_and_all_correct(server, hf):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    expected = [hf.answer([{"role": "user", "content": p}], [], 16)[1] for p in prompts]
    before = httpx.get(server.base + "/health").json()["steps"]
    results = [None] * 8

    def client(i):
        if i % 2:
            results[i] = streamed(server, [{"role": "user", "content": prompts[i]}], max_tokens=16)[0]
        else:
            results[i] = ask(server, [{"role": "user", "content": prompts[i]}], max_tokens=16).choices[0].message.content

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == expected
    health = httpx.get(server.base + "/health").json()
    # one at a time, 8 answers of 16 tokens take 8 * 16 engine steps (a prompt step and 15 decode steps each)
    assert health["steps"] - before < 8 * 16 and health["largest_batch"] > 1, "requests were answered one at a time"


def test_a_request_joins_a_running_answer_and_both_equal_hf(server, hf):
    """Continuous batching: a short question sent while another client's long answer streams is answered before
    that answer ends (it joins the running batch at the next step), and both answers equal HF generate."""
    long_messages = [{"role": "user", "content": [image_part(data_url(CAT)), text_part("Tell me everything.")]}]
    short_messages = [{"role": "user", "content": "Quick: hello?"}]
    long_ids, long_ref = hf.answer(long_messages, [CAT], 120)
    _, short_ref = hf.answer(short_messages, [], 6)
    assert len(long_ids) == 120                                   # really a long answer (no early eos)
    times, box, started = {}, {}, threading.Event()

    def long_client():
        text = []
        for chunk in server.client.chat.completions.create(model="tiny", messages=long_messages, max_tokens=120,
                                                           stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                started.set()
        times["long_end"], box["long"] = time.monotonic(), "".join(text)

    t = threading.Thread(target=long_client)
    t.start()
    assert started.wait(60)
    short = ask(server, short_messages, max_tokens=6).choices[0].message.content
    times["short_end"] = time.monotonic()
    t.join(timeout=300)
    assert short == short_ref and box["long"] == long_ref
    assert times["short_end"] < times["long_end"], "the short request waited for the running answer"


def test_a_client_that_disconnects_mid_stream_frees_the_server(server, hf):
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    cancelled = httpx.get(server.base + "/health").json()["cancelled"]
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": messages, "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the abandoned row was stopped (not run to 400 tokens) and the server answers the next request correctly
    _, expected = hf.answer([{"role": "user", "content": "Hi"}], [], 8)
    assert ask(server, [{"role": "user", "content": "Hi"}], max_tokens=8).choices[0].message.content == expected
    health = httpx.get(server.base + "/health").json()
    assert health["cancelled"] == cancelled + 1 and health["waiting"] == 0


def test_a_slow_image_download_does_not_stall_other_requests(server, images):
    slow = threading.Thread(target=lambda: httpx.post(
        server.base + "/v1/chat/completions", timeout=60,
        json={"messages": [{"role": "user", "content": [image_part(images.url("/trickle.jpg")), text_part("?")]}],
              "max_tokens": 4}))
    slow.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    ask(server, [{"role": "user", "content": "Quick question."}], max_tokens=4)
    assert time.monotonic() - t0 < 5, "a request waited for another request's image download"
    slow.join(timeout=60)


def _big_jpeg(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(path, quality=95)
    assert os.path.getsize(path) > 300_000
    return str(path)


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


# (name, request body or raw bytes, status, the field the error names, words in the message)
BAD_REQUESTS = [
    ("not_json", b"{oops", 400, None, "not valid JSON"),
    ("not_an_object", [1, 2], 400, None, "JSON object"),
    ("no_messages", {"model": "tiny"}, 400, "messages", "messages"),
    ("empty_messages", {"messages": []}, 400, "messages", "non-empty"),
    ("bad_role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role"),
    ("bad_content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "content"),
    ("bad_part", {"messages": _user({"type": "audio"})}, 400, "messages[0].content[0]", "part"),
    ("image_in_assistant", {"messages": [{"role": "assistant", "content": [image_part("data:image/png;base64,AA==")]}]},
     400, "messages[0].content[0]", "only user"),
    ("n_two", {"messages": _user(text_part("hi")), "n": 2}, 400, "n", "'n'"),
    ("temperature_negative", {"messages": _user(text_part("hi")), "temperature": -1}, 400, "temperature", ">= 0"),
    ("top_p_zero", {"messages": _user(text_part("hi")), "top_p": 0}, 400, "top_p", "top_p"),
    ("max_tokens_zero", {"messages": _user(text_part("hi")), "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("max_tokens_text", {"messages": _user(text_part("hi")), "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("too_long_for_context", {"messages": _user(text_part("hi")), "max_tokens": 600}, 400, "max_tokens", "context"),
    ("stop_not_strings", {"messages": _user(text_part("hi")), "stop": [1]}, 400, "stop", "stop"),
    ("stream_not_bool", {"messages": _user(text_part("hi")), "stream": "yes"}, 400, "stream", "stream"),
    ("image_tag_in_text", {"messages": _user(text_part("look <image> here"))}, 400, "messages", "<image>"),
    ("image_path_not_url", {"messages": _user(image_part(CAT), text_part("?"))}, 400,
     "messages[0].content[0].image_url.url", "not a URL"),
    ("image_file_url", {"messages": _user(image_part("file:///etc/passwd"), text_part("?"))}, 400,
     "messages[0].content[0].image_url.url", "unsupported scheme"),
    ("image_404", "url:/missing.jpg", 400, "messages[0].content[0].image_url.url", "could not be fetched"),
    ("image_html", "url:/page.jpg", 400, "messages[0].content[0].image_url.url", "not an image"),
    ("image_bad_base64", {"messages": _user(image_part("data:image/png;base64,@@"), text_part("?"))}, 400,
     "messages[0].content[0].image_url.url", "base64"),
    ("image_too_large", "big", 413, "messages[0].content[0].image_url.url", "limit of 300000"),
    ("body_too_large", b"x" * 1_500_000, 413, None, "request body"),
]


@pytest.mark.parametrize("name,body,status,param,words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(name, body, status, param, words, server, images, tmp_path):
    if body == "big":
        body = {"messages": _user(image_part(data_url(_big_jpeg(tmp_path))), text_part("?"))}
    elif isinstance(body, str) and body.startswith("url:"):
        body = {"messages": _user(image_part(images.url(body[4:])), text_part("?"))}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.base + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert "Traceback" not in r.text
    # the official client raises its typed error with the same message
    if isinstance(body, dict) and status == 400 and "messages" in body and "max_tokens" not in body:
        with pytest.raises(openai.BadRequestError, match="400"):
            server.client.chat.completions.create(model="tiny", **body)


def test_unknown_route_and_method(server):
    r = httpx.get(server.base + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.base + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert ask(server, [{"role": "user", "content": "still alive?"}], max_tokens=2).choices[0].message.content is not None


def test_full_queue_answers_429(setup):
    s = ServerProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out429"), "--max_batch", "1",
                      "--max_queue", "1")
    try:
        statuses = []

        def client():
            r = httpx.post(s.base + "/v1/chat/completions", timeout=120,
                           json={"messages": [{"role": "user", "content": "Tell me everything."}],
                                 "max_tokens": 200})
            statuses.append((r.status_code, r.json()))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        codes = sorted(code for code, _ in statuses)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(body for code, body in statuses if code == 429)
        assert busy["error"]["type"] == "rate_limit_error" and "busy" in busy["error"]["message"]
    finally:
        s.close()


@pytest.mark.slow
def test_two_ranks_serve_the_single_process_answers(setup, server, hf):
    """Tensor-parallel serving with msrun_launcher.sh: rank 0 serves HTTP, rank 1 follows its batches; greedy,
    seeded-sampling and stop-string answers, batched, equal the one-process server's (and HF's)."""
    d = setup["dir"]
    with open(setup["yaml"]) as f:
        text = f.read()
    yaml2 = str(d / "tiny_tp2.yaml")
    with open(yaml2, "w") as f:
        f.write(text.replace("model_parallel: 1", "model_parallel: 2"))
    out = str(d / "out_tp2")
    port = free_port()
    order = (f"run_mindformer.py --config {yaml2} --run_mode serve --load_checkpoint {setup['ckpt']} "
             f"--use_parallel True --auto_trans_ckpt True --output_dir {out} --port {port} "
             "--served_model_name tiny")
    launcher = subprocess.Popen(launcher_argv(order, 2, free_port(), os.path.join(out, "msrun_log"), 300),
                                cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the 2-rank server did not start"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        tp = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        requests = [
            dict(messages=[{"role": "user", "content": [image_part(data_url(CAT)), text_part("What is shown?")]}],
                 max_tokens=16),
            dict(messages=[{"role": "user", "content": "Describe a sunny day."}], max_tokens=24,
                 stop=[" the"]),
            dict(messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=0.9,
                 top_p=0.9, seed=1234),
            dict(messages=[{"role": "user", "content": "Hello"}], max_tokens=12),
        ]
        one = [server.client.chat.completions.create(model="tiny", **r).choices[0] for r in requests]
        two = [None] * len(requests)

        def client(i):
            two[i] = tp.chat.completions.create(model="tiny", **requests[i]).choices[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [c.message.content for c in two] == [c.message.content for c in one]
        assert [c.finish_reason for c in two] == [c.finish_reason for c in one]
        assert one[0].message.content == hf.answer(requests[0]["messages"], [CAT], 16)[1]
        assert httpx.get(base + "/health").json()["largest_batch"] > 1
    finally:
        os.killpg(launcher.pid, signal.SIGINT)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
