"""Scores of LLaVA-1.5 benchmark answer files, each by the benchmark's published rule (pure Python, no model).

An answers file is what `run_mindformer.py --run_mode eval` (or LLaVA's own `model_vqa_loader`) writes: one
JSON record per line, `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`. The ground
truth is the benchmark's own files, as LLaVA's evaluation reads them:

* POPE (`pope`): LLaVA's `llava_pope_test.jsonl` (question_id, image, category) and the annotation folder of
  `coco_pope_{adversarial,popular,random}.json` (one `{"question_id", "image", "text", "label"}` per line).
  An answer is "no" when the words of its first sentence (commas removed) hold "No", "no" or "not", else
  "yes" (LLaVA's eval_pope.py); accuracy, precision, recall, F1 and the yes-ratio per split.
* ScienceQA-IMG (`sqa`): `problems.json` and `pid_splits.json`; the letter is parsed as LLaVA's
  eval_science_qa.py does (the whole answer is a letter, or "X. ...", or one "The answer is X."); accuracy
  over the split and over its questions with an image (the IMG subset the paper reports).
* MME (`mme`): the `MME_Benchmark_release_version` folder (per subtask: images and `question<TAB>answer`
  txt files); per subtask accuracy (questions) and accuracy+ (images whose two questions are both right),
  score = 100 * (acc + acc+), perception = the sum of its 10 subtasks, cognition of its 4 (MME's
  calculation.py; an answer is yes/no when it is, else by the first 4 characters).
* TextVQA (`textvqa`): `TextVQA_0.5.1_val.json`; the standard VQA accuracy: the answer and the 10 human
  answers normalised like the EvalAI/VQA evaluator, min(1, matches / 3) averaged over the 10 leave-one-out
  subsets of the human answers (LLaVA's m4c_evaluator.py).
* GQA and VQAv2 have no public test answers: `gqa_submission` / `vqav2_submission` write the files their
  evaluators take (LLaVA's convert_gqa_for_eval.py, convert_vqav2_for_submission.py).

Answers are matched to the ground truth by question id, as LLaVA does; MME and TextVQA reuse an id (the
image) for several questions, so there the question text is part of the match. Bad or inconsistent files are
a LlavaError naming the file and line.
"""
import json
import os
import re
from collections import defaultdict

from llava_errors import LlavaError

# ---------------------------------------------------------------------------------------------- files


