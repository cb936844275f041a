"""[K] `run_mindformer.py --run_mode chat`: a terminal conversation, checked against Hugging Face turn by turn."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import IMAGES, ROOT, convert, image_part, text_part, yaml_for
from oracle import HFChat

pytest.importorskip("torch")
pytest.importorskip("transformers")

CAT = os.path.join(IMAGES, "chelsea.jpg")


class ChatProcess:
    """The chat mode with pipes; stdout and stderr collected by reader threads."""

    def __init__(self, yaml_path, ckpt, out_dir, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "run_mindformer.py", "--config", yaml_path, "--run_mode", "chat",
             "--load_checkpoint", ckpt, "--output_dir", out_dir, *extra],
            cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(c) for c in iter(lambda: s.read(1), "")],
                             daemon=True).start()

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            assert self.proc.poll() is None or predicate(), "".join(self.err)[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"timed out; stdout={''.join(self.out)[-500:]!r} stderr={''.join(self.err)[-2000:]!r}")

    def stdout(self):
        return "".join(self.out)

    def stderr(self):
        return "".join(self.err)

    def answers(self):
        """The answer lines: stdout without the "> " input prompts."""
        lines = [line for line in self.stdout().split("\n")]
        return [t for t in (line.lstrip("> ") if line.startswith("> ") else line for line in lines) if t]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_hf_dir):
    d = tmp_path_factory.mktemp("chat")
    return {"yaml": yaml_for(tiny_hf_dir, str(d / "tiny.yaml"), seq_length=512),
            "ckpt": convert(tiny_hf_dir, str(d / "tiny.ckpt")), "dir": d, "hf": HFChat(tiny_hf_dir)}


def test_two_turns_with_an_image_equal_hf(setup):
    hf = setup["hf"]
    chat = ChatProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out"), "--max_new_tokens", "12")
    chat.send(f"/image {CAT}")
    chat.send("What is shown?")
    chat.send("And what colour is it?")
    chat.send("/stats")
    chat.send("/reset")
    chat.send("Hello")
    chat.send("/exit")
    assert chat.proc.wait(timeout=180) == 0, chat.stderr()
    first = [{"role": "user", "content": [image_part(CAT), text_part("What is shown?")]}]
    _, a1 = hf.answer(first, [CAT], 12)
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And what colour is it?"}]
    _, a2 = hf.answer(second, [CAT], 12)
    _, a3 = hf.answer([{"role": "user", "content": "Hello"}], [], 12)
    assert chat.answers() == [a1, a2, a3], chat.stdout()
    assert "image 1 attached" in chat.stderr() and "new conversation" in chat.stderr()
    # [P] the second turn took the first turn's prompt (every whole 16-token block of it) from the prefix
    # cache, and its image's features from the image cache
    stats = re.search(r"prefix cache: (\d+) hits, (\d+) tokens reused.*image cache: (\d+) hits, (\d+) misses",
                      chat.stderr())
    assert stats, chat.stderr()
    hits, reused, image_hits, image_misses = map(int, stats.groups())
    prompt = hf.inputs(first, [CAT])["input_ids"].shape[1]
    assert hits == 1 and reused >= prompt // 16 * 16 and (image_hits, image_misses) == (1, 1)


def test_bad_command_and_bad_image_keep_the_chat_going(setup):
    chat = ChatProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out2"), "--max_new_tokens", "4")
    chat.send("/image /no/such/file.jpg")
    chat.send("/frobnicate")
    chat.send("Hi")
    chat.send("/exit")
    assert chat.proc.wait(timeout=180) == 0
    err = chat.stderr()
    assert "error: image /no/such/file.jpg: no such file" in err and "commands: /image" in err
    assert "Traceback" not in err
    assert len(chat.answers()) == 1, chat.stdout()


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_chat(setup):
    hf = setup["hf"]
    chat = ChatProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out3"), "--max_new_tokens", "400",
                       "--mode", "1")
    chat.wait_for(lambda: "[chat with the model" in chat.stderr())
    chat.send("Tell me a very long story.")
    chat.wait_for(lambda: len(chat.stdout()) > 40)
    chat.proc.send_signal(signal.SIGINT)
    chat.wait_for(lambda: "[stopped]" in chat.stderr())
    chat.send("Hello")
    chat.send("/exit")
    assert chat.proc.wait(timeout=180) == 0, chat.stderr()
    answers = chat.answers()
    assert len(answers) == 2, chat.stdout()
    # the cut answer stays in the conversation, as the model wrote it
    messages = [{"role": "user", "content": "Tell me a very long story."}, {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "Hello"}]
    _, full = hf.answer(messages[:1], [], 400)
    assert full.startswith(answers[0]) and len(answers[0]) < len(full)
    _, expected = hf.answer(messages, [], 400)
    assert answers[1] == expected
