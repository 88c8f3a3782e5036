"""Downstream fine-tuning: tasks as data, probes, the classifier, the stage, its errors."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from collapse.config import Config, ConfigError, ModelConfig, validate_config
from collapse.context import Context, load_run_tokenizer
from collapse.downstream import finetune
from collapse.downstream.data import (
    DownstreamTaskError,
    Examples,
    load_task,
    preview_problems,
)
from collapse.downstream.finetune import SequenceClassifier, encode, length_batches, scores
from collapse.downstream.probes import (
    acceptability,
    coherence,
    sentences,
    split_stories,
    swap_two_words,
    word_order,
)
from collapse.downstream.tasks import task_spec
from collapse.models import build_model
from collapse.pipeline import freeze_config, metrics_table, run_stage, stages_of
from collapse.store import RunStore
from collapse.tokenizer import special_ids

from .conftest import tiny_config_dict, write_story_file
from .test_user_errors import _collapse as collapse_cli

STAGE = "eval.downstream/word_order"


def downstream_config(root: Path, corpus: Path, **downstream) -> dict:
    """A tiny run whose model learns the template stories well enough to show downstream signal."""
    data = tiny_config_dict(corpus, root, generations=1)
    data["corpus"]["validation_fraction"] = 0.3  # the probes are built from validation stories
    data["train"].update(epochs=12, lr=3e-3)
    data["eval"] = {
        "metrics": ["downstream"],
        "downstream": {
            "tasks": ["word_order"],
            "lr": 1e-3,
            "task_table": {"word_order": {"epochs": 2}},
            **downstream,
        },
    }
    return data


def _varied_stories(path: Path, n: int, seed: int = 0) -> Path:
    """Template stories whose sentences rarely repeat (names, things and colours combined), so
    a probe's evaluation split, which leaves out every sentence its train split holds, keeps
    most of its sentences: held-out sentences of a structure the model has learned."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Zoe", "Leo", "Ivy", "Jack", "Ella"]
    things = ["ball", "cat", "dog", "kite", "boat", "hat", "cup", "book", "drum", "bike", "doll"]
    colours = ["red", "blue", "green", "big", "small", "old", "new", "soft", "shiny", "little"]
    stories = []
    for _ in range(n):
        name, friend = rng.sample(names, 2)
        thing, colour = rng.choice(things), rng.choice(colours)
        stories.append(
            f"Once upon a time, {name} had a {colour} {thing}. {name} and {friend} played "
            f"with the {thing}. One day, the {colour} {thing} was lost. {name} asked {friend} "
            f"for help. Then {friend} found the {thing} and {name} was happy. The end."
        )
    path.write_text("\n\n".join(stories) + "\n")
    return path


@pytest.fixture(scope="module")
def downstream_run(tmp_path_factory) -> Iterator[Context]:
    """Generation 0 (human corpus, baseline fine-tune) and 1 (trained, fine-tuned), no sampling."""
    tmp = tmp_path_factory.mktemp("downstream")
    data = downstream_config(tmp / "artifacts", _varied_stories(tmp / "stories.txt", n=300))
    config = Config.model_validate(data)
    ctx = Context(config, RunStore(config.run.artifact_root, "ds"), log=lambda _: None)
    freeze_config(ctx)
    for gen, stage in [(0, "corpus"), (0, STAGE), (1, "train"), (1, STAGE)]:
        run_stage(ctx, gen, stage)
    yield ctx


def _result(ctx: Context, gen: int, task: str = "word_order") -> dict:
    return json.loads((ctx.store.eval_dir(gen) / "downstream" / f"{task}.json").read_text())


# --- what a researcher reads ---------------------------------------------------------------


def test_a_trained_model_learns_a_probe_task_that_the_baseline_does_not(downstream_run: Context):
    trained, baseline = _result(downstream_run, 1), _result(downstream_run, 0)
    assert trained["generation"] == 1 and baseline["baseline"] and not trained["baseline"]
    assert trained["eval_examples"] >= 80  # enough that 0.15 above chance is not luck
    assert trained["majority_rate"] == pytest.approx(0.5, abs=0.06)  # balanced by construction
    assert trained["accuracy"] > max(0.5, trained["majority_rate"]) + 0.15
    assert trained["accuracy"] > baseline["accuracy"] + 0.1
    for key in ("f1_weighted", "f1_macro", "mcc", "steps", "train_examples", "truncated"):
        assert key in trained


