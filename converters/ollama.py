"""An Ollama `Modelfile` for an exported GGUF, derived from the tokenizer's chat template.

Ollama renders prompts with a Go text/template over `.Messages` (each with `.Role`, `.Content`);
it does not run the Jinja chat template. We recover each role's wrapping from the Jinja template
itself: render probe conversations whose contents are unique markers, and read the text around
the markers (user prefix / suffix, assistant prefix / suffix, the generation prompt, the system
wrapping, and a default system prompt the template inserts when none is given). Two layouts are
understood: a separate system turn (ChatML, Llama 3, ...) and a system prompt folded into the
first user turn (Gemma). The derived pieces are checked by re-rendering the probes from them;
when a template fits neither layout, the Modelfile carries no TEMPLATE (Ollama then matches the
chat template stored in the GGUF itself) and a warning says so.

Stop parameters are the special tokens that end an assistant turn or begin the next one, plus the
EOS token: the "endless generation after export" users hit comes from missing these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

MODELFILE_NAME = "Modelfile"
_SYS, _USER, _USER2, _ASSIST = "FLJXSYSTEMX", "FLJXUSERONEX", "FLJXUSERTWOX", "FLJXASSISTX"


@dataclasses.dataclass(frozen=True)
class ChatLayout:
    """The text around each role's content. `system_in_user`: the system prompt is written at
    the start of the first user turn followed by `system_suffix` (no system turn of its own).
    `preamble`: text the template writes before everything (a BOS token the tokenizer itself
    does not add)."""

    preamble: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    system_prefix: str
    system_suffix: str
    system_in_user: bool
    default_system: str | None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the Go template renders for `messages` (the layout's own rendering)."""
        system = next((m["content"] for m in messages if m["role"] == "system"),
                      self.default_system)
        out, first_user = [self.preamble], True
        if system is not None and not self.system_in_user:
            out.append(self.system_prefix + system + self.system_suffix)
        for m in messages:
            if m["role"] == "user":
                head = ""
                if self.system_in_user and first_user and system:
                    head = system + self.system_suffix
                out.append(self.user_prefix + head + m["content"] + self.user_suffix)
                first_user = False
            elif m["role"] == "assistant":
                out.append(self.assistant_prefix + m["content"] + self.assistant_suffix)
        if add_generation_prompt:
            out.append(self.assistant_prefix)
        return "".join(out)


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _between(text: str, start: str | None, end: str | None) -> str:
    lo = 0 if start is None else text.index(start) + len(start)
    hi = len(text) if end is None else text.index(end, lo)
    return text[lo:hi]


def _adds_bos(tokenizer: Any) -> bool:
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(tokenizer("a")["input_ids"]) > len(plain)


def _strip_bos(tokenizer: Any, text: str) -> str:
    """Drop a leading BOS the template writes: llama.cpp / Ollama add it when tokenizing."""
    bos = tokenizer.bos_token
    if bos and _adds_bos(tokenizer) and text.startswith(bos):
        return text[len(bos):]
    return text


