"""`source_fit`: corpora measured against the known synthetic source, on answers known by
construction, and as a stage of a synthetic run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from collapse.config import Config, ConfigError, validate_config
from collapse.context import Context
from collapse.corpus.parquet import write_shard
from collapse.corpus.synthetic import generate_stories, load_grammar
from collapse.metrics.source_fit import (
    SourceScores,
    departure_kind,
    fit_summary,
    perplexity_floor,
    source_scores,
    tail_threshold,
)
from collapse.pipeline import freeze_config, metrics_table, run_stage, stages_of
from collapse.report import write_report
from collapse.store import RunStore

from .conftest import tiny_config_dict


@pytest.fixture(scope="module")
def grammar():
    return load_grammar()


@pytest.fixture(scope="module")
def human(grammar) -> list[str]:
    return generate_stories(400, seed=3, grammar=grammar)


def _corpus(folder: Path, texts: list[str], finished: list[bool] | None = None) -> list[Path]:
    """Shards of 150 documents, as the corpus and sample stages write them (ids unused here)."""
    folder.mkdir(parents=True)
    finished = [True] * len(texts) if finished is None else finished
    paths = []
    for k, start in enumerate(range(0, len(texts), 150)):
        path = folder / f"shard-{k:05d}.parquet"
        chunk = texts[start : start + 150]
        write_shard(path, [[1]] * len(chunk), chunk, finished[start : start + 150])
        paths.append(path)
    return paths


def test_the_source_own_stories_fit_it_exactly(tmp_path, grammar, human):
    scores = source_scores(_corpus(tmp_path / "c", human), grammar)
    expected = [grammar.log_prob(s) for s in human]
    assert scores.log_probs.tolist() == expected and scores.finished.all()
    assert scores.words.tolist() == [len(s.split()) for s in human]
    assert (scores.prefix_share == 1.0).all()
    threshold = tail_threshold(scores.log_probs, 0.9)
    fit = fit_summary(scores, threshold)
    assert fit["documents"] == fit["valid_documents"] == 400
    assert fit["valid_fraction"] == fit["valid_prefix_share"] == 1.0
    assert fit["source_nll"] == pytest.approx(-np.mean(expected), rel=1e-12)
    per_word = -sum(expected) / sum(len(s.split()) for s in human)
    assert fit["source_nll_per_word"] == pytest.approx(per_word, rel=1e-12)
    # the human corpus has 1 - q of its stories beyond its own q-quantile (ties aside)
    assert abs(fit["tail_fraction"] - 0.1) <= 1 / 400
    capped = source_scores(_corpus(tmp_path / "d", human), grammar, max_documents=160)
    assert capped.log_probs.tolist() == expected[:160]
    # one token per story here, and its closing EOS: two scored tokens a story
    floor = perplexity_floor(_corpus(tmp_path / "e", human), grammar)
    per_token = -sum(expected) / (2 * 400)
    assert floor["validation_source_nll_per_token"] == pytest.approx(per_token, rel=1e-12)
    assert floor["validation_perplexity_floor"] == pytest.approx(math.exp(per_token), rel=1e-12)


def _scores(log_probs: np.ndarray) -> SourceScores:
    n = log_probs.size
    return SourceScores(log_probs, np.ones(n), np.ones(n, bool), np.full(n, 100), np.full(n, ""))


def test_a_corpus_without_the_tails_reads_as_collapsed(grammar, human):
    # keep only the stories the source finds more likely than its median: the tails are gone
    log_probs = np.array([grammar.log_prob(s) for s in human])
    threshold = tail_threshold(log_probs, 0.9)
    fit = fit_summary(_scores(log_probs[log_probs > np.median(log_probs)]), threshold)
    assert fit["valid_fraction"] == 1.0 and fit["tail_fraction"] == 0.0
    assert fit["source_nll"] < -log_probs.mean()  # more likely than the source's own stories


def test_texts_the_source_cannot_write_and_unfinished_stories_are_counted_apart(
    tmp_path, grammar, human
):
    # 6 valid stories; 2 with a word the grammar never uses; 2 cut short (not EOS-ended)
    wrong_at = human[6].index(" ", 40)
    texts = human[:6] + [human[6][:wrong_at] + " zxqv" + human[6][wrong_at:], human[7] + " zxqv"]
    texts += [human[8][: len(human[8]) // 2], human[9][:-1]]
    finished = [True] * 8 + [False] * 2
    scores = source_scores(_corpus(tmp_path / "c", texts, finished), grammar)
    assert np.isfinite(scores.log_probs).tolist() == [True] * 6 + [False] * 4
    # the valid prefix ends at the last word boundary before the departure (or where one of
    # the source's multi-word choices ends): within a few words of it
    written = (scores.prefix_share * [len(t) for t in texts]).round().astype(int)
    assert written[:6].tolist() == [len(t) for t in texts[:6]]
    assert written[7] == len(human[7]) and written[9] <= len(human[9]) - 1
    assert wrong_at - 20 <= written[6] <= wrong_at + 1  # the space before "zxqv" is the source's
    assert len(human[8]) // 2 - 20 <= written[8] <= len(human[8]) // 2
    fit = fit_summary(scores, threshold=math.inf)
    assert fit["valid_fraction"] == 0.6 and fit["valid_finished_fraction"] == 0.75
    assert fit["valid_documents"] == 6 and fit["tail_fraction"] == 0.0
    assert fit["valid_prefix_share"] == pytest.approx(scores.prefix_share.mean())
    # two unknown words (the inserted one, the one after a whole story), two cut stories
    assert fit["departures"] == {
        "unfinished": 0.5,
        "unknown_word": 0.5,
        "misplaced_word": 0.0,
        "punctuation": 0.0,
    }
    assert 0.6 < fit["valid_prefix_share"] < 1.0
    rest = SourceScores(*(getattr(scores, f)[6:] for f in SourceScores.__dataclass_fields__))
    none = fit_summary(rest, threshold=50.0)
    assert none["valid_fraction"] == 0.0 and none["valid_finished_fraction"] == 0.0
    # nothing to average is None, never a number that reads as a measurement
    assert none["source_nll"] is None and none["tail_fraction"] is None
    with pytest.raises(ValueError, match="no document is one the source can produce"):
        tail_threshold(rest.log_probs, 0.9)


def test_where_a_story_departs_from_the_source_is_classified(grammar, human):
    boy = next(s for s in human if " boy named " in s)
    name = boy.split(" boy named ")[1].split(".")[0]
    cases = {
        "misplaced_word": (boy.replace(f" named {name}", " named Layla", 1), True),  # a girl's
        "unknown_word": (boy.replace(f" named {name}", " named Zxqv", 1), True),
        "punctuation": (boy.replace(f" named {name}.", f" named {name}!!", 1), True),
        # cut at max_new_tokens inside a word: the cut, not a wrong word
        "unfinished": (boy[: boy.index(name) + 2], False),
    }
    for kind, (text, finished) in cases.items():
        log_prob, reached = grammar.forward(text)
        assert log_prob == -math.inf, kind
        assert departure_kind(text, reached, finished, grammar.vocabulary) == kind, text[:80]
    # a whole story that stops short of the source's ending is unfinished too, EOS or not
    short = boy[: boy.index(". ") + 1]
    reached = grammar.forward(short)[1]
    assert departure_kind(short, reached, True, grammar.vocabulary) == "unfinished"


def test_it_needs_the_synthetic_corpus(tmp_path):
    data = tiny_config_dict(tmp_path / "x.txt", tmp_path / "artifacts")
    data["eval"] = {"metrics": ["perplexity", "source_fit"]}
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    said = str(err.value)
    assert "eval.metrics: source_fit needs corpus.source: synthetic (the one source whose" in said
    assert "not local; remove source_fit from eval.metrics" in said
    data["corpus"] = {"source": "synthetic"}
    data["eval"]["source_fit"] = {"tail_quantile": 0.8}
    assert validate_config(data).eval.source_fit.tail_quantile == 0.8
    data["eval"]["source_fit"] = {"tail_quantile": 1.0}
    with pytest.raises(ConfigError, match="eval.source_fit.tail_quantile"):
        validate_config(data)


def test_the_stage_reads_each_generation_against_the_human_tail(tmp_path):
    data = tiny_config_dict(tmp_path / "unused.txt", tmp_path / "artifacts", generations=1)
    data["corpus"] = {"source": "synthetic", "num_stories": 120}
    data["sample"].update(num_sequences=40, shard_size=20)
    data["eval"] = {
        "metrics": ["perplexity", "source_fit"],
        "source_fit": {"max_documents": 100},
    }
    config = Config.model_validate(data)
    ctx = Context(config, RunStore(config.run.artifact_root, "fit"), log=lambda _: None)
    freeze_config(ctx)
    assert "eval.source_fit" in stages_of(ctx, 0) and "eval.source_fit" in stages_of(ctx, 1)
    for gen, stage in [(0, "corpus"), (0, "eval.source_fit"), (1, "train"), (1, "sample")]:
        run_stage(ctx, gen, stage)
    human = run_stage(ctx, 0, "eval.source_fit")["info"]
    # no model does better than the source on its own stories (Gibbs): the floor is below
    # generation 1's validation perplexity, and is what the tokenized validation set gives
    floor = perplexity_floor([ctx.store.validation_path()], load_grammar())
    assert human["validation_perplexity_floor"] == floor["validation_perplexity_floor"]
    assert 1.0 < floor["validation_perplexity_floor"]
    perplexity = run_stage(ctx, 1, "eval.perplexity")["info"]["perplexity"]
    assert perplexity > human["validation_perplexity_floor"]
    assert human["valid_fraction"] == human["valid_prefix_share"] == 1.0
    assert human["documents"] == 100
    assert human["tail_quantile"] == 0.9 and human["grammar"] == load_grammar().version
    # Stories of at most 48 new tokens are shorter than any the source writes (85 words and
    # more in 5,000 of them), so none is valid: the share says so, the averages are absent
    # rather than 0, and the threshold is the human corpus's.
    model = run_stage(ctx, 1, "eval.source_fit")["info"]
    assert model["documents"] == 40 and model["valid_fraction"] == 0.0
    assert 0.0 <= model["valid_prefix_share"] < 1.0
    assert model["source_nll"] is None and model["tail_threshold"] == human["tail_threshold"]
    assert run_stage(ctx, 1, "eval.source_fit")["reused"] is True
    # the table's KL/tok: generation 1's validation NLL per token over the source's own
    rows = metrics_table(ctx)
    nll = ctx.store.read_record(1, "eval.perplexity")["info"]["nll"]
    excess = nll - human["validation_source_nll_per_token"]
    assert rows[0]["excess_nll"] is None and rows[1]["excess_nll"] == pytest.approx(excess)
    assert excess == pytest.approx(math.log(perplexity / human["validation_perplexity_floor"]))
    assert excess > 0
    # the report draws its figure and table columns from the records
    page = write_report([ctx.store.run_dir]).read_text()
    png = (ctx.store.run_dir / "figures" / "source-fit.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "src-prefix" in page and "src-valid" in page
    assert "Where stories depart from the source" in page  # generation 1's 40 departures
    assert sum(model["departures"].values()) == pytest.approx(1.0)