def test_the_table_has_a_column_per_task_metric_and_the_baseline_in_row_0(downstream_run):
    rows = metrics_table(downstream_run)
    assert rows[0]["word_order_acc"] == _result(downstream_run, 0)["accuracy"]
    assert rows[1]["word_order_f1"] == _result(downstream_run, 1)["f1_weighted"]


def test_the_baseline_is_computed_once_and_reused(downstream_run: Context, tmp_path, monkeypatch):
    ctx = downstream_run
    before = ctx.store.read_manifest(0)["stages"][STAGE]
    again = run_stage(ctx, 0, STAGE)
    assert again["reused"] and again["completed_at"] == before["completed_at"]
    # Another run under the same root (other training, same architecture, seed and corpus)
    # takes the baseline's fine-tune from it instead of fine-tuning again.
    data = downstream_config(Path(ctx.config.run.artifact_root), Path(ctx.config.corpus.path))
    data["train"]["lr"] = 1e-3
    other = Context(Config.model_validate(data), RunStore(ctx.config.run.artifact_root, "ds2"))
    freeze_config(other)
    run_stage(other, 0, "corpus")
    monkeypatch.setattr(
        finetune, "fine_tune", lambda *a, **k: pytest.fail("the baseline was fine-tuned again")
    )
    shared = run_stage(other, 0, STAGE)
    assert shared["copied_from"] == "ds" and shared["info"] == before["info"]
    assert [s for s in stages_of(other, 1) if s.startswith("eval.downstream")] == [STAGE]
    shutil.rmtree(other.store.run_dir)


def test_generations_default_to_those_judged():
    data = {"model": {"preset": "tinystories-1m"}, "eval": {"metrics": ["downstream"]}}
    data["eval"]["judge"] = {"generations": [1, 3]}
    config = validate_config(data)
    ctx = Context(config, RunStore("/nonexistent", "x"))
    assert [g for g in range(5) if any("downstream" in s for s in stages_of(ctx, g))] == [0, 1, 3]
    data["eval"]["downstream"] = {"generations": [2]}
    ctx = Context(validate_config(data), RunStore("/nonexistent", "x"))
    assert [g for g in range(5) if any("downstream" in s for s in stages_of(ctx, g))] == [0, 2]
    paper = stages_of(ctx, 2)[-8:]
    assert paper == [f"eval.downstream/{t}" for t in config.eval.downstream.tasks]


# --- tasks as data ---------------------------------------------------------------------------


