"""Conversations -> prompt text with the chat template llava-hf ships (`chat_template.jinja` beside this file).

Rendered as transformers' `apply_chat_template` renders it: jinja2's immutable sandbox with trim_blocks and
lstrip_blocks, the `{% generation %}` tag (transformers marks assistant text with it; here it renders its
body), `raise_exception` and a `tojson` that does not escape HTML. Messages are
`{"role": "system" | "user" | "assistant", "content": [{"type": "text", "text": ...}, {"type": "image"}]}`;
a plain-string content is taken as one text part. The template writes `<image>\\n` for every image part
(images first, then the texts of the turn); the processor expands each `<image>` to the image tokens.
"""
import json
import os

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_errors import LlavaError

TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_template.jinja")
ROLES = ("system", "user", "assistant")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers tracks assistant spans)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile(source):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def normalize(messages):
    """Check a conversation and give every message a list of parts; returns (messages, image count)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlavaError("messages must be a non-empty list")
    out, images = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LlavaError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LlavaError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise LlavaError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                if role != "user":
                    raise LlavaError(f"messages[{i}].content[{j}]: only user messages can hold images")
                parts.append({"type": "image"})
                images += 1
            else:
                raise LlavaError(f"messages[{i}].content[{j}] must be a text part with a string 'text' or an "
                                 f"image part")
        out.append({"role": role, "content": parts})
    return out, images


class ChatTemplate:
    """The compiled template; `render(messages)` gives the prompt text ending with `ASSISTANT:` and the number
    of image parts (one `<image>` each in the text)."""

    def __init__(self, path=TEMPLATE_FILE):
        with open(path, encoding="utf-8") as f:
            self.template = _compile(f.read())

    def render(self, messages, add_generation_prompt=True):
        messages, images = normalize(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt), images
        except jinja2.exceptions.TemplateError as e:
            raise LlavaError(f"chat template: {e}") from None
