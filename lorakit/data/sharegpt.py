"""ShareGPT conversations, read as lorakit's chat rows.

A ShareGPT row holds a list of turns ``{"from": ROLE, "value": TEXT}`` (column ``conversations`` unless
``data.messages_field`` names another) and optionally a ``system`` column with the system prompt. Turns
written ``{"role": ..., "content": ...}`` with ShareGPT's role names are read the same way. The roles
are mapped as LLaMA-Factory's ``sharegpt`` format tags them (human, gpt, system, function_call,
observation) and as Axolotl's ``chat_template`` roles map them (user/human, assistant/gpt, system,
tool):

======================== =========================================================================
``from``                 chat role
======================== =========================================================================
system                   system
human, user              user
gpt, assistant           assistant (its turns carry the loss)
function_call            assistant: the call's text is the model's output and carries the loss
observation, tool        tool (a tool's result: no loss)
======================== =========================================================================

A row-level ``system`` text is put first as a system message unless the conversation starts with one.
"""

from __future__ import annotations

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "function_call": "assistant", "observation": "tool", "tool": "tool"}
PROBE_ROWS = 100  # rows looked at to tell ShareGPT turns from chat messages


def _keys(turn: dict) -> set[str]:
    return {k for k, v in turn.items() if v is not None}  # Arrow gives every row every struct key


def turn_style(column: list) -> str | None:
    """``"sharegpt"`` when the turns of these rows are ``{from, value}``, ``"chat"`` when ``{role,
    content}``, ``"mixed"`` when rows have both, None when no row says."""
    seen = set()
    for turns in column:
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict):
                keys = _keys(turn)
                seen |= {"sharegpt"} if {"from", "value"} <= keys else set()
                seen |= {"chat"} if {"role", "content"} <= keys else set()
    return seen.pop() if len(seen) == 1 else "mixed" if seen else None


def _tags(turn: dict) -> tuple[str, str]:
    return ("from", "value") if "from" in _keys(turn) or "role" not in _keys(turn) else ("role", "content")


def problem(turns, system=None) -> str | None:
    """What is wrong with one ShareGPT row (its turns and optional system text), or None."""
    if not isinstance(turns, list) or not turns:
        return (f"conversations is {type(turns).__name__ if turns is not None else 'missing'}; expected a list of "
                '{"from": ..., "value": ...} turns')
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"conversations[{i}] is a {type(turn).__name__}; expected {{from, value}}"
        role, text = _tags(turn)
        if not isinstance(turn.get(role), str) or turn[role] not in ROLES:  # a list or dict: no role, unhashable
            return (f"conversations[{i}].{role} is {turn.get(role)!r}; expected one of {', '.join(ROLES)}"
                    if turn.get(role) is not None else f"conversations[{i}] has no from; expected {{from, value}}")
        if not isinstance(turn.get(text), str):
            return f"conversations[{i}].{text} is {'missing' if turn.get(text) is None else type(turn[text]).__name__}; expected text"
    if not any(ROLES[t[_tags(t)[0]]] == "assistant" for t in turns):
        return "no gpt (assistant) turn; each conversation needs at least one answer to learn"
    if system is not None and not isinstance(system, str):
        return f"system is a {type(system).__name__}; expected text"
    return None


def to_messages(turns: list[dict], system: str | None = None) -> list[dict]:
    """The chat messages of a good ShareGPT row (:func:`problem` is None)."""
    messages = []
    for turn in turns:
        role, text = _tags(turn)
        messages.append({"role": ROLES[turn[role]], "content": turn[text]})
    if system and system.strip() and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages
