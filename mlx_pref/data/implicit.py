"""Implicit prompts: the prompt two full texts share, split off them, and hh-rlhf
transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...``) read as chat messages."""

from __future__ import annotations

import re

Messages = list[dict]
Text = str | Messages

TURN_MARKER = "\n\nAssistant:"
"""hh-rlhf's turn boundary: implicit prompts end right after the last shared one."""
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ?")
"""hh-rlhf's turns, for reading a transcript string as chat messages."""


def transcript_messages(text: str) -> Messages | None:
    """An hh-rlhf transcript (``\\n\\nHuman: ... \\n\\nAssistant: ...``) as user/assistant
    messages, or None when ``text`` is not one (it must start with a turn)."""
    parts = TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on the longest equal prefix: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split a shared prompt off two full texts (or message lists): (prompt, chosen, rejected).

    Message lists: the prompt is the leading messages both share (TRL's ``extract_prompt``).
    Strings: the longest common prefix, cut back to end right after the last shared
    ``\\n\\nAssistant:`` turn marker, so a first word both answers happen to share stays in
    the completions. Without a marker in the shared text, TRL's character rule: the whole
    common prefix, less a trailing space (which then starts both completions).
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = _common_prefix(chosen, rejected)
    marker = chosen.rfind(TURN_MARKER, 0, n)
    if marker >= 0:
        n = marker + len(TURN_MARKER)
    elif 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]