def _glue_like(folder: Path, rows: int = 40) -> Path:
    """A local folder laid out like the hub's nyu-mll/glue: <config>/<split>-*.parquet + card."""
    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    for split, n in [("train", rows), ("validation", rows // 2)]:
        (folder / "sst2").mkdir(parents=True, exist_ok=True)
        sentences_ = [" ".join(rng.choice(words) for _ in range(5)) for _ in range(n)]
        table = pa.table(
            {"sentence": sentences_, "label": [i % 2 for i in range(n)], "idx": list(range(n))}
        )
        pq.write_table(table, folder / "sst2" / f"{split}-00000-of-00001.parquet")
    card = {
        "configs": [
            {
                "config_name": "sst2",
                "data_files": [
                    {"split": "train", "path": "sst2/train-*"},
                    {"split": "validation", "path": "sst2/validation-*"},
                ],
            }
        ]
    }
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    return folder


def test_a_hub_task_reads_a_local_copy_laid_out_like_the_hub(downstream_run, tmp_path):
    glue = _glue_like(tmp_path / "glue")
    overrides = {"sst2": {"dataset": str(glue)}}
    train, held = load_task("sst2", task_spec("sst2", overrides), lambda: [], seed=0)
    assert (len(train), len(held)) == (40, 20) and train.labels[:3] == [0, 1, 0]
    # ... and through the stage, in a run: the result names the split and the caps.
    data = yaml.safe_load(downstream_run.store.config_path.read_text())
    data["eval"]["downstream"].update(
        tasks=["sst2"], task_table=overrides, max_train_examples=16, max_eval_examples=10
    )
    ctx = Context(Config.model_validate(data), downstream_run.store, log=lambda _: None)
    record = run_stage(ctx, 1, "eval.downstream/sst2")
    info = record["info"]
    assert info["eval_split"] == "validation" and info["available_examples"] == {
        "train": 40,
        "eval": 20,
    }
    assert (info["train_examples"], info["eval_examples"]) == (16, 10)
    assert (info["max_train_examples"], info["max_eval_examples"]) == (16, 10)
    assert (downstream_run.store.eval_dir(1) / "downstream" / "sst2.json").is_file()


def test_a_hub_task_that_cannot_be_fetched_says_how_to_use_a_local_copy(tmp_path):
    spec = task_spec("sst2", {"sst2": {"dataset": str(tmp_path / "no-such-glue")}})
    with pytest.raises(DownstreamTaskError) as err:
        load_task("sst2", spec, lambda: [], seed=0)
    assert "task 'sst2'" in str(err.value)
    assert "eval.downstream.task_table.sst2.dataset=" in str(err.value)


def test_a_missing_column_names_the_columns_there_are(tmp_path):
    glue = _glue_like(tmp_path / "glue")
    spec = task_spec("sst2", {"sst2": {"dataset": str(glue), "text": ["text"]}})
    with pytest.raises(DownstreamTaskError, match=r"no column\(s\) \['text'\].*sentence, label"):
        load_task("sst2", spec, lambda: [], seed=0)


def test_local_data_files_with_csv(tmp_path):
    for split, n in [("train", 6), ("dev", 4)]:
        lines = ["a,b,y"] + [f"first {i},second {i},{i % 3}" for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    entry = {
        "source": "local",
        "data_files": {"train": str(tmp_path / "train.csv"), "dev": str(tmp_path / "dev.csv")},
        "eval_split": "dev",
        "text": ["a", "b"],
        "label": "y",
        "num_labels": 3,
    }
    train, held = load_task("pairs", task_spec("pairs", {"pairs": entry}), lambda: [], seed=0)
    assert train.texts[1] == ("first 1", "second 1") and held.labels == [0, 1, 2, 0]


def test_unknown_tasks_and_bad_table_entries_are_config_errors():
    with pytest.raises(ConfigError) as err:
        validate_config({"eval": {"downstream": {"tasks": ["sst2", "nope"]}}})
    assert "eval.downstream.tasks: unknown task(s) ['nope']; known: sst2, qqp" in str(err.value)
    assert "word_order" in str(err.value)
    table = {"mine": {"text": ["s"]}, "sst2": {"num_labels": 0}}
    with pytest.raises(ConfigError) as err:
        validate_config({"eval": {"downstream": {"task_table": table}}})
    assert "eval.downstream.task_table.mine.source: Field required" in str(err.value)
    assert "eval.downstream.task_table.sst2.num_labels" in str(err.value)


def test_labels_outside_the_classes_are_refused(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"s": "x", "y": 0}\n{"s": "z", "y": -1}\n')
    files = {"train": str(tmp_path / "t.jsonl"), "validation": str(tmp_path / "t.jsonl")}
    spec = task_spec(
        "t", {"t": {"source": "local", "data_files": files, "text": ["s"], "label": "y"}}
    )
    with pytest.raises(DownstreamTaskError, match="hides test labels"):
        load_task("t", spec, lambda: [], seed=0)


@pytest.mark.parametrize("label", ['"positive"', "0.6"])
def test_labels_that_are_not_integers_are_refused(tmp_path, label: str):
    # a class name, or a score (STS-B's similarity) that int() would silently truncate
    (tmp_path / "t.jsonl").write_text(f'{{"s": "x", "y": 1.0}}\n{{"s": "z", "y": {label}}}\n')
    files = {"train": str(tmp_path / "t.jsonl"), "validation": str(tmp_path / "t.jsonl")}
    spec = task_spec(
        "t", {"t": {"source": "local", "data_files": files, "text": ["s"], "label": "y"}}
    )
    with pytest.raises(DownstreamTaskError, match="column 'y' holds labels that are not integers"):
        load_task("t", spec, lambda: [], seed=0)


def test_a_preview_of_local_task_data_finds_what_the_stage_would_refuse(tmp_path):
    glue = _glue_like(tmp_path / "glue")

    def preview(fields: dict) -> list[str]:
        return preview_problems("sst2", task_spec("sst2", {"sst2": fields}))

    assert preview({"dataset": str(glue)}) == []
    typo = preview({"dataset": str(glue), "text": ["txt"]})
    assert [p.split(" has no")[0] for p in typo] == [
        "eval.downstream: task 'sst2': split 'train'",
        "eval.downstream: task 'sst2': split 'validation'",
    ]
    assert "(columns: sentence, label, idx)" in typo[0]
    labels = preview({"dataset": str(glue), "num_labels": 1})
    assert len(labels) == 2 and all("has labels [1] outside 0..0;" in p for p in labels)
    assert preview({"dataset": str(tmp_path / "gleu")}) == [
        f"eval.downstream.task_table.sst2.dataset: '{tmp_path / 'gleu'}' is not a folder "
        "(a local copy must be a folder laid out like the hub repository)"
    ]
    assert preview({}) == []  # a hub id is fetched by the stage, not by a config check
    files = {"train": str(tmp_path / "train.csv"), "validation": str(glue / "none.parquet")}
    (tmp_path / "train.csv").write_text("sentence,label\ngood,1\n")
    (missing,) = preview({"source": "local", "data_files": files})
    assert missing.startswith("eval.downstream.task_table.sst2.data_files.validation: cannot read")


def test_a_wrong_column_in_local_task_data_stops_collapse_run_before_it_starts(tmp_path):
    glue = _glue_like(tmp_path / "glue")
    root = tmp_path / "artifacts"
    data = downstream_config(root, write_story_file(tmp_path / "stories.txt", n=20))
    data["eval"]["downstream"].update(
        tasks=["word_order", "sst2"], task_table={"sst2": {"dataset": str(glue), "text": ["txt"]}}
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    home = tmp_path / "prefect-home"
    home.mkdir()
    proc = collapse_cli(home, "run", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("collapse: error: invalid config:\n")
    assert "task 'sst2': split 'train' has no column(s) ['txt']" in proc.stderr
    assert not root.exists()  # nothing started: no run folder, no Prefect server


# --- probes ---------------------------------------------------------------------------------


def _stories(n: int = 40) -> list[str]:
    from collapse.corpus.synthetic import generate_stories

    return generate_stories(n, seed=3)


@pytest.mark.parametrize("build", [acceptability, word_order, coherence])
def test_probes_are_balanced_seeded_and_split_by_story(build):
    train_stories, eval_stories = split_stories(_stories(), seed=1)
    assert not set(train_stories) & set(eval_stories) and len(eval_stories) == 10
    texts, labels = build(train_stories, 5)
    assert abs(Counter(labels)[1] - Counter(labels)[0]) <= 1 and len(labels) > 100
    assert build(train_stories, 5) == (texts, labels)
    assert build(train_stories, 6) != (texts, labels)
    # The evaluation examples are made of the evaluation stories' sentences only.
    eval_texts, eval_labels = build(eval_stories, 5)
    held = {s for story in eval_stories for s in sentences(story)}
    for texts_, label in zip(eval_texts, eval_labels, strict=True):
        if label == 1 or build is coherence:
            assert set(texts_) <= held


def test_a_swap_keeps_the_words_and_the_sentence_frame():
    rng = random.Random(0)
    sentence = "One day, Tom saw a big red ball in the park."
    for _ in range(20):
        swapped = swap_two_words(sentence, rng)
        assert swapped != sentence and swapped.startswith("One ") and swapped.endswith(".")
        assert sorted(swapped.rstrip(".").split()) == sorted(sentence.rstrip(".").split())
        diff = [a != b for a, b in zip(swapped.split(), sentence.split(), strict=True)]
        assert sum(diff) == 2
    assert swap_two_words("Too short.", rng) is None


def test_coherence_pairs_follow_or_come_from_another_story():
    stories = [sentences(story) for story in _stories(12)]
    pairs, labels = coherence(_stories(12), 0)
    starts = [(k, i) for k, story in enumerate(stories) for i in range(len(story) - 1)]
    assert len(pairs) == len(starts)
    for (first, second), label, (k, i) in zip(pairs, labels, starts, strict=True):
        assert first == stories[k][i]
        if label == 1:
            assert second == stories[k][i + 1]
        else:
            assert any(second in story for j, story in enumerate(stories) if j != k)


# --- the classifier -------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["transformers", "fast"])
def test_padding_and_batching_never_change_a_logit(implementation):
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        max_position_embeddings=64,
        window_size=4,  # shorter than the rows: the local layers' window is exercised
        implementation=implementation,
    )
    model = build_model(cfg, vocab_size=50, start_id=0, end_id=0, seed=3).eval()
    classifier = SequenceClassifier(model, 3, seed=1).eval()
    rows = [[0, 5, 7, 9, 11, 13, 2, 4, 6], [0, 3], [0, 8, 8, 8, 1, 2]]
    data = finetune.Encoded([np.asarray(r) for r in rows], np.zeros(3, dtype=np.int64), 0)
    with torch.no_grad():
        ids, lengths, _ = finetune.collate(data, np.arange(3), 0, torch.device("cpu"))
        batched = classifier(ids, lengths)
        for k, row in enumerate(rows):
            alone = classifier(torch.tensor([row]), torch.tensor([len(row)]))
            torch.testing.assert_close(batched[k], alone[0], rtol=1e-5, atol=1e-5)


def test_the_classifier_computes_what_transformers_sequence_classification_does():
    from transformers import GPTNeoForSequenceClassification

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    end = 49
    model = build_model(cfg, vocab_size=50, start_id=end, end_id=end, seed=3).eval()
    ours = SequenceClassifier(model, 2, seed=1).eval()
    config = model.config.to_dict() | {"num_labels": 2, "pad_token_id": end}
    reference = GPTNeoForSequenceClassification(type(model.config).from_dict(config)).eval()
    reference.transformer.load_state_dict(model.transformer.state_dict())
    reference.score.load_state_dict(ours.score.state_dict())
    rows = [[end, 5, 7, 9, 11], [end, 3, 4]]  # pad = EOS = the start token, right-padded
    ids = torch.tensor([rows[0], [*rows[1], end, end]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours(ids, torch.tensor([5, 3]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_pair_is_joined_by_the_separator_after_the_start_token(downstream_run: Context):
    tokenizer = load_run_tokenizer(downstream_run)
    start, _ = special_ids(tokenizer)
    examples = Examples([("Tom had a ball.", "The end.")], [1])
    encoded = encode(tokenizer, examples, start, " || ", max_length=64)
    ids = encoded.ids[0].tolist()
    assert ids[0] == start and tokenizer.decode(ids[1:]) == "Tom had a ball. || The end."
    first = tokenizer("Tom had a ball.", add_special_tokens=False)["input_ids"]
    sep = tokenizer(" ||", add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(first) + len(sep)] == first + sep
    cut = encode(tokenizer, examples, start, " || ", max_length=4)
    assert len(cut.ids[0]) == 4 and cut.truncated == 1


def test_length_batches_cover_every_example_once_and_bucket_by_length():
    lengths = [random.Random(k).randrange(1, 300) for k in range(1000)]
    batches = length_batches(lengths, 8, np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000)) and max(len(b) for b in batches) == 8
    spread = np.mean([np.ptp(np.asarray(lengths)[b]) for b in batches])
    assert spread < 20  # unbucketed batches of 8 spread ~230 tokens
    again = length_batches(lengths, 8, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    ordered = length_batches(lengths, 32, None)
    assert np.all(np.diff([lengths[i] for b in ordered for i in b]) >= 0)


def test_scores_on_known_predictions():
    labels = np.array([1, 1, 1, 0])
    always_one = scores(labels, np.array([1, 1, 1, 1]), majority=1)
    assert always_one["accuracy"] == 0.75 and always_one["majority_rate"] == 0.75
    assert always_one["mcc"] == 0.0
    assert always_one["f1_macro"] == pytest.approx((0.0 + 2 * 0.75 / 1.75) / 2)
    assert always_one["f1_weighted"] == pytest.approx(0.75 * 2 * 0.75 / 1.75)
    perfect = scores(labels, labels, majority=1)
    assert perfect["accuracy"] == perfect["f1_weighted"] == perfect["mcc"] == 1.0


def test_building_a_classifier_draws_nothing_from_the_global_rng():
    # A pipelined run fine-tunes generation n while generation n+1's model is built inside a
    # seeded block in another thread: a draw from the global generator here changed that
    # model's initial weights (seen as a pipelined demo diverging from an unpipelined one).
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    model = build_model(cfg, vocab_size=50, start_id=0, end_id=0, seed=3)
    before = torch.get_rng_state()
    head = SequenceClassifier(model, 3, seed=1).score.weight
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(head, SequenceClassifier(model, 3, seed=1).score.weight)  # seeded


def test_a_probe_never_scores_what_it_was_fine_tuned_on():
    """Stories share sentences (the synthetic grammar repeats some verbatim): the evaluation
    split leaves out every sentence, or pair of consecutive sentences, the train split holds."""
    rng = random.Random(0)
    shared = ["Once upon a time there was a dog.", "The dog liked to play outside."]
    stories = [
        " ".join([*shared, f"It found a {rng.choice(['ball', 'stick', 'hat'])} number {i} today."])
        for i in range(40)
    ]
    for probe in ("word_order", "coherence"):
        train, held = load_task(probe, task_spec(probe, {}), lambda: stories, seed=3)
        assert len(held) > 0 and sum(held.labels) * 2 == len(held)  # still balanced
        if probe == "word_order":
            assert not {t for t, y in zip(train.texts, train.labels, strict=True) if y} & {
                t for t, y in zip(held.texts, held.labels, strict=True) if y
            }
            assert not any(shared[0] in text for (text,) in held.texts)
        else:
            positives = {t for t, y in zip(train.texts, train.labels, strict=True) if y}
            assert tuple(shared) in positives
            assert tuple(shared) not in held.texts