def read_jsonl(path, what):
    """The records of a JSON-lines file; blank lines are skipped; LlavaError naming the line otherwise."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlavaError(f"{what} {path}: line {n} is not JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise LlavaError(f"{what} {path}: line {n} is not a JSON object")
                out.append(record)
    except OSError as e:
        raise LlavaError(f"{what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise LlavaError(f"{what} {path}: not UTF-8 text") from None
    return out


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise LlavaError(f"{what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"{what} {path}: not a JSON file ({getattr(e, 'msg', e)})") from None


def _field(record, key, path, what):
    if key not in record:
        raise LlavaError(f"{what} {path}: a record has no '{key}': {json.dumps(record)[:200]}")
    return record[key]


def write_json(path, data):
    """`data` as JSON at `path`, complete or not at all (written to path.tmp-<pid>, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise LlavaError(f"--output {path}: {e.strerror or e}") from None


def answers_by_id(answers, path):
    """question_id -> answer record; a question answered twice is an error (the file mixes two runs)."""
    out = {}
    for a in answers:
        qid = _field(a, "question_id", path, "answers file")
        if qid in out:
            raise LlavaError(f"answers file {path}: question {qid!r} is answered twice")
        out[qid] = a
    return out


# ---------------------------------------------------------------------------------------------- POPE
def pope_label(text):
    """LLaVA's eval_pope.py: the first sentence, commas removed, split on spaces: "no" if a word is "No",
    "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def binary_metrics(predictions, labels):
    """POPE's figures for yes/no predictions against yes/no labels ("yes" is the positive class).
    A ratio whose denominator is 0 is reported as 0.0."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    n = len(pairs)

    def ratio(a, b):
        return a / b if b else 0.0
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": ratio(tp + tn, n),
            "precision": precision, "recall": recall, "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(sum(p == "yes" for p in predictions), n)}


def score_pope(answers_path, question_path, annotation_dir):
    """-> {split: metrics (+ "answered", "questions")} for every coco_pope_<split>.json in annotation_dir.

    LLaVA pairs the k-th answer of a split with the k-th line of its annotation file (the question file
    lists each split in that order); here the k-th *question* of the split is paired with the k-th label,
    so an answers file in any order (a resumed run) scores the same, and the image names are checked."""
    questions = read_jsonl(question_path, "question file")
    answers = answers_by_id(read_jsonl(answers_path, "answers file"), answers_path)
    try:
        files = sorted(f for f in os.listdir(annotation_dir) if f.startswith("coco_pope_") and f.endswith(".json"))
    except OSError as e:
        raise LlavaError(f"annotation folder {annotation_dir}: {e.strerror or e}") from None
    if not files:
        raise LlavaError(f"annotation folder {annotation_dir}: no coco_pope_<split>.json files")
    known = {_field(q, "question_id", question_path, "question file") for q in questions}
    stray = [qid for qid in answers if qid not in known]
    if stray:
        raise LlavaError(f"answers file {answers_path}: {len(stray)} answer(s) to questions not in "
                         f"{question_path} (first: {stray[0]!r}): another benchmark's answers?")
    out = {}
    for name in files:
        split = name[len("coco_pope_"):-len(".json")]
        path = os.path.join(annotation_dir, name)
        labels = read_jsonl(path, "POPE annotation")
        mine = [q for q in questions if q.get("category") == split]
        if len(mine) != len(labels):
            raise LlavaError(f"{path} has {len(labels)} labels but {question_path} has {len(mine)} "
                             f"'{split}' questions")
        preds, truth = [], []
        for q, label in zip(mine, labels):
            if "image" in label and "image" in q and os.path.basename(label["image"]) != os.path.basename(q["image"]):
                raise LlavaError(f"{path}: label {len(truth) + 1} is about {label['image']} but question "
                                 f"{q['question_id']!r} of {question_path} about {q['image']}: the files do not "
                                 f"belong together")
            value = str(_field(label, "label", path, "POPE annotation")).strip().lower()
            if q["question_id"] in answers:
                preds.append(pope_label(str(answers[q["question_id"]].get("text", ""))))
                truth.append("no" if value == "no" else "yes")
        out[split] = dict(binary_metrics(preds, truth), answered=len(preds), questions=len(mine))
    return out


# ---------------------------------------------------------------------------------------------- ScienceQA
SQA_OPTIONS = ["A", "B", "C", "D", "E"]
_SQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text):
    """LLaVA's eval_science_qa.py: the answer is a bare option letter, or starts "X. ", or contains exactly
    one "The answer is X." -> the letter, else "FAILED"."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_SENTENCE.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(answers_path, base_dir, split="test"):
    """-> accuracy over the split's problems and over those with an image (IMG), in percent, with counts.
    A problem without an answer counts as wrong, as in LLaVA's scorer."""
    splits = read_json(os.path.join(base_dir, "pid_splits.json"), "ScienceQA")
    problems = read_json(os.path.join(base_dir, "problems.json"), "ScienceQA")
    if split not in splits:
        raise LlavaError(f"{base_dir}/pid_splits.json has no split {split!r} (it has {', '.join(sorted(splits))})")
    answers = {str(k): v for k, v in answers_by_id(read_jsonl(answers_path, "answers file"), answers_path).items()}
    correct = total = img_correct = img_total = missing = 0
    for pid in splits[split]:
        prob = problems.get(str(pid))
        if prob is None:
            raise LlavaError(f"{base_dir}/problems.json has no problem {pid!r} of split {split!r}")
        if str(pid) in answers:
            letter = sqa_letter(str(answers[str(pid)].get("text", "")))
        else:
            letter, missing = "FAILED", missing + 1
        choice = SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:len(prob["choices"])] else -1
        right = choice == prob["answer"]
        total += 1
        correct += right
        if prob.get("image"):
            img_total += 1
            img_correct += right
    return {"accuracy": 100.0 * correct / total if total else 0.0, "correct": correct, "count": total,
            "img_accuracy": 100.0 * img_correct / img_total if img_total else 0.0, "img_correct": img_correct,
            "img_count": img_total, "missing": missing}


