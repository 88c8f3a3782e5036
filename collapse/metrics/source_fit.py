"""How a corpus fits the synthetic source that the human corpus was drawn from.

The built-in corpus comes from a probabilistic grammar that gives the exact probability
p(x) of any text (`collapse.corpus.synthetic`), so a generated corpus can be measured against
the truth rather than against a sample of it:

- the share of documents the source could have written at all (p(x) > 0), among all
  documents and among those that ended with EOS (a story cut at `max_new_tokens` is not one the
  source would write, whatever its words);
- the valid prefix share: how much of a document (in characters, to the last word boundary,
  or the end of a multi-word choice such as a place name) the source could have written
  before the document departs from every story it can write: a misspelt word, a word it never
  uses there, a hero whose name changes, a pronoun that does not match. It is graded where
  validity is all or nothing, so it still tells generations of a small model apart when none
  of their stories is valid;
- the source's negative log-likelihood -log p(x) of the valid ones (nats per story and per
  word): a corpus drawn from the source itself averages the source's entropy;
- the tail share: valid stories less likely than the human corpus's `tail_quantile`, i.e. with
  -log p(x) above that quantile of the human stories. The human corpus has 1 - tail_quantile
  of its stories there by construction; model collapse predicts the tails vanish first
  (Shumailov et al.), which reads here as this share falling toward 0;
- and, once per run, the floor of the validation perplexity: the source's own NLL per token of
  the validation stories, counted as the perplexity evaluation counts tokens.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collapse.corpus.parquet import iter_tables

_WORD = re.compile(r"[A-Za-z]+")


def _rows(paths: Sequence[Path], columns: list[str]) -> Iterator[tuple[Any, ...]]:
    """Each document's values of `columns`, in order, one shard in memory at a time."""
    for table in iter_tables(paths, columns):
        yield from zip(*(table.column(c).to_pylist() for c in columns), strict=True)


@dataclass(frozen=True)
class SourceScores:
    """Per document of a corpus, in order, what the source makes of it."""

    log_probs: np.ndarray  # log p(text); -inf where the source cannot write the text
    prefix_share: np.ndarray  # share of its characters in the longest prefix the source writes
    finished: np.ndarray  # ended with EOS
    words: np.ndarray  # whitespace-separated words
    departures: np.ndarray  # `departure_kind` of each invalid text, "" for a valid one


# Why a text departs from the source, where its valid prefix ends (`departure_kind`).
DEPARTURES = ("unfinished", "unknown_word", "misplaced_word", "punctuation")


def departure_kind(text: str, reached: int, finished: bool, vocabulary: frozenset[str]) -> str:
    """Why a text the source cannot write departs from it at `reached` (its valid prefix).

    - unfinished: all of it begins a source story: it ended before the source would end it,
      or it was cut at max_new_tokens (then its last word may be cut too, so a departure in the
      last word of a text that did not end with EOS counts here);
    - unknown_word: the word there is one the source never uses (a non-word, a new name);
    - misplaced_word: a word the source uses, but not there: broken grammar, a name that does
      not go with the hero (the source draws girls' names for girls), a pronoun that does not
      agree;
    - punctuation: anything else (punctuation, quotes, spacing).

    Args:
        text: the text.
        reached: the length of its valid prefix (`StoryGrammar.forward`).
        finished: whether it ended with EOS.
        vocabulary: the lower-case words the source uses (`StoryGrammar.vocabulary`).
    """
    rest = text[reached:].lstrip()
    if not rest or (not finished and not any(c.isspace() for c in rest)):
        return "unfinished"
    word = _WORD.match(rest)
    if word is None:
        return "punctuation"
    return "misplaced_word" if word.group().lower() in vocabulary else "unknown_word"


def source_scores(
    paths: Sequence[Path], grammar: Any, max_documents: int | None = None
) -> SourceScores:
    """Score every document of a corpus under the source `grammar` (its forward algorithm).

    Args:
        paths: the corpus's Parquet shards.
        grammar: a `collapse.corpus.synthetic.StoryGrammar`.
        max_documents: score only the first N documents; None: all.
    """
    log_probs: list[float] = []
    prefix: list[float] = []
    finished: list[bool] = []
    words: list[int] = []
    departures: list[str] = []
    for text, ended in itertools.islice(_rows(paths, ["text", "finished"]), max_documents):
        log_prob, reached = grammar.forward(text)
        log_probs.append(log_prob)
        # an empty document (EOS first) is no story: none of it counts as written
        prefix.append(reached / len(text) if text else 0.0)
        finished.append(bool(ended))
        words.append(len(text.split()))
        valid = math.isfinite(log_prob)
        departures.append("" if valid else departure_kind(text, reached, ended, grammar.vocabulary))
    return SourceScores(
        np.asarray(log_probs, np.float64),
        np.asarray(prefix, np.float64),
        np.asarray(finished, bool),
        np.asarray(words, np.int64),
        np.asarray(departures, dtype=object),
    )


def tail_threshold(log_probs: np.ndarray, quantile: float) -> float:
    """The source NLL above which a story is in the tail: the `quantile` of the valid stories'
    -log p (the human corpus's, where it sets the threshold).

    Raises:
        ValueError: no story is valid (there is no distribution to take a quantile of).
    """
    nll = -log_probs[np.isfinite(log_probs)]
    if nll.size == 0:
        raise ValueError("no document is one the source can produce: no tail threshold")
    return float(np.quantile(nll, quantile))


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def fit_summary(scores: SourceScores, threshold: float) -> dict[str, Any]:
    """The fit of one corpus: valid shares, valid prefix share, source NLL of the valid
    stories, tail share.

    Values with nothing to average over (no valid story, no finished story) are None, never 0.

    Args:
        scores: the corpus's `source_scores`.
        threshold: the tail threshold (`tail_threshold` of the human corpus).
    """
    valid = np.isfinite(scores.log_probs)
    nll = -scores.log_probs[valid]
    return {
        "documents": int(valid.size),
        "valid_fraction": _share(valid),
        "valid_finished_fraction": _share(valid[scores.finished]),
        "valid_documents": int(valid.sum()),
        "valid_prefix_share": float(scores.prefix_share.mean()) if valid.size else None,
        "source_nll": float(nll.mean()) if nll.size else None,
        "source_nll_per_word": float(nll.sum() / scores.words[valid].sum()) if nll.size else None,
        "tail_threshold": threshold,
        "tail_fraction": _share(nll > threshold),
        # among the stories the source could not write: where each departs from it
        "departures": {kind: _share(scores.departures[~valid] == kind) for kind in DEPARTURES},
    }


def perplexity_floor(paths: Sequence[Path], grammar: Any) -> dict[str, float]:
    """The source's NLL per token of a tokenized set of its own stories (the validation set),
    with tokens counted as the perplexity evaluation scores them: each document's tokens and
    its closing EOS. By Gibbs' inequality no model has a lower expected NLL per token on the
    source's stories, so exp of it is the floor of the validation perplexity (a finite
    sample can dip a little below it).

    Args:
        paths: Parquet shards with the stories' `text` and `input_ids`.
        grammar: the source (`collapse.corpus.synthetic.StoryGrammar`).
    """
    nll, tokens = 0.0, 0
    for text, ids in _rows(paths, ["text", "input_ids"]):
        nll -= grammar.log_prob(text)
        tokens += len(ids) + 1
    per_token = nll / tokens
    return {
        "validation_source_nll_per_token": per_token,
        "validation_perplexity_floor": math.exp(per_token),
    }
