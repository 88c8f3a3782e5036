"""Offline probe tasks built from the run's own human validation stories.

They give the demo and the tests real downstream signal without the hub: a model that has
learned the language of the stories should tell a sentence from the same words with two of them
swapped (`acceptability`) or all of them scrambled (`word_order`, coarse enough for tiny models),
and a story's next sentence from a sentence of another story
(`coherence`). Both are seeded and exactly balanced (half the examples of each split are
positive), and their train and evaluation splits come from disjoint sets of stories. Stories
can share sentences (the synthetic grammar repeats some verbatim), so the evaluation split also
leaves out every sentence (for `coherence`, every pair of consecutive sentences) that the train
split holds: no example is scored on what was fine-tuned on. The stories are the validation
split, which no generation is trained on; the perplexity evaluation reads them too, but it never
trains, so the overlap leaks nothing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

# A sentence ends at . ! or ? followed by space and a capital or an opening quote; quoted speech
# inside a sentence (`"Oh no!" cried Tom.`) then stays mostly whole, which is good enough here.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
EVAL_SHARE = 0.25  # of the stories
MIN_WORDS = 4  # acceptability: room to swap two words that are not the first


def sentences(story: str) -> list[str]:
    """The sentences of a story, in order."""
    return [s.strip() for s in _SENTENCE_END.split(story.strip()) if s.strip()]


def split_stories(stories: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(train stories, evaluation stories): a seeded split, EVAL_SHARE of them for evaluation."""
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(stories) * EVAL_SHARE)) if len(stories) > 1 else 0
    held = set(order[:n_eval])
    train = [s for i, s in enumerate(stories) if i not in held]
    return train, [s for i, s in enumerate(stories) if i in held]


def _balanced_labels(n: int, rng: random.Random) -> list[int]:
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return labels


def _split_tail(sentence: str) -> tuple[list[str], str] | None:
    """(words, final punctuation) of a sentence with at least MIN_WORDS words, else None."""
    words = sentence.split()
    if len(words) < MIN_WORDS:
        return None
    match = re.search(r"[.!?\"']+$", words[-1])
    if match and match.start() > 0:
        return [*words[:-1], words[-1][: match.start()]], words[-1][match.start() :]
    return words, ""


def swap_two_words(sentence: str, rng: random.Random) -> str | None:
    """The sentence with two different words swapped, or None if it has too few words.

    The first word (capitalised) and the final punctuation stay in place, so neither gives the
    swap away; only the order of the words changes.
    """
    split = _split_tail(sentence)
    if split is None:
        return None
    words, tail = split
    candidates = [(i, j) for i in range(1, len(words)) for j in range(i + 1, len(words))]
    candidates = [(i, j) for i, j in candidates if words[i].lower() != words[j].lower()]
    if not candidates:
        return None
    i, j = candidates[rng.randrange(len(candidates))]
    words[i], words[j] = words[j], words[i]
    return " ".join(words) + tail


def scramble_words(sentence: str, rng: random.Random) -> str | None:
    """The sentence with its words after the first shuffled (a different order), or None.

    A coarser corruption than `swap_two_words`: models as small as the demo's tell it apart
    after fine-tuning while a random-init model barely does.
    """
    split = _split_tail(sentence)
    if split is None:
        return None
    words, tail = split
    rest = words[1:]
    for _ in range(20):  # a shuffle can give the same order back (e.g. repeated words)
        shuffled = rng.sample(rest, len(rest))
        if shuffled != rest:
            return " ".join([words[0], *shuffled]) + tail
    return None


def _corrupted(
    stories: Sequence[str],
    seed: int,
    corrupt: Callable[[str, random.Random], str | None],
    seen: Sequence[str],
) -> tuple[list[tuple[str]], list[int]]:
    """Each sentence once: as written (label 1) or corrupted (label 0), half of each; none
    that a story of `seen` holds."""
    rng = random.Random(seed)
    known = {s for story in seen for s in sentences(story)}
    pool = [
        s
        for story in stories
        for s in sentences(story)
        if len(s.split()) >= MIN_WORDS and s not in known
    ]
    texts: list[tuple[str]] = []
    labels: list[int] = []
    for sentence, label in zip(pool, _balanced_labels(len(pool), rng), strict=True):
        text = corrupt(sentence, rng) if label == 0 else sentence
        if text is None:
            continue
        texts.append((text,))
        labels.append(label)
    return texts, labels


def acceptability(
    stories: Sequence[str], seed: int, seen: Sequence[str] = ()
) -> tuple[list[tuple[str]], list[int]]:
    """Each sentence once: as written (label 1) or with two words swapped (label 0).

    Args:
        stories: the stories of one split.
        seed: the seed of the labels and the swaps.
        seen: stories fine-tuned on (for the evaluation split): their sentences are left out.

    Returns:
        (one-text examples, labels), half of them 1.
    """
    return _corrupted(stories, seed, swap_two_words, seen)


def word_order(
    stories: Sequence[str], seed: int, seen: Sequence[str] = ()
) -> tuple[list[tuple[str]], list[int]]:
    """Each sentence once: as written (label 1) or with its words scrambled (label 0).

    Args:
        stories: the stories of one split.
        seed: the seed of the labels and the shuffles.
        seen: stories fine-tuned on (for the evaluation split): their sentences are left out.

    Returns:
        (one-text examples, labels), half of them 1.
    """
    return _corrupted(stories, seed, scramble_words, seen)


def _successions(stories: Sequence[Sequence[str]]) -> set[tuple[str, str]]:
    return {(sents[i], sents[i + 1]) for sents in stories for i in range(len(sents) - 1)}


def coherence(
    stories: Sequence[str], seed: int, seen: Sequence[str] = ()
) -> tuple[list[tuple[str, str]], list[int]]:
    """Pairs (sentence, next sentence of its story) labelled 1, or (sentence, a sentence of
    another story of the same split) labelled 0; each sentence with a successor starts one pair,
    unless a story of `seen` has the same two sentences in a row.

    Args:
        stories: the stories of one split (at least two, for the negatives).
        seed: the seed of the labels and the negatives.
        seen: stories fine-tuned on (for the evaluation split).

    Returns:
        (sentence pairs, labels), half of them 1.
    """
    rng = random.Random(seed)
    split = [sentences(story) for story in stories]
    if sum(1 for s in split if s) < 2:
        return [], []
    known = _successions([sentences(story) for story in seen])
    starts = [
        (k, i)
        for k, sents in enumerate(split)
        for i in range(len(sents) - 1)
        if (sents[i], sents[i + 1]) not in known
    ]
    non_empty = [k for k, sents in enumerate(split) if sents]
    pairs: list[tuple[str, str]] = []
    labels = _balanced_labels(len(starts), rng)
    for (k, i), label in zip(starts, labels, strict=True):
        if label == 1:
            pairs.append((split[k][i], split[k][i + 1]))
            continue
        other = k
        while other == k:  # any other story (there are at least two)
            other = non_empty[rng.randrange(len(non_empty))]
        pairs.append((split[k][i], split[other][rng.randrange(len(split[other]))]))
    return pairs, labels


PROBE_BUILDERS = {
    "acceptability": acceptability,
    "word_order": word_order,
    "coherence": coherence,
}
