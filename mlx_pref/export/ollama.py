"""Ollama's ``Modelfile`` for a GGUF export: FROM the file, a Go TEMPLATE equal to the
model's chat template, and the stop tokens.

The chat template (Jinja) is not parsed. It is rendered for a few conversations whose
messages hold marker texts; each role's text before and after its content, the text
before the first message and the assistant prompt are read off; and the Go template
built from those pieces is kept only if, for every test conversation, rendering the
pieces in order (as the Go template does) gives exactly what the Jinja template gives.
A template that does something else (a system prompt folded into the first user turn,
tools, ...) gets a Modelfile without TEMPLATE, and a comment saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MARK = "-MLXPREF-MARK"
# Conversations the Go template must reproduce (roles; the contents are filled in).
CHECKS = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user"),
    ("system", "user", "assistant", "user", "assistant", "user"),
)


@dataclass
class ChatFormat:
    """A chat template that wraps each message in fixed text per role."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    """What starts the assistant's turn (``add_generation_prompt``)."""
    default_system: str | None
    """The system prompt the template inserts when a conversation has none."""

    def render(self, messages: list[dict]) -> str:
        """What the Go template gives for ``messages`` (with Ollama's SYSTEM default)."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(
            self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages
        )
        return self.head + body + self.generation

    def go_template(self) -> str:
        """The same as Ollama's Go template: the pieces as literal text around actions
        (no ``{{-`` trimming, so every newline is the template's own)."""
        branches = "{{ else if ".join(
            f'eq .Role "{role}" }}}}{self.prefix[role]}{{{{ .Content }}}}{self.suffix[role]}'
            for role in ROLES
        )
        loop = "{{ range .Messages }}{{ if " + branches + "{{ end }}{{ end }}"
        return self.head + loop + self.generation


def render_jinja(template: str, messages: list[dict], generation: bool, tokens: dict) -> str:
    """The chat template rendered as transformers renders it."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: "1 Jan 2025"
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=generation, **tokens
    )


def _split(text: str, start: str, marker: str) -> tuple[str, str]:
    """``text`` is ``start + before + marker + after``: return (before, after)."""
    if not text.startswith(start) or marker not in text[len(start) :]:
        raise ValueError(marker)
    before, _, after = text[len(start) :].partition(marker)
    return before, after


def chat_format(template: str, tokens: dict) -> ChatFormat | None:
    """The per-role pieces of ``template``, or None when it is not that simple."""

    def render(roles: tuple[str, ...], generation: bool) -> str:
        return render_jinja(template, _conversation(roles), generation, tokens)

    user, assistant, system = (f"{role}1{MARK}" for role in ("user", "assistant", "system"))
    try:
        pre_user, user_suffix = _split(render(("user",), False), "", user)
        start = pre_user + user + user_suffix
        two = render(("user", "assistant"), False)
        ast_prefix, ast_suffix = _split(two, start, assistant)
        start += ast_prefix + assistant + ast_suffix
        three = render(("user", "assistant", "user"), True)
        user_prefix, rest = _split(three, start, f"user2{MARK}")
        pre_system, after = _split(render(("system", "user"), False), "", system)
    except Exception:  # a template that refuses these conversations, or renders otherwise
        return None
    tail = user_prefix + user + user_suffix
    if not (pre_user.endswith(user_prefix) and rest.startswith(user_suffix)):
        return None
    if not after.endswith(tail):
        return None
    system_suffix = after[: len(after) - len(tail)]
    head, default = pre_user[: len(pre_user) - len(user_prefix)], None
    if not pre_system.startswith(head):  # the template inserts a default system prompt
        if not (head.startswith(pre_system) and head.endswith(system_suffix)):
            return None
        default = head[len(pre_system) : len(head) - len(system_suffix)]
        bos = tokens.get("bos_token") or ""
        rendered_bos = bos and "bos_token" in template and pre_system.startswith(bos)
        head = bos if rendered_bos else ""
    fmt = ChatFormat(
        head=head,
        prefix={"system": pre_system[len(head) :], "user": user_prefix, "assistant": ast_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": ast_suffix},
        generation=rest[len(user_suffix) :],
        default_system=default,
    )
    return fmt if _reproduces(fmt, template, tokens) else None


def _conversation(roles: tuple[str, ...]) -> list[dict]:
    """Messages whose contents are markers: ``user1<MARK>``, ``assistant1<MARK>``, ..."""
    seen: list[str] = []
    out = []
    for role in roles:
        seen.append(role)
        out.append({"role": role, "content": f"{role}{seen.count(role)}{MARK}"})
    return out


def _reproduces(fmt: ChatFormat, template: str, tokens: dict) -> bool:
    for roles in CHECKS:
        messages = [
            {"role": r, "content": f"Line {i} of the {r}.\nAnd another, {i}!"}
            for i, r in enumerate(roles)
        ]
        if fmt.render(messages) != render_jinja(template, messages, True, tokens):
            return False
    pieces = [fmt.head, fmt.generation, *fmt.prefix.values(), *fmt.suffix.values()]
    pieces.append(fmt.default_system or "")
    return not any("{{" in p or '"""' in p for p in pieces)


def stop_tokens(fmt: ChatFormat | None, control: list[str], eos: str | None) -> list[str]:
    """The end-of-turn and start-of-turn control tokens, and the EOS token."""
    found = []
    if fmt is not None:
        text = fmt.suffix["assistant"] + fmt.prefix["user"] + fmt.generation
        found = sorted((t for t in control if t and t in text), key=text.index)
    if eos:
        found.insert(0, eos)
    return [t for i, t in enumerate(found) if t not in found[:i] and '"' not in t]


def modelfile(gguf_file: str, tokenizer: dict, adapter: str | None = None) -> tuple[str, bool]:
    """The Modelfile text for ``FROM gguf_file`` (plus ``ADAPTER adapter``), from the
    tokenizer metadata (plain values); and whether it has a TEMPLATE."""
    tokens = tokenizer.get("tokenizer.ggml.tokens", [])
    types = tokenizer.get("tokenizer.ggml.token_type", [])
    control = [t for t, kind in zip(tokens, types) if kind == 3]

    def token(key: str) -> str | None:
        index = tokenizer.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    template = tokenizer.get("tokenizer.chat_template")
    add_bos = tokenizer.get("tokenizer.ggml.add_bos_token", False)
    specials = {"bos_token": token("bos") or "", "eos_token": token("eos") or ""}
    fmt = chat_format(template, specials) if template else None
    if fmt is not None and fmt.head == specials["bos_token"] and add_bos:
        fmt.head = ""  # llama.cpp, under Ollama, adds the BOS token itself
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM {gguf_file}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
        if fmt.default_system is not None:
            lines.append(f'SYSTEM """{fmt.default_system}"""')
    else:
        why = "has none" if not template else "cannot be written as Ollama's Go template"
        lines.append(
            f"# No TEMPLATE: the model's chat template {why}; Ollama falls back to the "
            "template it picks for the GGUF's tokenizer.chat_template; add one before chatting."
        )
    lines += [f'PARAMETER stop "{t}"' for t in stop_tokens(fmt, control, token("eos"))]
    return "\n".join(lines) + "\n", fmt is not None