def chat_layout(tokenizer: Any) -> ChatLayout | None:
    """The layout of the tokenizer's chat template, or None when it fits neither form."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u1, u2 = ({"role": "user", "content": _USER}, {"role": "user", "content": _USER2})
    a1, s1 = {"role": "assistant", "content": _ASSIST}, {"role": "system", "content": _SYS}
    try:
        only_user = _strip_bos(tokenizer, _render(tokenizer, [u1], False))
        with_gen = _strip_bos(tokenizer, _render(tokenizer, [u1], True))
        turn = _strip_bos(tokenizer, _render(tokenizer, [u1, a1], False))
        chat = _strip_bos(tokenizer, _render(tokenizer, [u1, a1, u2], True))
        system = _strip_bos(tokenizer, _render(tokenizer, [s1, u1], True))
    except Exception as err:  # a template may refuse probe conversations (raise_exception)
        log.warning("the chat template could not render a probe conversation (%s)", err)
        return None
    preamble = ""
    bos = tokenizer.bos_token
    if bos and all(r.startswith(bos) for r in (only_user, with_gen, turn, chat, system)):
        preamble = bos  # written by the template, not added by the tokenizer: keep it literal
        only_user, with_gen, turn, chat, system = (r[len(bos):] for r in (
            only_user, with_gen, turn, chat, system))
    try:
        head = _between(only_user, None, _USER)
        user_suffix = _between(only_user, _USER, None)
        assistant_prefix = with_gen[len(only_user):] if with_gen.startswith(only_user) else None
        assistant_suffix = _between(turn, _ASSIST, None)
        user_prefix = _between(chat, _ASSIST + assistant_suffix, _USER2)
        sys_head = _between(system, None, _SYS)
        sys_tail = _between(system, _SYS, _USER)
    except ValueError:
        return None
    if assistant_prefix is None or not head.endswith(user_prefix):
        return None
    default_block = head[:len(head) - len(user_prefix)]
    candidates = []
    if sys_head.endswith(user_prefix) and sys_head == user_prefix:  # folded into the first turn
        candidates.append(ChatLayout(preamble, user_prefix, user_suffix, assistant_prefix,
                                     assistant_suffix, "", sys_tail, True, None))
    elif sys_tail.endswith(user_prefix):
        sys_suffix = sys_tail[:len(sys_tail) - len(user_prefix)]
        default = None
        if default_block:
            if not (default_block.startswith(sys_head) and default_block.endswith(sys_suffix)):
                return None
            default = default_block[len(sys_head):len(default_block) - len(sys_suffix)]
        candidates.append(ChatLayout(preamble, user_prefix, user_suffix, assistant_prefix,
                                     assistant_suffix, sys_head, sys_suffix, False, default))
    probes = [([u1], True), ([u1, a1, u2], True), ([s1, u1, a1, u2], True), ([u1, a1], False)]
    for layout in candidates:
        if all(layout.render(msgs, gen) == _strip_bos(tokenizer, _render(tokenizer, msgs, gen))
               for msgs, gen in probes):
            return layout
    return None


def _go_literal(text: str) -> str:
    """Literal text for a Go template (a `{{` inside is emitted as a string action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(layout: ChatLayout) -> str:
    """Ollama's TEMPLATE for `layout` (Go text/template over .Messages; no whitespace trimming,
    so every literal is kept byte for byte)."""
    L = _go_literal
    last = '{{ $last := eq (len (slice $.Messages $i)) 1 }}'
    assistant = (f'{{{{ else if eq .Role "assistant" }}}}{L(layout.assistant_prefix)}'
                 f'{{{{ .Content }}}}{{{{ if not $last }}}}{L(layout.assistant_suffix)}'
                 f'{{{{ end }}}}')
    tail = f'{{{{ if and $last (ne .Role "assistant") }}}}{L(layout.assistant_prefix)}{{{{ end }}}}'
    if layout.system_in_user:
        return (L(layout.preamble) + '{{ $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}'
                '{{ $sys = .Content }}{{ end }}{{ end }}{{ $first := true }}'
                '{{ range $i, $_ := .Messages }}' + last +
                f'{{{{ if eq .Role "user" }}}}{L(layout.user_prefix)}{{{{ if and $first $sys }}}}'
                f'{{{{ $sys }}}}{L(layout.system_suffix)}{{{{ end }}}}{{{{ .Content }}}}'
                f'{L(layout.user_suffix)}{{{{ $first = false }}}}' + assistant +
                '{{ end }}' + tail + '{{ end }}')
    return (L(layout.preamble) + '{{ range $i, $_ := .Messages }}' + last +
            f'{{{{ if eq .Role "system" }}}}{L(layout.system_prefix)}{{{{ .Content }}}}'
            f'{L(layout.system_suffix)}'
            f'{{{{ else if eq .Role "user" }}}}{L(layout.user_prefix)}{{{{ .Content }}}}'
            f'{L(layout.user_suffix)}' + assistant + '{{ end }}' + tail + '{{ end }}')


def stop_tokens(tokenizer: Any, layout: ChatLayout | None) -> list[str]:
    """Special tokens that end a turn (the assistant suffix's, the user prefix's) and EOS."""
    specials = sorted(set(tokenizer.all_special_tokens) |
                      {str(t) for t in tokenizer.added_tokens_decoder.values()
                       if getattr(t, "special", False)}, key=len, reverse=True)
    out: list[str] = []

    def add(token: str | None) -> None:
        if token and token not in out:
            out.append(token)

    if layout is not None:
        for text in (layout.assistant_suffix, layout.user_prefix):
            found = sorted((text.index(s), s) for s in specials if s and s in text)
            if found:
                add(found[0][1])
    add(tokenizer.eos_token)
    return out


def _quoted(text: str) -> str:
    """A Modelfile string: triple-quoted (keeps newlines) unless it contains triple quotes."""
    if '"""' not in text:
        return f'"""{text}"""'
    return json.dumps(text)


def modelfile(gguf_file: str, tokenizer: Any) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, SYSTEM default, stop parameters."""
    layout = chat_layout(tokenizer)
    lines = [f"FROM ./{gguf_file}"]
    if layout is not None:
        lines.append(f"TEMPLATE {_quoted(go_template(layout))}")
        if layout.default_system:
            lines.append(f"SYSTEM {_quoted(layout.default_system)}")
    elif getattr(tokenizer, "chat_template", None):
        log.warning("the chat template's layout was not recognised: the Modelfile has no "
                    "TEMPLATE and Ollama will use the chat template stored in the GGUF")
    for token in stop_tokens(tokenizer, layout):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"


__all__ = ["ChatLayout", "MODELFILE_NAME", "chat_layout", "go_template", "modelfile",
           "stop_tokens"]
