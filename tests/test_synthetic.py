"""Tests for the built-in story generator: its data, sampler and exact scorer."""

import collections
import hashlib
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collapse.corpus.synthetic import (
    StoryGrammar,
    generate_stories,
    load_grammar,
    story_log_prob,
)

REPO = Path(__file__).resolve().parents[1]
WORD = re.compile(r"[a-z]+")

# A tiny grammar in the project's data format, small enough to work out by hand.
TINY = """
name: tiny
version: 3
start: story
rules:
  story: "{intro} {end}"
  intro: |
    [3] {pet.name} was {a:adj} {pet.kind}.
    {pet.name} slept.
  end:
    - "The end."
    - {text: "{pet.name} smiled.", weight: 1}
lists:
  adj: {old: 1, big: 3}
  dogs: [dog, pup]
entities:
  pet:
    - {weight: 1, kind: cat, name: [Tom, Tim]}
    - {weight: 2, kind: "@dogs", name: Rex}
"""

# Two derivations of "big dog" (the slots, or the literal), and an optional epsilon tail.
AMBIGUOUS = """
name: ambiguous
version: 1
start: s
rules:
  s: "{x}{tail}"
  x:
    - "{size} {animal}"
    - "big dog"
  tail:
    - {text: "", weight: 3}
    - " Yes."
lists:
  size: [big, small]
  animal: [dog, cat]
"""


@pytest.fixture(scope="module")
def grammar() -> StoryGrammar:
    return load_grammar()


@pytest.fixture(scope="module")
def timed_corpus(grammar: StoryGrammar) -> tuple[list[str], float]:
    start = time.perf_counter()
    stories = generate_stories(20_000, 1234, grammar)
    return stories, time.perf_counter() - start


def _tiny(tmp_path: Path, text: str = TINY, name: str = "tiny.yaml") -> StoryGrammar:
    path = tmp_path / name
    path.write_text(text)
    return load_grammar(path)


# -- the default grammar ----------------------------------------------------------------------


def test_default_grammar_identity(grammar: StoryGrammar) -> None:
    fresh = load_grammar()
    assert fresh.name == "collapse-stories"
    assert fresh.version == "collapse-stories-v1"
    assert fresh.fingerprint == grammar.fingerprint
    assert len(grammar.vocabulary) >= 1500
    assert grammar.automaton.unused == ()  # every list, rule and entity in the data is used


def test_a_crlf_checkout_of_the_grammar_has_the_same_fingerprint(
    grammar: StoryGrammar, tmp_path: Path
) -> None:
    from collapse.corpus.synthetic import DEFAULT_GRAMMAR_DIR, grammar_fingerprint

    for file in DEFAULT_GRAMMAR_DIR.glob("*.yaml"):
        (tmp_path / file.name).write_bytes(file.read_bytes().replace(b"\n", b"\r\n"))
    assert grammar_fingerprint(tmp_path) == grammar.fingerprint


def test_deterministic_and_prefix_stable(grammar: StoryGrammar) -> None:
    stories = generate_stories(60, 7, grammar)
    assert stories == generate_stories(60, 7, grammar)
    assert stories[:25] == generate_stories(25, 7, grammar)
    assert generate_stories(0, 7, grammar) == []
    assert stories != generate_stories(60, 8, grammar)
    assert generate_stories(3, 7) == stories[:3]  # default grammar is the same one


