"""`--run_mode eval`: answer a benchmark's question file the way LLaVA's own evaluation does, into LLaVA's
answers file.

    run_mindformer.py --config Y --run_mode eval --load_checkpoint C --question_file Q.jsonl \
        --image_folder DIR --answers_file A.jsonl [--prompt_suffix TEXT] [--conv_mode vicuna_v1|llava_hf] \
        [--max_new_tokens 128] [--max_batch 8]

* Questions: LLaVA's records, one JSON object per line: `question_id`, `image` (relative to --image_folder;
  absent: a text-only question), `text`, optional `category`. --prompt_suffix is added to every question on a
  line of its own (LLaVA's ScienceQA run adds "Answer with the option's letter from the given choices
  directly." so).
* Prompt: `vicuna_v1` (LLaVA-1.5's evaluation, the default): the system sentence of LLaVA's conv_vicuna_v1, a
  space, `USER: <image>\\n{text} ASSISTANT:`; `llava_hf`: llava-hf's chat template (the chat mode's).
  Greedy decoding and at most 128 new tokens unless the flags say otherwise (LLaVA's model_vqa_loader).
* Answers: one `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` line per question
  (LLaVA's fields; `prompt` is the question as asked, `text` the answer stripped), appended as a whole line
  and flushed as soon as it is known, in question order. `answer_id` is a digest of the record's content, so
  the same run gives the same file.
* Resume: questions already in the answers file (same question_id and prompt) are skipped; an incomplete last
  line (a run killed mid-write) is cut off first. A question is identified by its id *and* its text, because
  LLaVA's MME and TextVQA files give the two questions about an image the same id.
* Bad records (not JSON, no question_id/text, the same id and text twice, an image missing or unreadable, a
  prompt too long for the context) are reported on stderr, one line each, and skipped; the run goes on.
* The questions run through the server's scheduler (serving.Scheduler): up to --max_batch rows at once, rows
  joining as others finish, prompts about the same image sharing its cached keys/values. Under
  msrun_launcher.sh tensor parallelism rank 0 reads, plans and writes; the other ranks follow its steps.
"""
import hashlib
import json
import os
import queue
import sys
import time

from llava_errors import LlavaError

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CONV_MODES = ("vicuna_v1", "llava_hf")
# LLaVA's model_vqa_loader: --max_new_tokens 128, --temperature 0.
DEFAULT_MAX_NEW_TOKENS = 128
IMAGE_TAG = "<image>"


def vicuna_v1_prompt(text, has_image):
    """LLaVA's conv_vicuna_v1 with one user turn and the assistant's turn open (SeparatorStyle.TWO)."""
    body = f"{IMAGE_TAG}\n{text}" if has_image else text
    return f"{VICUNA_V1_SYSTEM} USER: {body} ASSISTANT:"


# ---------------------------------------------------------------------------------------------- files
class Question:
    def __init__(self, line, qid, text, image, prompt):
        self.line, self.qid, self.text, self.image, self.prompt = line, qid, text, image, prompt

    @property
    def key(self):
        return key_of(self.qid, self.prompt)


def key_of(qid, prompt):
    # 1 and "1" are different ids in JSON: keep the type in the key
    return json.dumps(qid), prompt


