"""`--run_mode chat`: a conversation in the terminal with one loaded model.

Type a message and press Enter; the answer streams. Commands:
  /image PATH_OR_URL   attach an image to your next message (several times for several images)
  /reset               start a new conversation
  /stats               what the caches saved so far (prefix cache: earlier turns' keys/values; image cache)
  /exit                quit (or Ctrl-D)
Ctrl-C stops the answer being written (what was written so far stays in the conversation); at the prompt it
only clears the line. Every turn is rendered with llava-hf's chat template, earlier answers included; the
engine finds the earlier turns' keys/values in its prefix cache and computes only the new turn.
"""
import sys

from generation import TextDeltas
from image_loading import display_name
from llava_errors import LlavaError
from llava_predict import restore_ctrl_c

HELP = "commands: /image PATH_OR_URL, /reset, /stats, /exit (Ctrl-C stops an answer)"


class Conversation:
    """The messages so far and the pixels of their images, in prompt order."""

    def __init__(self):
        self.messages, self.pixels, self.pending = [], [], []

    def reset(self):
        self.__init__()

    def ask(self, text):
        self.messages.append({"role": "user", "content": [{"type": "image"} for _ in self.pending]
                              + [{"type": "text", "text": text}]})
        self.pixels.extend(self.pending)
        self.pending = []

    def answer(self, text):
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})


class Chat:
    def __init__(self, job, out=sys.stdout, err=sys.stderr):
        self.job, self.out, self.err = job, out, err
        self.conversation = Conversation()

    def say(self, message):
        print(message, file=self.err, flush=True)

    def attach(self, source):
        p = self.job.processor
        image = p.load_image(source)
        self.conversation.pending.append(p.pixels([image], names=[display_name(source)]))
        self.say(f"[image {len(self.conversation.pixels) + len(self.conversation.pending)} attached: "
                 f"{image.width}x{image.height}; it goes with your next message]")

    def reply(self, text):
        """Stream the answer to `text`; Ctrl-C ends it early. Returns the answer's text."""
        conv, job = self.conversation, self.job
        conv.ask(text)
        ids = job.processor.encode_chat(conv.messages)
        room = job.engine.config.seq_length - len(ids)
        if room < 1:
            conv.messages.pop()
            raise LlavaError(f"the conversation is {len(ids)} tokens, the model's context is "
                             f"{job.engine.config.seq_length}: /reset to start a new one")
        settings = job.settings
        if settings.max_new_tokens > room:
            settings = type(settings)(**{**settings.__dict__, "max_new_tokens": room})
        import numpy as np
        pixels = np.concatenate(conv.pixels) if conv.pixels else None
        deltas = TextDeltas(job.tokenizer)
        steps = job.engine.stream(np.array([ids]), pixels, None, settings)
        try:
            for tokens, real in steps:
                restore_ctrl_c()        # each compilation (a new prompt length) installs MindSpore's again
                if real[0] and int(tokens[0]) not in settings.eos_token_id:
                    self.out.write(deltas.add(int(tokens[0])))
                    self.out.flush()
            self.out.write(deltas.finish() + "\n")
        except KeyboardInterrupt:
            steps.close()
            self.out.write("\n")
            self.say("[stopped]")
        self.out.flush()
        conv.answer(deltas.text)
        return deltas.text

    def handle(self, line):
        """One input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/exit":
                return False
            if command == "/reset":
                self.conversation.reset()
                self.say("[new conversation]")
            elif command == "/stats":
                s = self.job.engine.cache_stats()
                self.say(f"[prefix cache: {s.get('prefix_hits', 0)} hits, {s.get('prefix_cached_tokens', 0)} "
                         f"tokens reused, {s.get('prefix_cached_blocks', 0)} blocks kept, "
                         f"{s.get('prefix_evictions', 0)} evicted; image cache: {s['image_cache_hits']} hits, "
                         f"{s['image_cache_misses']} misses]")
            elif command == "/image" and rest.strip():
                self.attach(rest.strip())
            else:
                self.say(HELP)
            return True
        self.reply(line)
        return True

    def loop(self, read=input):
        self.say(f"[chat with the model; {HELP}]")
        while True:
            try:
                line = read("> ")
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            try:
                if not self.handle(line):
                    return 0
            except LlavaError as e:
                self.say(f"error: {e}")


def run(args, root):
    """`run_mindformer.py --run_mode chat`: load once, then converse on stdin/stdout."""
    from llava_predict import Job
    job = Job(args, root).load(batch=1)
    if job.tp.enabled:
        raise LlavaError("--run_mode chat runs on one process (use_parallel False)")
    # a turn's prompt (a follow-up's few new tokens above all) runs op by op rather than waiting for the
    # compile of its step's shape; each answer's decode step is compiled (Engine.stream)
    job.engine.compile_steps = False
    return Chat(job).loop()
