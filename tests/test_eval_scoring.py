"""[T] The benchmark scorers (research/llava/eval_scoring.py, scripts/eval/): hand-written answer files whose
scores are worked out here by hand from each benchmark's published definition (the arithmetic is in the
comments). No model runs."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
import eval_scoring as es
from llava_errors import LlavaError

SCORE = os.path.join(ROOT, "scripts", "eval", "score.py")
CONVERT = os.path.join(ROOT, "scripts", "eval", "convert.py")


def jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def answer(qid, text, prompt="q"):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def cli(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------- POPE
def test_pope_answer_parsing():
    # LLaVA's rule: first sentence, commas dropped, a word "No"/"no"/"not" -> no, anything else -> yes
    assert es.pope_label("Yes, there is a dog.") == "yes"
    assert es.pope_label("No.") == "no"
    assert es.pope_label("There is not a cat in the image.") == "no"
    assert es.pope_label("Yes. There is no cat.") == "yes"        # only the first sentence counts
    assert es.pope_label("no, it isn't") == "no"                  # "no," -> "no"
    assert es.pope_label("Nope, nothing there") == "yes"          # "Nope" is not the word "no"
    assert es.pope_label("NO") == "yes"                           # case matters in LLaVA's rule


@pytest.fixture
def pope_files(tmp_path):
    ann = tmp_path / "coco"
    ann.mkdir()
    questions = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "category": "random"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "category": "random"},
        {"question_id": 3, "image": "b.jpg", "text": "Is there a cup?", "category": "random"},
        {"question_id": 4, "image": "b.jpg", "text": "Is there a car?", "category": "random"},
        {"question_id": 5, "image": "c.jpg", "text": "Is there a bus?", "category": "popular"},
        {"question_id": 6, "image": "c.jpg", "text": "Is there a man?", "category": "popular"},
        {"question_id": 7, "image": "d.jpg", "text": "Is there a hat?", "category": "popular"},
        {"question_id": 8, "image": "d.jpg", "text": "Is there a pen?", "category": "popular"},
    ]
    qfile = jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    jsonl(ann / "coco_pope_random.json", [{"question_id": i, "image": img, "label": lab} for i, img, lab in
                                          [(1, "a.jpg", "yes"), (2, "a.jpg", "no"), (3, "b.jpg", "yes"),
                                           (4, "b.jpg", "no")]])
    jsonl(ann / "coco_pope_popular.json", [{"question_id": i, "image": img, "label": lab} for i, img, lab in
                                           [(1, "c.jpg", "no"), (2, "c.jpg", "yes"), (3, "d.jpg", "yes"),
                                            (4, "d.jpg", "yes")]])
    # written out of order (a resumed run's file), question 8 unanswered
    answers = jsonl(tmp_path / "answers.jsonl", [
        answer(7, "Yes"), answer(3, "No."), answer(1, "Yes, there is a dog."),
        answer(2, "There is not a cat in the image."), answer(4, "Yes. There is no car."),
        answer(5, "Nope, nothing there"), answer(6, "no, it isn't")])
    return answers, qfile, str(ann)


def test_pope_per_split(pope_files):
    result = es.score_pope(*pope_files)
    # random: labels yes no yes no, predictions yes no no yes -> TP 1 (q1) TN 1 (q2) FN 1 (q3) FP 1 (q4)
    r = result["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1)
    assert r["accuracy"] == 2 / 4 and r["precision"] == 1 / 2 and r["recall"] == 1 / 2
    assert r["f1"] == pytest.approx(2 * 0.5 * 0.5 / (0.5 + 0.5)) and r["yes_ratio"] == 2 / 4
    assert (r["answered"], r["questions"]) == (4, 4)
    # popular: labels no yes yes (q8's "yes" unanswered), predictions yes no yes
    #   -> FP 1 (q5) FN 1 (q6) TP 1 (q7): accuracy 1/3, precision 1/2, recall 1/2, F1 1/2, yes-ratio 2/3
    p = result["popular"]
    assert (p["tp"], p["fp"], p["tn"], p["fn"]) == (1, 1, 0, 1)
    assert p["accuracy"] == pytest.approx(1 / 3) and p["precision"] == 0.5 and p["recall"] == 0.5
    assert p["f1"] == pytest.approx(0.5) and p["yes_ratio"] == pytest.approx(2 / 3)
    assert (p["answered"], p["questions"]) == (3, 4)


def test_pope_cli_and_bad_files(pope_files, tmp_path):
    answers, qfile, ann = pope_files
    proc = cli(SCORE, "pope", "--answers", answers, "--question_file", qfile, "--annotation_dir", ann, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["random"]["accuracy"] == 0.5
    table = cli(SCORE, "pope", "--answers", answers, "--question_file", qfile, "--annotation_dir", ann).stdout
    assert "mean F1 over the splits: 50.00" in table
    # a label file that belongs to other questions (its images differ)
    jsonl(os.path.join(ann, "coco_pope_random.json"), [{"question_id": i, "image": "z.jpg", "label": "yes"}
                                                       for i in range(1, 5)])
    proc = cli(SCORE, "pope", "--answers", answers, "--question_file", qfile, "--annotation_dir", ann)
    assert proc.returncode == 2 and "do not belong together" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    twice = jsonl(tmp_path / "twice.jsonl", [answer(1, "Yes"), answer(1, "No")])
    with pytest.raises(LlavaError, match="answered twice"):
        es.score_pope(twice, qfile, ann)
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(answer(1, "Yes")) + "\n" + '{"question_id": 2, "te')
    with pytest.raises(LlavaError, match="line 2 is not JSON"):
        es.score_pope(str(torn), qfile, ann)


# ---------------------------------------------------------------------------------------------- ScienceQA
def test_sqa_letter_parsing():
    assert es.sqa_letter("A") == "A"
    assert es.sqa_letter("B. Because plants need light.") == "B"
    assert es.sqa_letter("I think so. The answer is C.") == "C"
    assert es.sqa_letter("The answer is A. The answer is B.") == "FAILED"     # two: ambiguous
    assert es.sqa_letter("A.") == "FAILED"                                    # neither rule applies
    assert es.sqa_letter("a") == "FAILED"


def test_sqa_accuracy_and_img_subset(tmp_path):
    base = tmp_path / "scienceqa"
    base.mkdir()
    problems = {
        "1": {"choices": ["x", "y", "z"], "answer": 0, "image": "image.png"},
        "2": {"choices": ["x", "y"], "answer": 1, "image": None},
        "3": {"choices": ["w", "x", "y", "z"], "answer": 3, "image": "image.png"},
        "4": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "5": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "6": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
    }
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "6"], "val": ["5"]}))
    answers = jsonl(tmp_path / "a.jsonl", [
        answer("1", "A"),                              # A = choice 0 = answer: right
        answer("2", "B. y is right"),                  # B = choice 1 = answer: right
        answer("3", "The answer is C."),               # C = 2, answer 3: wrong
        answer("4", "E"),                              # E is not among its 2 choices: wrong
        answer("5", "A"),                              # the val split: not counted
    ])                                                 # 6: no answer -> wrong
    r = es.score_sqa(answers, str(base))
    # all: right 1, 2 of 1, 2, 3, 4, 6 -> 2/5 = 40 %; IMG (1, 3, 4, 6): right 1 -> 1/4 = 25 %
    assert (r["correct"], r["count"], r["accuracy"]) == (2, 5, 40.0)
    assert (r["img_correct"], r["img_count"], r["img_accuracy"]) == (1, 4, 25.0)
    assert r["missing"] == 1
    proc = cli(SCORE, "sqa", "--answers", answers, "--base_dir", str(base))
    assert proc.returncode == 0 and "accuracy 40.00% (2/5), IMG accuracy 25.00% (1/4)" in proc.stdout


def test_sqa_question_conversion(tmp_path):
    src = tmp_path / "llava_test_CQM-A.json"
    src.write_text(json.dumps([
        {"id": "7", "image": "7/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: a map.\nWhich is north?\nOptions: (A) up (B) down"},
            {"from": "gpt", "value": "A"}]},
        {"id": "8", "conversations": [{"from": "human", "value": "Which is a fruit?\nOptions: (A) apple (B) rock"},
                                      {"from": "gpt", "value": "A"}]}]))
    out = tmp_path / "q.jsonl"
    proc = cli(CONVERT, "sqa_questions", "--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"question_id": "7", "text": "Context: a map.\nWhich is north?\nOptions: (A) up (B) down",
         "image": "7/image.png"},
        {"question_id": "8", "text": "Which is a fruit?\nOptions: (A) apple (B) rock"}]


# ---------------------------------------------------------------------------------------------- MME
def test_mme_answer_parsing():
    assert es.mme_label("Yes") == "yes" and es.mme_label("no") == "no"
    assert es.mme_label("Yes there are") == "yes"     # "yes " in the first 4 characters
    assert es.mme_label("Nope") == "no"               # "nope" holds "no"
    assert es.mme_label("I think yes") == "other"     # "i th"


def test_mme_scores(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "count").mkdir(parents=True)
    (root / "count" / "000001.txt").write_text(
        "Is there one dog in the image? Please answer yes or no.\tYes\n"
        "Are there two dogs in the image? Please answer yes or no.\tNo\n")
    (root / "count" / "000002.txt").write_text(
        "Are there three cups?  Please answer yes or no.\tYes\n"          # the release's double space
        "Are there four cups? Please answer yes or no.\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by X? Please answer yes or no.\tNo\n"
        "Is this artwork created by Y? Please answer yes or no.\tYes\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text(
        "Does the code print 3? Please answer yes or no.\tYes\nDoes the code print 4? Please answer yes or no.\tNo\n")
    answers = jsonl(tmp_path / "a.jsonl", [
        answer("count/000001.jpg", "Yes", "Is there one dog in the image? Please answer yes or no."),
        answer("count/000001.jpg", "No, there is one.", "Are there two dogs in the image? Please answer yes or no."),
        answer("count/000002.jpg", "Yes there are", "Are there three cups? Please answer yes or no."),
        answer("count/000002.jpg", "I think yes", "Are there four cups? Please answer yes or no."),
        # LLaVA's short-answer instruction instead of MME's yes/no one: the same question
        answer("artwork/10002.jpg", "No", "Is this artwork created by X?\nAnswer the question using a single word "
               "or phrase."),
        answer("code_reasoning/0020.png", "yes", "Does the code print 3? Please answer yes or no."),
        answer("code_reasoning/0020.png", "no", "Does the code print 4? Please answer yes or no."),
    ])
    r = es.score_mme(answers, str(root))
    count, art, code = r["tasks"]["count"], r["tasks"]["artwork"], r["tasks"]["code_reasoning"]
    # count: right yes, no, yes; "I think yes" is other -> acc 3/4; image 1 both right, image 2 not -> acc+ 1/2
    #        score 100 * (0.75 + 0.5) = 125
    assert (count["acc"], count["acc_plus"], count["score"], count["other"]) == (0.75, 0.5, 125.0, 1)
    # artwork: one of two right, the second unanswered -> acc 1/2, acc+ 0 -> 50
    assert (art["acc"], art["acc_plus"], art["score"], art["missing"]) == (0.5, 0.0, 50.0, 1)
    # code_reasoning: both right -> 100 * (1 + 1) = 200
    assert code["score"] == 200.0
    # perception = count + artwork = 175; cognition = code_reasoning = 200
    assert r["Perception"] == 175.0 and r["Cognition"] == 200.0
    stray = jsonl(tmp_path / "s.jsonl", [answer("count/000001.jpg", "Yes", "Is there a cat?")])
    proc = cli(SCORE, "mme", "--answers", stray, "--mme_folder", str(root))
    assert proc.returncode == 2 and "not in the MME ground truth" in proc.stderr


# ---------------------------------------------------------------------------------------------- TextVQA
def test_vqa_normalisation():
    assert es.vqa_normalize("Two dogs!") == "2 dogs"          # "!" -> space, number word -> digit
    assert es.vqa_normalize("isnt") == "isn't"                # contraction restored
    assert es.vqa_normalize("1,000") == "1000"                # "," dropped first
    assert es.vqa_normalize("3.5") == "3.5"                   # a period before a digit stays
    assert es.vqa_normalize("Nike.") == "nike"
    assert es.vqa_normalize("a man's hat") == "man 's hat"    # article dropped, "'s" split off
    assert es.vqa_normalize("the stop") == "stop"


def test_textvqa_accuracy(tmp_path):
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["Nike"] * 3 + ["nike shoes"] * 2 +
         ["adidas"] * 5},
        {"image_id": "img1", "question": "What number is shown?", "answers": ["two", "2"] + ["three"] * 8},
        {"image_id": "img2", "question": "what does it say?", "answers": ["stop"] * 10},
        {"image_id": "img3", "question": "what time is it?", "answers": ["10:30"] * 10}]}))
    short = "\nAnswer the question using a single word or phrase."
    answers = jsonl(tmp_path / "a.jsonl", [
        answer("img1", "Nike.", "What brand is this?" + short),
        answer("img1", "2", "What number is shown?" + short),
        answer("img2", "the stop", "what does it say?\nReference OCR token: STOP, sign" + short),
        answer("img3", "ten thirty", "what time is it?" + short)])
    r = es.score_textvqa(answers, str(ann))
    # "nike": 3 humans match. Leaving out one of those 3: 2 matches -> 2/3; leaving out one of the other 7:
    #   3 -> 1.  (3 * 2/3 + 7 * 1) / 10 = 0.9
    # "2": "two" and "2" match (2 humans). Out one of them: 1 -> 1/3; out another: 2 -> 2/3.
    #   (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # "stop": all 10 match -> 1.0;  "10 thirty" matches nobody -> 0
    # mean (0.9 + 0.6 + 1.0 + 0) / 4 = 0.625
    assert r["n"] == 4 and r["accuracy"] == pytest.approx(62.5)
    assert es.vqa_accuracy("Nike.", ["Nike"] * 3 + ["x"] * 7) == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------- GQA, VQAv2
def test_gqa_and_vqav2_submissions(tmp_path):
    answers = jsonl(tmp_path / "a.jsonl", [answer("q1", "Yes."), answer("q2", "Red..."), answer("q3", "Two.")])
    out = tmp_path / "gqa.json"
    proc = cli(CONVERT, "gqa", "--answers", answers, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    # lower case, trailing periods stripped
    assert json.loads(out.read_text()) == [{"questionId": "q1", "prediction": "yes"},
                                           {"questionId": "q2", "prediction": "red"},
                                           {"questionId": "q3", "prediction": "two"}]
    split = jsonl(tmp_path / "test2015.jsonl", [{"question_id": "q3"}, {"question_id": "q9"}, {"question_id": "q1"}])
    out = tmp_path / "vqav2.json"
    proc = cli(CONVERT, "vqav2", "--answers", answers, "--question_file", split, "--output", str(out))
    assert proc.returncode == 0 and "1 without an answer" in proc.stderr
    # every question of the split in its order, VQA-normalised ("Two." -> "2"), "" when unanswered
    assert json.loads(out.read_text()) == [{"question_id": "q3", "answer": "2"}, {"question_id": "q9", "answer": ""},
                                           {"question_id": "q1", "answer": "yes"}]
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
