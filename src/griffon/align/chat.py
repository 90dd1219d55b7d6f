"""Chat templates: a conversation (``[{"role", "content"}, ...]``) as the text a model reads.

A template is Jinja, rendered as HF transformers renders ``chat_template`` (``apply_chat_template``):
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception`` and ``tojson``, and the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. Which template a model gets
(:func:`template_for`):

* an HF tokenizer's own, from ``chat_template.jinja`` or ``tokenizer_config.json``'s
  ``chat_template`` beside its ``tokenizer.json`` (the template the model was tuned with);
* for a sentencepiece tokenizer (RecurrentGemma, Gemma), Gemma's turn format
  (:data:`GEMMA_TEMPLATE`, as in Gemma's and RecurrentGemma's ``tokenizer_config.json``);
* for griffon's own tokenizers (bytes, byte-level BPE), which have no special tokens,
  :data:`GRIFFON_TEMPLATE`: each turn ``<|role|>\\n`` + content + ``<|end|>\\n``, with ``<|end|>``
  the end of turn.

Every template has an end-of-turn string, at which a reply stops (``griffon sample --chat``, the
server's ``/v1/chat/completions``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from griffon.files import TEMPLATE_BYTES, FileError, read_json, read_text

ROLES = ("system", "user", "assistant")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
"""Gemma's chat template (Gemma's and RecurrentGemma's ``tokenizer_config.json``)."""

GRIFFON_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""griffon's template for its own tokenizers: plain-text turn markers, ``<|end|>`` ending each turn."""


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or a template that cannot be read."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the strings it is rendered with."""

    source: str
    end_of_turn: str
    """Where a reply ends: generation stops at it."""
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of ``messages`` (checked: roles in :data:`ROLES`, string contents), followed by
        the opening of the assistant's turn with ``add_generation_prompt``."""
        check_messages(messages)
        from jinja2 import TemplateError

        try:
            return _compile(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )  # fmt: skip
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed to render: {e}") from None
        except Exception as e:  # the template's own arithmetic or calls ({{ 1/0 }}): its error, not ours
            raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None


def check_messages(messages: list[dict]) -> None:
    """:class:`ChatTemplateError` naming the first message that is not ``{"role", "content"}``
    with a role of :data:`ROLES` and a string content."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise ChatTemplateError(f'message {i} must be {{"role": ..., "content": ...}}, got {m!r}'[:200])
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"message {i}'s content must be a string")


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _compile(source: str):
    """The template compiled in transformers' environment."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def read_template(path: str | Path) -> str:
    """A chat template file's text, read within :data:`~griffon.files.TEMPLATE_BYTES`."""
    try:
        return read_text(path, TEMPLATE_BYTES, "a chat template")
    except FileError as e:
        raise ChatTemplateError(str(e)) from None


TEMPLATE_FILE = "chat_template.jinja"


def saved_template(directory: Path) -> ChatTemplate | None:
    """The chat template saved beside a tokenizer in ``directory``, if there is one: an HF
    tokenizer's (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``, with
    its ``bos_token`` and ``eos_token``), or the one a griffon run keeps (:func:`save_template`)."""
    config: dict = {}
    path = directory / "tokenizer_config.json"
    if path.is_file():
        try:
            config = read_json(path, TEMPLATE_BYTES, "a tokenizer configuration")
        except FileError as e:
            raise ChatTemplateError(str(e)) from None
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{path} is not a JSON object")
    source = config.get("chat_template")
    if (directory / TEMPLATE_FILE).is_file():
        source = read_template(directory / TEMPLATE_FILE)
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        return None
    _compile(source)
    bos, eos = (_token_text(config.get(k)) for k in ("bos_token", "eos_token"))
    return ChatTemplate(source, end_of_turn=_end_of_turn(source, eos), bos_token=bos, eos_token=eos)


def _end_of_turn(source: str, eos: str = "") -> str:
    """Where a template's replies end: Gemma's or griffon's marker if it uses one, else its EOS."""
    for marker in ("<end_of_turn>", "<|end|>"):
        if marker in source:
            return marker
    return eos or "<|end|>"


def save_template(template: ChatTemplate, directory: Path) -> None:
    """Keep ``template`` beside a tokenizer in ``directory`` as :func:`saved_template` reads it:
    ``chat_template.jinja`` (as transformers saves one), and its BOS and EOS strings in
    ``tokenizer_config.json`` where it has them."""
    from griffon.atomic import atomic_write

    atomic_write(directory / TEMPLATE_FILE, lambda tmp: tmp.write_text(template.source, encoding="utf-8"))
    if template.bos_token or template.eos_token:
        text = json.dumps({"bos_token": template.bos_token, "eos_token": template.eos_token}, indent=2) + "\n"
        atomic_write(directory / "tokenizer_config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run_template(
    tokenizer, tokenizer_spec: str, override: str | Path | None, renders_chats: bool
) -> ChatTemplate | None:
    """The chat template a run keeps with its tokenizer, for every reader of the run: the one it
    was given (``data.chat_template``), else the one its tokenizer came with (an HF directory's,
    another run's), else, for a run whose data are chats (SFT), the default they were rendered
    with; None where it has none."""
    if override is not None:
        return template_for(tokenizer, override)
    spec = Path(tokenizer_spec)
    if tokenizer_spec != "bytes" and spec.exists():
        found = saved_template(spec if spec.is_dir() else spec.parent)
        if found is not None:
            return found
    return template_for(tokenizer) if renders_chats else None


def _token_text(token) -> str:
    if isinstance(token, dict):  # transformers' AddedToken as saved
        token = token.get("content")
    return token if isinstance(token, str) else ""


def template_for(tokenizer, override: str | Path | None = None) -> ChatTemplate:
    """The chat template a model with ``tokenizer`` (a :class:`griffon.data.tokenizers.Tokenizer`)
    reads; ``override``: a Jinja file to use instead (its end of turn: ``<end_of_turn>`` if it
    uses Gemma's markers, else ``<|end|>``)."""
    if override is not None:
        source = read_template(override)
        _compile(source)
        return ChatTemplate(source, _end_of_turn(source))
    if tokenizer.directory is not None:
        found = saved_template(tokenizer.directory)
        if found is not None:
            return found
    if tokenizer.kind == "sentencepiece":
        # No "<bos>" text: sentencepiece encodes a control token's text as ordinary pieces; the
        # prompt's ids get BOS as any prompt of this tokenizer does.
        return ChatTemplate(GEMMA_TEMPLATE, end_of_turn="<end_of_turn>")
    return ChatTemplate(GRIFFON_TEMPLATE, end_of_turn="<|end|>")