def sqa_questions(llava_json_path):
    """LLaVA's ScienceQA question file (llava_test_CQM-A.json: [{"id", "image"?, "conversations": [human,
    gpt]}]) -> question records for the eval mode: {"question_id", "image"?, "text"} with the `<image>` tag
    removed (the eval mode's prompt puts it in front, as LLaVA's model_vqa_science does)."""
    data = read_json(llava_json_path, "ScienceQA question file")
    if not isinstance(data, list):
        raise LlavaError(f"ScienceQA question file {llava_json_path}: expected a JSON list of questions")
    out = []
    for item in data:
        try:
            text = item["conversations"][0]["value"]
            record = {"question_id": item["id"], "text": text.replace("<image>", "").strip()}
        except (KeyError, IndexError, TypeError):
            raise LlavaError(f"ScienceQA question file {llava_json_path}: an item without id or conversations: "
                             f"{json.dumps(item)[:200]}") from None
        if item.get("image"):
            record["image"] = item["image"]
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------- MME
MME_TASKS = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def mme_label(text):
    """MME's calculation.py: "yes"/"no" when the lower-cased answer is that, else "yes" or "no" when its
    first 4 characters contain it (yes first), else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _mme_question(text):
    """The question as MME's ground truth spells it: LLaVA's short-answer instruction dropped, the yes/no one
    present, whitespace runs as one space (the release has a few double spaces)."""
    text = " ".join(text.replace(_SHORT_ANSWER, "").split())
    return text if _YES_NO in text else f"{text} {_YES_NO}"


def mme_ground_truth(folder):
    """{(subtask, image stem): {question: "yes"|"no"}} from MME_Benchmark_release_version: per subtask folder,
    either images/ + questions_answers_YN/ or the images and their txt files side by side."""
    gt = defaultdict(dict)
    try:
        tasks = sorted(os.listdir(folder))
    except OSError as e:
        raise LlavaError(f"MME folder {folder}: {e.strerror or e}") from None
    for task in tasks:
        base = os.path.join(folder, task)
        if not os.path.isdir(base):
            continue
        qa = os.path.join(base, "questions_answers_YN") if os.path.isdir(os.path.join(base, "images")) else base
        for name in sorted(os.listdir(qa)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(qa, name), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    question, tab, answer = line.rstrip("\n").rpartition("\t")
                    if not tab or answer.strip().lower() not in ("yes", "no"):
                        raise LlavaError(f"MME ground truth {os.path.join(qa, name)}: line {n} is not "
                                         f"'question<TAB>yes|no'")
                    gt[(task, name[:-4])][_mme_question(question)] = answer.strip().lower()
    if not gt:
        raise LlavaError(f"MME folder {folder}: no subtask folders with question txt files")
    return gt


def score_mme(answers_path, mme_folder):
    """-> {"tasks": {subtask: {acc, acc_plus, score, questions, images, other, missing}}, "Perception": total,
    "Cognition": total}. An answer's subtask is the first part of its question_id ("count/000000.jpg", as in
    LLaVA's llava_mme.jsonl), its image the last; its prompt is the question. A question of the ground truth
    without an answer counts as wrong (MME scores the whole benchmark)."""
    gt = mme_ground_truth(mme_folder)
    answers = read_jsonl(answers_path, "answers file")
    pred = {}
    for a in answers:
        qid = str(_field(a, "question_id", answers_path, "answers file"))
        task, stem = qid.split("/")[0], os.path.splitext(qid.split("/")[-1])[0]
        question = _mme_question(str(_field(a, "prompt", answers_path, "answers file")))
        if question not in gt.get((task, stem), {}):
            raise LlavaError(f"answers file {answers_path}: question {qid!r} {question!r} is not in the MME "
                             f"ground truth of {mme_folder}")
        if (task, stem, question) in pred:
            raise LlavaError(f"answers file {answers_path}: question {qid!r} {question!r} is answered twice")
        pred[(task, stem, question)] = mme_label(str(a.get("text", "")))
    tasks = {}
    for (task, stem), questions in sorted(gt.items()):
        t = tasks.setdefault(task, {"questions": 0, "correct": 0, "images": 0, "both": 0, "other": 0, "missing": 0})
        right = 0
        for question, truth in questions.items():
            p = pred.get((task, stem, question))
            t["missing"] += p is None
            t["other"] += p == "other"
            right += p == truth
        t["questions"] += len(questions)
        t["correct"] += right
        t["images"] += 1
        t["both"] += right == len(questions)
    for t in tasks.values():
        t["acc"] = t["correct"] / t["questions"]
        t["acc_plus"] = t["both"] / t["images"]
        t["score"] = 100.0 * (t["acc"] + t["acc_plus"])
    out = {"tasks": tasks}
    for kind, names in MME_TASKS.items():
        out[kind] = sum(tasks[n]["score"] for n in names if n in tasks)
    return out


# ---------------------------------------------------------------------------------------------- VQA answers
# The EvalAI / official VQA evaluator's answer normalisation (as LLaVA's m4c_evaluator.py copies it).
_CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
    "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
    "somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll "
    "thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's "
    "theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
    "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll "
    "whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've "
    "whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll "
    "whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
    "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've "
    "y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
    "youre=you're youve=you've").split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
# The evaluator's period rule as written: its "(?!<=\d)" is a look-ahead (a typo for the look-behind
# "(?<!\d)"), so every "." not followed by a digit goes; and it passes re.UNICODE (32) where `sub` takes its
# count, so at most 32 of them. Kept: the published scores were computed with it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(answer):
    """An answer as the VQA/EvalAI evaluator compares it: lower case, ',' '?' dropped, "'s" split off,
    punctuation removed (or turned into spaces), periods stripped, number words as digits, articles dropped,
    contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, 32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction, human_answers):
    """The VQA accuracy of one answer: for each human answer left out, min(1, (the other humans giving the
    prediction) / 3), averaged (with 10 humans: 3 matches or more score 1, 2 score 0.6, 1 scores 0.3)."""
    pred = vqa_normalize(prediction)
    humans = [vqa_normalize(a) for a in human_answers]
    if not humans:
        raise LlavaError("a question has no human answers")
    matches = sum(h == pred for h in humans)
    # leaving out a human who gave `pred` leaves matches - 1 others, leaving out another one leaves matches
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def textvqa_question(prompt):
    """The question inside a TextVQA prompt, lower case (LLaVA's eval_textvqa.py prompt_processor): the
    prompt is "question\\nAnswer ..." or carries OCR tokens on a line of their own."""
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match:
            return match.group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise LlavaError(f"a TextVQA prompt LLaVA's scorer cannot read the question from: {prompt[:200]!r}")


