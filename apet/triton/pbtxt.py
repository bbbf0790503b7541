"""A tiny writer of protobuf text format for ``config.pbtxt`` (no protobuf dependency on the writing side).

A config is nested dicts: a dict is a message, a list of dicts a repeated message field, a list of scalars a
repeated scalar field, :class:`Enum` an enum value (written bare). Key order is kept, so the files read the way
docs/triton.md explains them. Tests parse the output with Triton's own ``model_config_pb2``.
"""

from __future__ import annotations

from typing import Any


class Enum(str):
    """An enum value such as ``TYPE_FP32`` or ``KIND_GPU``: written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def render(message: dict[str, Any], indent: int = 0) -> str:
    """``message`` as protobuf text format, two spaces per level."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", render(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", render(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            if value:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)
