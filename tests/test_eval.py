"""[T] `run_mindformer.py --run_mode eval` on the tiny model and a hand-made question set: every answer equals
Hugging Face `generate` on the prompt LLaVA's evaluation uses; resuming an interrupted run gives the file of
one run; bad records are reported one line each and skipped; a text-only question is answered without an
image."""
import json
import os
import shutil

import pytest

from helpers import IMAGES, ROOT, convert, launcher_argv, run_cli, text_part, yaml_for

pytest.importorskip("torch")
pytest.importorskip("transformers")

MAX_NEW = 12
# LLaVA's llava/conversation.py, conv_vicuna_v1 (SeparatorStyle.TWO): system, " USER: ", the question,
# " ASSISTANT:". Typed here from LLaVA's source, not taken from our code.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
GOOD = [
    {"question_id": 1, "image": "astronaut.jpg", "text": "What animal is this?", "category": "animals"},
    {"question_id": "q2", "image": "coffee.jpg", "text": "What is on the table?"},
    {"question_id": 3, "image": "astronaut.jpg", "text": "What colour is it?\nAnswer with one word."},
    {"question_id": 4, "text": "Name a fruit."},                          # text-only
    {"question_id": 1, "image": "rocket.jpg", "text": "Is this a rocket?"},   # same id, another text (MME-style)
]


def write_questions(folder):
    """The question file: GOOD with bad records between them, and the image folder (a broken image in it)."""
    images = folder / "images"
    images.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(os.path.join(IMAGES, name), images / name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    lines = [json.dumps(GOOD[0]), "this line is not JSON", json.dumps(GOOD[1]),
             json.dumps({"question_id": 7, "image": "missing.jpg", "text": "Where is it?"}),
             json.dumps(GOOD[2]), json.dumps({"question_id": 8, "image": "broken.jpg", "text": "What is it?"}),
             json.dumps(GOOD[0]),                                          # a duplicate (same id and text)
             json.dumps({"question_id": 9, "image": "coffee.jpg"}),        # no text
             json.dumps(GOOD[3]), json.dumps(GOOD[4])]
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(images)


def hf_answer(oracle, question, images):
    """HF generate (greedy) on LLaVA's vicuna_v1 prompt for the question, its answer as LLaVA stores it
    (decoded without special tokens, stripped)."""
    import torch
    import make_tiny_llava
    image = question.get("image")
    body = f"<image>\n{question['text']}" if image else question["text"]
    ids = []
    for t in oracle.tokenizer(f"{SYSTEM} USER: {body} ASSISTANT:")["input_ids"]:
        ids.extend([t] * oracle.num_image_tokens if t == make_tiny_llava.IMAGE_TOKEN_INDEX else [t])
    ids = torch.tensor([ids])
    pixels = oracle.pixels(os.path.join(images, image)) if image else None
    with torch.no_grad():
        out = oracle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                    do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=make_tiny_llava.PAD_TOKEN_ID)
    new = out[0, ids.shape[1]:].tolist()
    if 2 in new:
        new = new[:new.index(2) + 1]
    # the random tiny model can pick the vocabulary's unused rows (32002..32063), which HF's tokenizer cannot
    # decode: the questions are chosen so that it does not
    assert max(new) < make_tiny_llava.PAD_TOKEN_ID + 1, (question, new)
    return oracle.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_hf_dir):
    from oracle import HFOracle
    base = tmp_path_factory.mktemp("eval")
    questions, images = write_questions(base)
    oracle = HFOracle(tiny_hf_dir)
    return dict(base=base, questions=questions, images=images,
                yaml=yaml_for(tiny_hf_dir, str(base / "tiny.yaml"), seq_length=512),
                ckpt=convert(tiny_hf_dir, str(base / "tiny.ckpt")),
                expected=[hf_answer(oracle, q, images) for q in GOOD])


def run_eval(files, answers, *extra, questions=None):
    return run_cli(["run_mindformer.py", "--config", files["yaml"], "--run_mode", "eval", "--load_checkpoint",
                    files["ckpt"], "--question_file", questions or files["questions"], "--image_folder",
                    files["images"], "--answers_file", answers, "--output_dir", str(files["base"] / "out"),
                    "--max_new_tokens", str(MAX_NEW), *extra])


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_run(files):
    answers = str(files["base"] / "answers" / "one_run.jsonl")      # its folder does not exist yet
    proc = run_eval(files, answers, "--max_batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return answers, proc


def test_every_answer_equals_hf_generate(files, one_run):
    answers, _ = one_run
    got = records(answers)
    # in question order, the bad records left out; the text-only question answered too
    assert [(r["question_id"], r["prompt"]) for r in got] == [(q["question_id"], q["text"]) for q in GOOD]
    assert [r["text"] for r in got] == files["expected"]
    for r in got:
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["model_id"] == "tiny" and r["metadata"] == {}
    assert len({r["answer_id"] for r in got}) == len(got)


def test_bad_records_one_line_each(one_run):
    _, proc = one_run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    def line_about(*needles):
        hits = [line for line in lines if all(n in line for n in needles)]
        assert len(hits) == 1, (needles, lines)
        return hits[0]
    line_about("line 2", "not JSON", "skipped")
    line_about("7", "missing.jpg", "not found", "skipped")
    line_about("8", "broken.jpg", "skipped")
    line_about("line 7", "repeats an earlier question", "skipped")
    line_about("line 8", "'text'", "skipped")
    assert "Traceback" not in proc.stderr
    # the end: progress with a rate, and the summary
    summary = line_about("answers appended to")
    assert "5 answers" in summary and "questions/min" in summary and "5 question record(s) skipped" in summary
    assert "q/s" in proc.stderr or "s/q" in proc.stderr


def test_resume_after_an_interrupted_run_gives_the_same_file(files, one_run, tmp_path):
    answers, _ = one_run
    with open(answers, "rb") as f:
        whole = f.read()
    lines = whole.splitlines(keepends=True)
    # killed while writing its third answer: two whole lines and half of the third
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"".join(lines[:2]) + lines[2][:len(lines[2]) // 2])
    proc = run_eval(files, str(resumed), "--max_batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two questions whose images are missing or broken count as questions not yet answered
    assert "last line was incomplete" in proc.stderr and "resuming: 2 of 7 questions" in proc.stderr
    assert resumed.read_bytes() == whole
    # every question answered already: nothing to do, the file unchanged, the model never loaded
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(q) + "\n" for q in GOOD))
    proc = run_eval(files, str(resumed), questions=str(good))
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-2000:]
    assert resumed.read_bytes() == whole


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_answers_and_a_rerun_completes_the_file(files, tmp_path):
    """A real interruption: SIGINT once the first answers are in the file. The run says what it kept and
    exits 130; the rerun answers the rest, and the file is the one a single run writes (one row at a time,
    so answers finish in question order)."""
    import signal
    import subprocess
    import sys
    import time
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(dict(q, question_id=f"{n}-{q['question_id']}")) + "\n"
                            for n in range(6) for q in GOOD))
    base = ["run_mindformer.py", "--config", files["yaml"], "--run_mode", "eval", "--load_checkpoint", files["ckpt"],
            "--question_file", str(many), "--image_folder", files["images"], "--output_dir", str(tmp_path / "out"),
            "--max_new_tokens", "40", "--max_batch", "1", "--answers_file"]
    env = dict(os.environ, GLOG_v="3")
    whole = tmp_path / "whole.jsonl"
    proc = subprocess.run([sys.executable, *base, str(whole)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = tmp_path / "cut.jsonl"
    proc = subprocess.Popen([sys.executable, *base, str(cut)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if cut.exists() and cut.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    kept = cut.read_bytes()
    assert "new answer(s) written" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert 2 <= kept.count(b"\n") < len(GOOD) * 6 and kept.endswith(b"\n")
    proc = subprocess.run([sys.executable, *base, str(cut)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "resuming:" in proc.stderr, proc.stderr[-3000:]
    assert cut.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_one_row_at_a_time_gives_the_same_answers(files, one_run, tmp_path):
    answers, _ = one_run
    single = str(tmp_path / "single.jsonl")
    proc = run_eval(files, single, "--max_batch", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(answers, "rb") as a, open(single, "rb") as b:
        assert a.read() == b.read()


def test_llava_hf_chat_template(files, tiny_hf_dir, tmp_path):
    from oracle import HFChat
    chat = HFChat(tiny_hf_dir)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(GOOD[1]) + "\n" + json.dumps(GOOD[3]) + "\n")
    out = str(tmp_path / "a.jsonl")
    proc = run_eval(files, out, "--conv_mode", "llava_hf", "--prompt_suffix", "Answer briefly.",
                    questions=str(q))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = records(out)
    # the suffix goes on a line of its own, and the prompt field holds the question as asked
    assert [r["prompt"] for r in got] == [GOOD[1]["text"] + "\nAnswer briefly.", GOOD[3]["text"] + "\nAnswer briefly."]
    image = os.path.join(files["images"], "coffee.jpg")
    expected = [chat.answer([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                          text_part(got[0]["prompt"])]}], [image], MAX_NEW)[1],
                chat.answer([{"role": "user", "content": [text_part(got[1]["prompt"])]}], [], MAX_NEW)[1]]
    assert [r["text"] for r in got] == [t.strip() for t in expected]


@pytest.mark.parametrize("flags,needle", [
    (["--question_file", "/nonexistent/q.jsonl"], "no such file"),
    (["--image_folder", "/nonexistent/images"], "no such folder"),
])
def test_bad_flags_fail_before_loading(files, tmp_path, flags, needle):
    args = ["run_mindformer.py", "--config", files["yaml"], "--run_mode", "eval", "--load_checkpoint", files["ckpt"],
            "--question_file", files["questions"], "--image_folder", files["images"],
            "--answers_file", str(tmp_path / "a.jsonl"), "--output_dir", str(tmp_path / "out")]
    for flag, value in zip(flags[::2], flags[1::2]):
        args[args.index(flag) + 1] = value
    proc = run_cli(args)
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "a.jsonl")


@pytest.mark.slow
def test_tensor_parallel_equals_one_process(files, one_run, tmp_path):
    """Two ranks under scripts/msrun_launcher.sh: rank 0 writes the same file as one process."""
    import subprocess
    from helpers import PLUGIN, RUN, free_port
    answers, _ = one_run
    with open(files["yaml"]) as f:
        text = f.read()
    tp_yaml = tmp_path / "tp.yaml"
    tp_yaml.write_text(text.replace("model_parallel: 1", "model_parallel: 2"))
    out = str(tmp_path / "tp.jsonl")
    order = (f"{RUN} --config {tp_yaml} --register_path {PLUGIN} --run_mode eval --load_checkpoint {files['ckpt']} "
             f"--use_parallel True --auto_trans_ckpt True --output_dir {tmp_path / 'out'} "
             f"--question_file {files['questions']} --image_folder {files['images']} --answers_file {out} "
             f"--max_new_tokens {MAX_NEW} --max_batch 4")
    proc = subprocess.run(launcher_argv(order, 2, free_port(), str(tmp_path / "log"), 300), cwd=ROOT,
                          env=dict(os.environ, GLOG_v="3"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(answers, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