def score_textvqa(answers_path, annotation_path):
    """-> {"accuracy" (percent), "n"}: the VQA accuracy of every answer, matched to its annotation by image id
    (LLaVA's question_id) and question text."""
    data = read_json(annotation_path, "TextVQA annotation")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise LlavaError(f"TextVQA annotation {annotation_path}: expected {{\"data\": [...]}}")
    truth = {(a["image_id"], a["question"].lower()): a["answers"] for a in data["data"]}
    scores = []
    for a in read_jsonl(answers_path, "answers file"):
        key = (_field(a, "question_id", answers_path, "answers file"),
               textvqa_question(str(_field(a, "prompt", answers_path, "answers file"))))
        if key not in truth:
            raise LlavaError(f"answers file {answers_path}: question {key[0]!r} {key[1]!r} is not in "
                             f"{annotation_path}")
        scores.append(vqa_accuracy(str(a.get("text", "")), truth[key]))
    return {"accuracy": 100.0 * sum(scores) / len(scores) if scores else 0.0, "n": len(scores)}


# ---------------------------------------------------------------------------------------------- submissions
def gqa_submission(answers_path):
    """GQA's predictions file: [{"questionId", "prediction"}], the answer lower case without trailing periods
    (LLaVA's convert_gqa_for_eval.py)."""
    return [{"questionId": _field(a, "question_id", answers_path, "answers file"),
             "prediction": str(a.get("text", "")).rstrip(".").lower()}
            for a in read_jsonl(answers_path, "answers file")]


def vqav2_submission(answers_path, question_path):
    """VQAv2's upload file: one {"question_id", "answer"} per question of the split's question file, in its
    order, the answer VQA-normalised; a question without an answer gets "" (LLaVA's
    convert_vqav2_for_submission.py). -> (records, number of questions without an answer)."""
    answers = answers_by_id(read_jsonl(answers_path, "answers file"), answers_path)
    out, missing = [], 0
    for q in read_jsonl(question_path, "question file"):
        qid = _field(q, "question_id", question_path, "question file")
        if qid in answers:
            out.append({"question_id": qid, "answer": vqa_normalize(str(answers[qid].get("text", "")))})
        else:
            out.append({"question_id": qid, "answer": ""})
            missing += 1
    return out, missing
