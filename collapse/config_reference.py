"""The config reference of the README, generated from the pydantic sections themselves.

A test compares it with the README, so the documented keys, defaults and meanings cannot drift
from the code. Print it with `python -m collapse.config_reference`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from collapse.config import Config


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    return "required" if info.is_required() else json.dumps(value)


def _rows(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows += _rows(f"{prefix}.{name}", info.annotation)  # a nested section
            continue
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{name}` | `{_default(info)}` | {meaning} |")
    return rows


def reference_markdown() -> str:
    """One markdown table per config section: key, default, meaning."""
    blocks = []
    for section, section_info in Config.model_fields.items():
        model = section_info.annotation
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines = [f"**`{section}`**: {doc}", "", "| key | default | meaning |", "|---|---|---|"]
        blocks.append("\n".join(lines + _rows(section, model)))
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
