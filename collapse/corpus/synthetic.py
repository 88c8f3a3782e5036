"""Built-in generator of short children's stories: an offline stand-in for TinyStories.

The stories come from a probabilistic finite-state grammar held as data in
``data/synthetic/*.yaml`` (templates, word lists and recurring characters; see
`collapse.corpus.grammar` for the format). Because the source is an explicit automaton, the
exact probability of any text under it is computable, which is what lets an experiment
measure how far a model's samples drift from the true distribution.

    >>> grammar = load_grammar()
    >>> stories = generate_stories(3, seed=0, grammar=grammar)
    >>> all(story_log_prob(s, grammar) <= 0.0 for s in stories)
    True
"""

import operator
import random
from dataclasses import dataclass, field
from pathlib import Path

from collapse.corpus.grammar import Automaton, read_spec

__all__ = [
    "DEFAULT_GRAMMAR_DIR",
    "StoryGrammar",
    "generate_stories",
    "grammar_fingerprint",
    "load_grammar",
    "story_log_prob",
]

DEFAULT_GRAMMAR_DIR = Path(__file__).resolve().parents[2] / "data" / "synthetic"


@dataclass(frozen=True, eq=False)
class StoryGrammar:
    """A compiled story grammar.

    Attributes:
        name: the grammar's family name from the data, e.g. "collapse-stories".
        version: the versioned identifier to record with corpora, e.g. "collapse-stories-v1".
        fingerprint: sha256 of the data files, to tell apart edits that forgot a version bump.
        vocabulary: every lowercase word (a run of a-z letters) the grammar can emit.
        automaton: the compiled automaton that samples and scores.
    """

    name: str
    version: str
    fingerprint: str
    vocabulary: frozenset[str] = field(repr=False)
    automaton: Automaton = field(repr=False)

    def sample(self, rng: random.Random) -> str:
        """Draw one story, taking every random choice from rng."""
        return self.automaton.sample(rng)

    def log_prob(self, text: str) -> float:
        """Natural-log probability of exactly this text (-inf if it cannot be produced)."""
        return self.automaton.log_prob(text)

    def forward(self, text: str) -> tuple[float, int]:
        """(log probability of exactly this text, characters of its longest prefix that begins
        a story the grammar can write); see `Automaton.forward`."""
        return self.automaton.forward(text)


def load_grammar(path: Path | None = None) -> StoryGrammar:
    """Load and compile a story grammar.

    Args:
        path: a grammar YAML file or a directory of them (merged); default is the project's
            ``data/synthetic/``.

    Returns:
        The compiled grammar.

    Raises:
        FileNotFoundError: no grammar files at path.
        ValueError: the data is malformed (the message names the offending entry).
    """
    spec, fingerprint = read_spec(Path(path) if path is not None else DEFAULT_GRAMMAR_DIR)
    name = spec.get("name")
    version = spec.get("version")
    if not isinstance(name, str) or not name or isinstance(version, bool) or version is None:
        raise ValueError("grammar data needs a string `name` and a `version`")
    automaton = Automaton(spec)
    return StoryGrammar(
        name=name,
        version=f"{name}-v{version}",
        fingerprint=fingerprint,
        vocabulary=automaton.vocabulary,
        automaton=automaton,
    )


def grammar_fingerprint(path: Path | None = None) -> str:
    """The sha256 fingerprint `load_grammar(path)` records, read without compiling."""
    return read_spec(Path(path) if path is not None else DEFAULT_GRAMMAR_DIR)[1]


def generate_stories(n: int, seed: int, grammar: StoryGrammar | None = None) -> list[str]:
    """Generate n stories, deterministically from seed.

    Stories are drawn one after another from a single ``random.Random(seed)``, so the result
    is the same in every process and ``generate_stories(n, s)[:k] == generate_stories(k, s)``:
    a corpus can be extended without changing what it already holds.

    Args:
        n: number of stories (>= 0).
        seed: integer seed.
        grammar: the grammar; default loads the project's grammar.

    Returns:
        The stories, each a single line of text.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(operator.index(seed))  # index(): accept numpy ints, refuse floats
    grammar = load_grammar() if grammar is None else grammar
    return [grammar.sample(rng) for _ in range(n)]


def story_log_prob(text: str, grammar: StoryGrammar | None = None) -> float:
    """Exact natural-log probability of a text under the story source.

    The text must match character for character (no whitespace normalisation): the source
    emits each story as one line with single spaces.

    Args:
        text: the story.
        grammar: the grammar; default loads the project's grammar.

    Returns:
        log P(text), summed over every derivation; ``-math.inf`` when the grammar cannot
        produce the text.
    """
    grammar = load_grammar() if grammar is None else grammar
    return grammar.log_prob(text)
