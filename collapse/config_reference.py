"""The config reference of the README, generated from the pydantic sections themselves.

A test compares it with the README, so the documented keys, defaults and meanings cannot drift
from the code. Print it with `python -m collapse.config_reference`.
"""

from __future__ import annotations

import json

from pydantic.fields import FieldInfo

from collapse.config import Config


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    return "required" if info.is_required() else json.dumps(value)


def reference_markdown() -> str:
    """One markdown table per config section: key, default, meaning."""
    blocks = []
    for section, section_info in Config.model_fields.items():
        model = section_info.annotation
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines = [f"**`{section}`**: {doc}", "", "| key | default | meaning |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            meaning = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | `{_default(info)}` | {meaning} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