def read_questions(path, suffix, report):
    """The question file's usable records, in order; `report(message)` for each bad line."""
    out, seen = [], set()
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as e:
        raise LlavaError(f"--question_file {path}: {e.strerror or e}") from None
    with f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise LlavaError(f"--question_file {path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{os.path.basename(path)} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            report(f"{where}: not JSON ({e.msg}): skipped")
            continue
        if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
            report(f"{where}: a question needs 'question_id' and a 'text' string: skipped")
            continue
        qid, image = record["question_id"], record.get("image")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            report(f"{where}: question_id must be a string or an integer, got {json.dumps(qid)[:60]}: skipped")
            continue
        if image is not None and (not isinstance(image, str) or not image):
            report(f"{where}: question {qid!r}: 'image' must be a file name: skipped")
            continue
        prompt = record["text"] + (f"\n{suffix}" if suffix else "")
        q = Question(n, qid, record["text"], image, prompt)
        if q.key in seen:
            report(f"{where}: question {qid!r} repeats an earlier question (same id and text): skipped")
            continue
        seen.add(q.key)
        out.append(q)
    return out


def answered(path, report):
    """The keys of the answers already in the answers file; an incomplete last line (no newline: a write cut
    short) is removed from the file first, so that appended records start on a line of their own."""
    if not os.path.exists(path):
        return set()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                data = data[:keep]
                report(f"{os.path.basename(path)}: its last line was incomplete (a run stopped mid-write): removed")
    except OSError as e:
        raise LlavaError(f"--answers_file {path}: {e.strerror or e}") from None
    done = set()
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(key_of(record["question_id"], record["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlavaError(f"--answers_file {path}: line {n} is not an answer record: not this run's file?") from None
    return done


class AnswersFile:
    """Appends whole records: each is one write of one line on an O_APPEND descriptor; a write the disk
    cannot take is undone (the file cut back to where it was) and reported."""

    def __init__(self, path):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise LlavaError(f"--answers_file {path}: {e.strerror or e}") from None
        self.written = 0

    def append(self, record):
        data = (json.dumps(record) + "\n").encode("utf-8")
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            os.ftruncate(self.fd, start)
            raise LlavaError(f"--answers_file {self.path}: {e.strerror or e} after {self.written} new answer(s); "
                             f"they are kept: run again to resume") from None
        self.written += 1

    def close(self):
        os.close(self.fd)


def answer_record(q, text, model_id):
    """LLaVA's answer record. LLaVA's answer_id is a random shortuuid; here it is a digest of the record, so
    that an interrupted and resumed run writes the same file as one run."""
    digest = hashlib.sha256(json.dumps([model_id, q.qid, q.prompt, text]).encode("utf-8")).hexdigest()[:22]
    return {"question_id": q.qid, "prompt": q.prompt, "text": text, "answer_id": digest, "model_id": model_id,
            "metadata": {}}


# ---------------------------------------------------------------------------------------------- the run
def check_args(args):
    """The eval flags, before anything loads."""
    for flag in ("question_file", "answers_file"):
        if not getattr(args, flag, None):
            raise LlavaError(f"--run_mode eval needs --{flag}")
    if not os.path.isfile(args.question_file):
        raise LlavaError(f"--question_file {args.question_file}: no such file")
    if args.image_folder and not os.path.isdir(args.image_folder):
        raise LlavaError(f"--image_folder {args.image_folder}: no such folder")
    if args.max_batch < 1:
        raise LlavaError(f"--max_batch must be >= 1, got {args.max_batch}")
    if os.path.isdir(args.answers_file):
        raise LlavaError(f"--answers_file {args.answers_file}: is a folder")
    # LLaVA's defaults: greedy, 128 new tokens (the yaml's generation defaults are the chat's)
    if args.max_new_tokens is None and args.max_decode_length is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if args.do_sample is None:
        args.do_sample = False


def say(message):
    print(message, file=sys.stderr, flush=True)


class Runner:
    """Rank 0's loop: questions in, in question order; at most `window` submitted and not yet written, so
    that the next prompt is ready when a row frees and memory stays bounded."""

    def __init__(self, job, scheduler, questions, out, conv_mode, image_folder, model_id, progress):
        self.job, self.scheduler, self.out = job, scheduler, out
        self.questions, self.conv_mode, self.image_folder, self.model_id = questions, conv_mode, image_folder, model_id
        self.progress = progress
        self.window = 2 * scheduler.max_batch
        self.events = queue.Queue()
        self.results = {}        # index -> answer text, or None for a question that failed
        self.texts = {}
        self.next_write = 0
        self.bad = 0

    def encode(self, q):
        """(prompt ids with the image tokens expanded, pixel values or None) for a question; LlavaError for a
        missing or unreadable image."""
        p = self.job.processor
        pixels = None
        if q.image is not None:
            path = os.path.join(self.image_folder or "", q.image)
            if not os.path.isfile(path):
                raise LlavaError(f"image {q.image} not found in {self.image_folder or 'the current folder'}")
            pixels = p.pixels([p.load_image(path)], names=[q.image])
        n = 0 if pixels is None else 1
        if self.conv_mode == "llava_hf":
            content = [{"type": "image"}] * n + [{"type": "text", "text": q.prompt}]
            ids = p.encode_chat([{"role": "user", "content": content}])
        else:
            ids = p.tokenizer(vicuna_v1_prompt(q.prompt, n == 1))["input_ids"]
            ids = p.expand_images(ids, n, lambda tags: f"the question holds {tags - n} {IMAGE_TAG} tag(s) of its own")
        return ids, pixels

    def submit(self, i):
        from serving import Request
        q = self.questions[i]
        try:
            ids, pixels = self.encode(q)
            self.texts[i] = []
            self.scheduler.submit(Request(ids=ids, pixel_values=pixels, settings=self.job.settings,
                                          emit=lambda event, i=i: self.events.put((i, event))))
        except LlavaError as e:
            self.fail(i, str(e))

    def fail(self, i, message):
        q = self.questions[i]
        # through tqdm: the line goes above the progress bar instead of being glued to it
        self.progress.write(f"[question {q.qid!r} (line {q.line}): {message}: skipped]", file=sys.stderr)
        self.bad += 1
        self.results[i] = None
        self.progress.update(1)

    def handle(self, i, event):
        kind = event[0]
        if kind == "delta":
            self.texts[i].append(event[1])
        elif kind == "done":
            self.results[i] = "".join(self.texts.pop(i)).strip()
            self.progress.update(1)
        elif kind == "error":
            self.texts.pop(i, None)
            self.fail(i, event[1])

    def flush(self, everything=False):
        """Write the answers known so far in question order (with `everything`, also those after a gap)."""
        while self.next_write in self.results:
            self._write(self.next_write)
            self.next_write += 1
        if everything:
            for i in sorted(k for k in self.results if k >= self.next_write):
                self._write(i)

    def _write(self, i):
        text = self.results.pop(i)
        if text is not None:
            self.out.append(answer_record(self.questions[i], text, self.model_id))

    def run(self):
        from llava_predict import restore_ctrl_c
        submitted = 0
        stop_on_signals()
        try:
            while True:
                restore_ctrl_c()    # MindSpore's SIGINT handler comes back with the scheduler's graph runs
                while submitted < len(self.questions) and submitted - self.next_write < self.window:
                    self.submit(submitted)
                    submitted += 1
                self.flush()        # also what failed before it was submitted (a missing image)
                if self.next_write >= len(self.questions):
                    return
                # the question at next_write is in the scheduler: an event will come. A timeout, so that
                # Ctrl-C reaches this thread while it waits.
                try:
                    i, event = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(i, event)
                while True:
                    try:
                        self.handle(*self.events.get_nowait())
                    except queue.Empty:
                        break
        except KeyboardInterrupt:
            self.flush(everything=True)      # finished answers are kept, whatever their order
            raise


def model_name(job):
    """The answers' model_id: the checkpoint's name as given (every rank layout of it gives the same)."""
    path = job.args.load_checkpoint or job.data.get("load_checkpoint") or "llava"
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def stop_on_signals():
    """Ctrl-C and SIGTERM both stop the run as a KeyboardInterrupt in the main thread, which writes what is
    finished. MindSpore installs its own SIGINT handler when it runs a graph (the scheduler's thread runs one
    step after another), and that handler ends the process with a SIGTERM: so SIGTERM is caught too, and
    Python's SIGINT handler is put back at every turn of the main loop (restore_ctrl_c)."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, stop)


def run(args, root):
    from llava_predict import Job
    check_args(args)
    job = Job(args, root)
    tp_wanted = bool(getattr(args, "use_parallel", False))
    # Every rank reads the question file (a second's work); rank 0 alone reports and touches the answers
    # file. The launcher names the rank in RANK_ID; the job's tensor-parallel rank decides who leads.
    quiet = os.environ.get("RANK_ID", "0") not in ("", "0")
    bad_lines = []

    def report(message):
        bad_lines.append(message)
        if not quiet:
            say(f"[{message}]")
    # before the model loads: a bad file fails in a second, and what is left to do is known
    questions = read_questions(args.question_file, args.prompt_suffix, report)
    done = set() if quiet else answered(args.answers_file, lambda m: say(f"[{m}]"))
    before = len(questions)
    questions = [q for q in questions if q.key not in done]
    if before > len(questions):
        say(f"[resuming: {before - len(questions)} of {before} questions are already answered in "
            f"{args.answers_file}]")
    if not questions and not tp_wanted:
        say(f"[nothing to do: every question of {args.question_file} is answered in {args.answers_file}]")
        return 0
    from serving import prepare_engine
    from serving import PREFILL_CHUNK, Scheduler
    chunk = args.prefill_chunk or PREFILL_CHUNK
    job.load(batch=args.max_batch, shrink_kv=not tp_wanted)
    prepare_engine(job, args.max_batch, chunk)
    warm_vision(job)
    lock = None
    if job.tp.enabled:
        from lockstep import Lockstep
        vc = job.model_config.vision_config
        lock = Lockstep(job.tp, job.settings, (vc.num_channels, vc.image_size, vc.image_size))
        if not lock.leader:
            lock.follow(job.engine)
            return 0
    out = AnswersFile(args.answers_file)
    scheduler = Scheduler(job.engine, job.tokenizer, max_batch=args.max_batch, max_queue=4 * args.max_batch + 4,
                          lockstep=lock, prefill_chunk=chunk)
    from tqdm import tqdm
    progress = tqdm(total=len(questions), unit="q", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                    desc="eval")
    runner = Runner(job, scheduler, questions, out, args.conv_mode, args.image_folder, model_name(job), progress)
    start = time.monotonic()
    try:
        runner.run()
    except KeyboardInterrupt:
        progress.close()
        raise KeyboardInterrupt(f"{out.written} new answer(s) written to {args.answers_file}; run the same command "
                                f"again to answer the rest") from None
    finally:
        scheduler.close()
        out.close()
    progress.close()
    seconds = time.monotonic() - start
    rate = 60 * len(questions) / seconds if seconds > 0 else 0.0
    skipped = runner.bad + len(bad_lines)
    note = f", {skipped} question record(s) skipped (reported above)" if skipped else ""
    say(f"[{out.written} answers appended to {args.answers_file} in {seconds:.1f} s ({rate:.1f} questions/min, "
        f"up to {args.max_batch} rows at once){note}]")
    return 0


def warm_vision(job):
    """Compile the vision tower for one image now, before the questions: no question waits for it, and the
    scheduler's thread compiles nothing (a compile puts MindSpore's SIGINT handler back)."""
    import numpy as np
    vc = job.model_config.vision_config
    job.engine.image_features(np.zeros((1, vc.num_channels, vc.image_size, vc.image_size), np.float32)).asnumpy()
