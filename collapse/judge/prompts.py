"""Story beginnings for the judge: the TinyStories evaluation prompts, a file, or cut stories.

Every source returns prompts in a fixed order, stripped of surrounding whitespace (a trailing
space would make the student model start its continuation with a space-less token).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from collapse import yaml_strict
from collapse.errors import UserError
from collapse.store import atomic_write_bytes

HUB_REPO = "roneneldan/TinyStories"
HUB_FILENAME = "Evaluation prompts.yaml"
# The run's own copy of the hub file: a rerun or an offline worker reads this, never the hub.
COPY_NAME = "tinystories-evaluation-prompts.yaml"

CUT_LOW = 0.3  # a validation story is cut after 30%..70% of its words
CUT_HIGH = 0.7
# Shorter validation stories are skipped: a beginning of two or three words gives the judge
# nothing to check the continuation's consistency against.
MIN_STORY_WORDS = 10

_WORD = re.compile(r"\S+")
# A word that ends a sentence: . ! ? or … possibly followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")


class PromptsUnavailable(UserError, ValueError):
    """The requested prompts cannot be obtained; the message says why and what to use instead."""


def load_prompts(
    source: Literal["tinystories", "file", "validation"],
    *,
    path: Path | None = None,
    validation_texts: Sequence[str] | None = None,
    count: int = 44,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> list[str]:
    """Story beginnings (each stopping mid-sentence) for the student model to complete.

    Args:
        source: "tinystories": the 44 evaluation prompts of the TinyStories paper, the YAML
            file `Evaluation prompts.yaml` of the hub dataset `roneneldan/TinyStories`;
            "file": a local .yaml/.yml or .json list of strings, or a .txt file with one prompt
            per blank-line-separated block; "validation": prompts cut from the run's validation
            stories.
        path: the file, for source "file".
        validation_texts: the validation stories, for source "validation".
        count: at most this many prompts (the first ones of the hub or file list).
        seed: for "validation": seed of `numpy.random.default_rng`, which picks the stories and
            the cut points; the result depends only on (validation_texts, count, seed), and the
            prompts for a smaller count are a prefix of those for a larger one.
        cache_dir: for "tinystories": the run folder that keeps a copy of the hub file. When
            the copy exists the hub is not contacted.

    Returns:
        The prompts, in a fixed order: file/hub order, or the seeded draw order. "validation"
        skips stories under `MIN_STORY_WORDS` words or without a mid-sentence cut point in
        range, and returns fewer than `count` prompts when the stories
        run out.

    Raises:
        PromptsUnavailable: "tinystories" when the hub cannot be reached and there is no copy.
        ValueError: a missing argument, an unreadable or malformed file, no usable story.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if source == "tinystories":
        return _tinystories(cache_dir)[:count]
    if source == "file":
        if path is None:
            raise ValueError("prompts source 'file' needs a path")
        return _read_prompt_file(Path(path))[:count]
    if source == "validation":
        if validation_texts is None:
            raise ValueError("prompts source 'validation' needs the validation stories")
        return _from_validation(validation_texts, count, seed)
    raise ValueError(f"unknown prompts source {source!r} (tinystories, file or validation)")


def _tinystories(cache_dir: Path | None) -> list[str]:
    copy = cache_dir / COPY_NAME if cache_dir is not None else None
    if copy is not None and copy.is_file():
        return _read_prompt_file(copy)
    # Imported here: the other sources must work where huggingface_hub is slow to import or
    # misconfigured.
    from huggingface_hub import hf_hub_download

    try:
        # The hub's own cache (HF_HOME / HF_HUB_CACHE) is used, so HF_HUB_OFFLINE=1 still finds
        # a file downloaded earlier on this machine.
        downloaded = hf_hub_download(repo_id=HUB_REPO, repo_type="dataset", filename=HUB_FILENAME)
    except Exception as exc:  # offline mode, network, auth, missing file: all mean "no prompts"
        where = (
            f"there is no copy at {copy} (a copy of the hub file put there by hand is used)"
            if copy is not None
            else "no run folder to keep a copy in was given"
        )
        raise PromptsUnavailable(
            f"the TinyStories evaluation prompts ({HUB_FILENAME!r} of the dataset {HUB_REPO}) "
            f"could not be fetched from the Hugging Face hub ({type(exc).__name__}: {exc}) and "
            f"{where}. Use eval.judge.prompts: validation to cut prompts from the run's "
            "validation stories, or eval.judge.prompts: file with eval.judge.prompts_path "
            "naming a local YAML/JSON/TXT list of prompts."
        ) from None
    prompts = _read_prompt_file(Path(downloaded))
    if copy is not None:
        atomic_write_bytes(copy, Path(downloaded).read_bytes())
    return prompts


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompts file {path}: cannot read it ({exc})") from None
    if not text.strip():
        raise ValueError(f"prompts file {path} is empty")
    if suffix == ".txt":
        prompts = [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]
        return prompts
    data: Any
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml_strict.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"prompts file {path}: not valid YAML ({exc})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts file {path}: not valid JSON ({exc})") from None
    else:
        raise ValueError(
            f"prompts file {path}: unsupported extension {path.suffix!r} "
            "(use .yaml, .yml, .json or .txt)"
        )
    if not isinstance(data, list):
        raise ValueError(
            f"prompts file {path}: expected a list of strings, got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"prompts file {path}: the list of prompts is empty")
    prompts = []
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item.strip():
            what = "an empty string" if isinstance(item, str) else type(item).__name__
            raise ValueError(
                f"prompts file {path}: item {i} is {what}; every prompt must be a non-empty string"
            )
        prompts.append(item.strip())
    return prompts


def cut_mid_sentence(text: str, rng: np.random.Generator) -> str | None:
    """The beginning of `text`, cut after a random word that does not end a sentence.

    The cut falls after word k, k drawn uniformly among the positions between 30% and 70% of
    the words (at least one word on each side) whose word does not end in . ! ? or ….

    Args:
        text: a story.
        rng: the generator that draws the cut point.

    Returns:
        The beginning, with the story's own spacing and line breaks, or None when the story has
        no such position (too short, or only sentence ends in range).
    """
    words = list(_WORD.finditer(text))
    n = len(words)
    low = max(1, math.ceil(CUT_LOW * n))
    high = min(n - 1, math.floor(CUT_HIGH * n))
    candidates = [k for k in range(low, high + 1) if not _SENTENCE_END.search(words[k - 1].group())]
    if not candidates:
        return None
    k = candidates[int(rng.integers(len(candidates)))]
    return text[words[0].start() : words[k - 1].end()]


def _from_validation(texts: Sequence[str], count: int, seed: int) -> list[str]:
    if not texts:
        raise ValueError("prompts source 'validation': there are no validation stories")
    order = np.random.default_rng(seed).permutation(len(texts))
    prompts: list[str] = []
    for index in order:
        # One generator per story, keyed by its index: the cut of a story does not depend on
        # how many stories were drawn before it, so a larger count only appends prompts.
        text = texts[int(index)]
        if len(text.split()) < MIN_STORY_WORDS:
            continue
        cut = cut_mid_sentence(text, np.random.default_rng([seed, int(index)]))
        if cut is not None:
            prompts.append(cut)
            if len(prompts) == count:
                break
    if not prompts:
        raise ValueError(
            "prompts source 'validation': no validation story is long enough to be cut mid-sentence"
        )
    return prompts
