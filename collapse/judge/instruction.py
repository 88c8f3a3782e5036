"""The grading instruction sent to the judge, its version and the JSON schema of its answer.

Changing the wording of the instruction changes the grades, so `INSTRUCTION_VERSION` is part of
every cache key: bump it with any edit below, and cached grades from the old wording are not
reused.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION_VERSION = "collapse-judge-v1"

CRITERIA = ("grammar", "creativity", "consistency")

# Where the given beginning ends and the student's text starts.
SPLIT_MARK = "***"

# Mentions "JSON" on purpose: OpenAI rejects `response_format={"type": "json_object"}` unless
# the messages ask for JSON.
SYSTEM_INSTRUCTION = f"""\
You assess short stories for children written by a student language model.

The student was handed the first part of a story. That part breaks off in the middle of a \
sentence. The student then wrote the rest. In the text you receive, the mark {SPLIT_MARK} sits \
exactly where the handed-out part stops: everything before {SPLIT_MARK} was given, everything \
after it is the student's own writing.

Judge only the student's writing, on three criteria. Give each an integer from 0 (very poor) to \
9 (excellent):
- grammar: spelling, punctuation, word choice and sentence structure of the student's text.
- creativity: how original, lively and engaging the continuation is for a young reader.
- consistency: how well the continuation fits what came before {SPLIT_MARK}. Characters, \
setting and events should stay coherent, and the sentence interrupted at {SPLIT_MARK} must be \
finished in a way that makes sense. A continuation that ignores the beginning, starts a new \
story or leaves the interrupted sentence broken deserves a low consistency grade.

Reply with a single JSON object and nothing else, in exactly this form:
{{"grammar": <integer 0-9>, "creativity": <integer 0-9>, "consistency": <integer 0-9>}}"""

# `enum` rather than minimum/maximum: every structured-output backend we target (OpenAI strict
# mode, vLLM's guided decoding, llama.cpp's grammar conversion) enforces an enum, while some
# silently ignore numeric bounds.
GRADES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {name: {"type": "integer", "enum": list(range(10))} for name in CRITERIA},
    "required": list(CRITERIA),
    "additionalProperties": False,
}

SCHEMA_NAME = "story_grades"


def build_messages(prompt: str, completion: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to grade one completion.

    Args:
        prompt: the story beginning the student model was given (it stops mid-sentence).
        completion: the text the student model wrote after it, exactly as generated (a leading
            space or its absence is part of what is graded).

    Returns:
        A system message with the instruction and a user message with the story, the split
        marked with `SPLIT_MARK`.
    """
    story = f"{prompt}{SPLIT_MARK}{completion}"
    return [
        {"role": "system", "content": SYSTEM_INSTRUCTION},
        {
            "role": "user",
            "content": f"The student's writing starts after {SPLIT_MARK}.\n\n{story}",
        },
    ]


def response_format(mode: str) -> dict[str, Any] | None:
    """The `response_format` request parameter for a response mode.

    Args:
        mode: "json_schema" (structured output with `GRADES_SCHEMA`), "json_object" (any JSON
            object) or "text" (no constraint: the JSON is extracted from the reply).

    Returns:
        The parameter, or None for "text" (the request carries no `response_format`).
    """
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": GRADES_SCHEMA, "strict": True},
        }
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "text":
        return None
    raise ValueError(f"unknown response mode {mode!r} (json_schema, json_object or text)")