def test_same_stories_in_another_process(grammar: StoryGrammar) -> None:
    code = (
        "import hashlib; from collapse.corpus.synthetic import generate_stories; "
        "print(hashlib.sha256('\\n'.join(generate_stories(200, 42)).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order must not matter
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    expected = hashlib.sha256("\n".join(generate_stories(200, 42, grammar)).encode()).hexdigest()
    assert out.stdout.strip() == expected


def test_speed(timed_corpus: tuple[list[str], float]) -> None:
    stories, elapsed = timed_corpus
    assert len(stories) == 20_000
    assert elapsed < 10.0, f"20,000 stories took {elapsed:.2f} s"


def test_variety(timed_corpus: tuple[list[str], float], grammar: StoryGrammar) -> None:
    stories = timed_corpus[0]
    assert len(set(stories[:2000])) >= 1900
    words = collections.Counter(w for s in stories[:5000] for w in WORD.findall(s.lower()))
    assert len(words) >= 1500
    assert set(words) <= grammar.vocabulary


def test_format_and_length(timed_corpus: tuple[list[str], float]) -> None:
    stories = timed_corpus[0][:3000]
    for story in stories:
        assert story == story.strip() and "  " not in story and "\n" not in story
        assert story[0].isupper() and story[-1] in '.!?"'
        assert story.count('"') % 2 == 0
        assert not re.search(r" [.,!?]|[.!?,][A-Za-z]", story), story
        # Narration sentences start with a capital letter (dialogue tags like '?" cried' may not).
        assert not re.search(r"[.!?] [a-z]", story), story
    lengths = [len(s.split()) for s in stories]
    assert 60 <= statistics.median(lengths) <= 200
    assert sum(60 <= n <= 200 for n in lengths) >= 0.95 * len(lengths)
    assert any('"' in s for s in stories) and all(
        "learned" in s or "moral" in s or "knew" in s or "remembered" in s for s in stories
    )


def test_log_prob_of_generated_stories(grammar: StoryGrammar) -> None:
    for story in generate_stories(200, 99, grammar):
        lp = story_log_prob(story, grammar)
        assert math.isfinite(lp) and lp <= 0.0
    story = generate_stories(1, 5, grammar)[0]
    assert story_log_prob(story) == pytest.approx(story_log_prob(story, grammar))


def test_log_prob_of_impossible_texts(grammar: StoryGrammar) -> None:
    story = generate_stories(1, 3, grammar)[0]
    words = story.split(" ")
    words[len(words) // 2] = "zxqvjuggernautish"
    assert story_log_prob(" ".join(words), grammar) == -math.inf
    assert story_log_prob(story + " ", grammar) == -math.inf
    assert story_log_prob(story.lower(), grammar) == -math.inf
    assert story_log_prob("", grammar) == -math.inf


def test_hero_name_is_consistent(grammar: StoryGrammar) -> None:
    story = next(s for s in generate_stories(50, 11, grammar) if "girl named Lily" not in s)
    name = re.search(r"named ([A-Z][a-z]+)[.,]", story)
    assert name is not None and story.count(name.group(1)) >= 2
    other = "Lily" if name.group(1) != "Lily" else "Mia"
    # Renaming only the hero's last mention breaks the story's consistency: impossible.
    head, _, tail = story.rpartition(name.group(1))
    assert story_log_prob(head + other + tail, grammar) == -math.inf


# -- exactness on hand-checkable grammars ----------------------------------------------------


def test_tiny_grammar_hand_computed(tmp_path: Path) -> None:
    tiny = _tiny(tmp_path)
    assert tiny.version == "tiny-v3"
    assert tiny.vocabulary == {
        "tom",
        "tim",
        "rex",
        "was",
        "a",
        "an",
        "old",
        "big",
        "cat",
        "dog",
        "pup",
        "slept",
        "the",
        "end",
        "smiled",
    }
    # intro 3/4, cat group 1/3, Tom 1/2, "old" 1/4, end 1/2; Tom's second mention is forced.
    assert math.isclose(story_log_prob("Tom was an old cat. Tom smiled.", tiny), math.log(1 / 64))
    # intro 3/4, dog group 2/3, Rex 1, "big" 3/4, pup 1/2, end 1/2.
    want = math.log(3 / 4 * 2 / 3 * 3 / 4 * 1 / 2 * 1 / 2)
    assert math.isclose(story_log_prob("Rex was a big pup. The end.", tiny), want)
    # "Rex slept." draws the group (2/3) and the name (1) but never the kind.
    assert math.isclose(story_log_prob("Rex slept. Rex smiled.", tiny), math.log(1 / 4 * 2 / 3 / 2))
    for bad in (
        "Tom was an old cat. Tim smiled.",
        "Tom was a old cat. The end.",
        "Rex was a big cat. The end.",
        "Tom was an old cat.",
        "Tom slept. The end. ",
    ):
        assert story_log_prob(bad, tiny) == -math.inf, bad


def test_ambiguous_grammar_sums_derivations(tmp_path: Path) -> None:
    amb = _tiny(tmp_path, AMBIGUOUS)
    # "big dog": slots 1/2 * 1/2 * 1/2, plus the literal 1/2; then no tail, 3/4.
    assert math.isclose(story_log_prob("big dog", amb), math.log((1 / 8 + 1 / 2) * 3 / 4))
    assert math.isclose(story_log_prob("small cat Yes.", amb), math.log(1 / 8 * 1 / 4))
    assert story_log_prob("big dog Yes. Yes.", amb) == -math.inf


@pytest.mark.parametrize("text", [TINY, AMBIGUOUS])
def test_empirical_frequencies_match_exact_probabilities(tmp_path: Path, text: str) -> None:
    g = _tiny(tmp_path, text)
    n = 40_000
    counts = collections.Counter(generate_stories(n, 2024, g))
    probs = {s: math.exp(story_log_prob(s, g)) for s in counts}
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)  # every string was seen
    for story, count in counts.items():
        p = probs[story]
        assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, story


# -- data validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\nversion: 1\nstart: a\nrules:\n  a: '{b}'\n  b: '{a}'\n", "recursive"),
        ("name: t\nversion: 1\nstart: a\nrules:\n  a: '{nope}'\n", "unknown"),
        ("name: t\nversion: 1\nstart: a\nrules:\n  a: '{w}'\nlists:\n  w: [yes, no]\n", "strings"),
        ("name: t\nversion: 1\nstart: a\nrules:\n  a: '{w}'\nlists:\n  w: [x, x]\n", "duplicate"),
        ("name: t\nversion: 1\nstart: a\nrules:\n  a: '{e.f}'\n", "unknown entity"),
        ("name: t\nversion: 1\nstart: z\nrules:\n  a: 'x'\n", "start"),
    ],
)
def test_bad_data_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny(tmp_path, text)


def test_directory_of_files_is_merged(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: split\nversion: 2\nstart: s\nrules:\n  s: '{w}.'\n")
    (tmp_path / "b.yaml").write_text("lists:\n  w: [Hi, Bye]\n")
    g = load_grammar(tmp_path)
    assert sorted(generate_stories(50, 0, g))[0] == "Bye."
    assert math.isclose(story_log_prob("Hi.", g), math.log(1 / 2))
