"""Users' cached work survives refactors: the stage keys and run ids of shipped configs are pinned.

The keys below were computed by the code at 79ec5e2 (before the extension-point refactor) over
manifests with fixed, fake parent digests. A change that alters one of them invalidates every
user's finished stages of that kind: bump the stage's version on purpose instead, and say so.
They hold under the defaults of that time (`EARLIER`); runs started then resume under them
(`collapse.started`, tested below), while today's defaults name new runs (`TODAY_RUN_IDS`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from collapse.config import config_hash, config_to_dict, load_config, run_id_for
from collapse.context import Context
from collapse.pipeline import earlier_stage_keys, stage_key, stages_of
from collapse.store import RunStore, atomic_write_json

from .conftest import EARLIER_DEFAULTS, REPO, mark_started

DEMO_KEYS = {
    "0/corpus": "bca7beee22943214092e8be55efb483145c6772fdd493aa1d74a81819607e1af",
    "1/train": "75dc68c69fbf85253e75267adee913864cd6e1b99d771be1e3ffb5bb02e8d6e2",
    "1/sample": "0bc07c442f17c189118171940ca206946cec440b39e8874f95aed6bad3344626",
    "2/train": "57ce26539d126413319da37dc01773969b00bcb92cc10b31d373c65b105546bc",
    "2/sample": "375af91f56be7fe1ac35792240e262bc273063133d55e52e1f601c86aa92b9f5",
    "0/eval.entropy": "d972edff349013bab3503ac9ecbd27861458d8fe1d166c9ad5286ec5241daef4",
    "0/eval.oov": "0b06400b6bdb392bf2ef6c1edef1495061da4446bc76223f488ed67424ce88de",
    "0/eval.diversity": "4d42f899c8b9cec7f7cbfc0e640d05fceb7558a1cb334acd37e82875dbc798cc",
    "0/eval.excerpts": "b372a93b55e6be28ceeb83a3572a8039cda02d09fafab77f96a46fc9ad2ff6c1",
    "0/eval.judge": "624d5a9dd4031c3a80b965972a4f6945ce59e2348d99867537cf23d7ec5da940",
    "1/eval.perplexity": "75e31b46ebba8b8b8f92ea2bf79f0f7e4ca38d289b3a398b1847dd9024e153eb",
    "1/eval.entropy": "f62f106405652ea11c3ff96edb5755cf76abc443a06a4654af7c48884b5540fb",
    "1/eval.oov": "27a3246aff16555a1654e65f35cbb18e5f4494edb8878ff76733280200e316b5",
    "1/eval.diversity": "970e362713d9bfee31e40d0eb9ac82a8c7c3c383bd9814eacf7fb1c370becd1c",
    "1/eval.excerpts": "a6be0c6ca2e1a1cfcab7151b63be9ae7362cfdf0aa31f0508eccaff5b9c9e813",
    "1/eval.judge": "4c25f04f99c9347a3893952c3daf67881664bcc959e8c09c1075d318afc57963",
    "2/eval.perplexity": "502efc0d99828f40f92e7d6d8dbc7c7f6f6a66fda60c292a405d2c65fcdead43",
}
# Evaluations added since, pinned from the commit that added them.
ADDED_KEYS = {  # source_fit, 2026-12-07
    "0/eval.source_fit": "336f60accb2fe976b759c4d338252e10d53ce1fbc6c0579281d0d1a88e62ace8",
    "1/eval.source_fit": "857320392a30cc4903c01b95ecd35ab56245edd18ae4992d13006ba4caf79d30",
    "2/eval.source_fit": "bed534a7ea6e9c013417951b255c4db38ccaac40dfdca7b4d64c5c90519f5aad",
    # downstream, 2026-12-07, at version 2 (probe evaluation splits leave out what their
    # train splits hold), a task's description (words for tables) no longer in its key
    "0/eval.downstream/word_order": (
        "6e5ccc79756a076d6cd5418b1d7f11a262c11674483156e5d02822bb6db8dddd"
    ),
    "0/eval.downstream/coherence": (
        "e0f1fb905e40ccd05e725109d4a72a14b3a9065b6b55fa3ceb1f0c4dbbe4180b"
    ),
    "1/eval.downstream/word_order": (
        "d6ab60d22c67da8f7a83b35d0f82c4fc350b31cb6111f0c1a4e63e0c2206dee8"
    ),
    "1/eval.downstream/coherence": (
        "03b1ed3bd304d40ff96e3b9a0334a42589d864d15d034996b0f91dd6d1568296"
    ),
}
# Keys whose formula changed without changing the result; the pins above stay accepted
# (`Evaluation.earlier_key_parts`), so no finished work is recomputed.
REKEYED = {  # judge, 2026-12-07: eval.judge.generations left the key
    "0/eval.judge": "3ccdd900ec9c5e2137d1b8860c42fc53f24743f72f4837946c8cca982b376c15",
    "1/eval.judge": "9695d44c127a9b0fd64afc79b10e7753c6223c573424c8e76c2b543a5fe144e0",
}
RUN_IDS = {"demo.yaml": "demo-9af23572f8", "paper-33m.yaml": "paper-33m-a8eb729f88"}
EARLIER = EARLIER_DEFAULTS
PAPER_33M_TRAIN_1 = "4e45b9ca596f01fb413ac531640eb193bcf37ec8c965e796a1aef878e92387c8"


def _context(config_name: str, root: Path, overrides: tuple[str, ...] = tuple(EARLIER)) -> Context:
    """A run whose manifests hold fixed digests: keys then depend on the key code alone."""
    store = RunStore(root, "pinned")
    for gen in range(0, 3):
        stages = {
            stage: {"key": "k", "outputs": {}, "digest": f"{gen}-{stage}-digest", "info": {}}
            for stage in ("corpus", "train", "sample", "eval.oov", "eval.source_fit")
        }
        atomic_write_json(store.manifest_path(gen), {"generation": gen, "stages": stages})
    config = load_config(REPO / "configs" / config_name, list(overrides))
    return Context(config, store, log=lambda _: None)


def _accepted_keys(ctx: Context) -> dict[str, str]:
    """Stage -> the key its record may carry: today's, or an earlier formula's where one of
    those is pinned (so a rekeyed stage is compared against its pin)."""
    pinned = DEMO_KEYS | ADDED_KEYS
    keys = {}
    for gen in (0, 1, 2):
        for stage in stages_of(ctx, gen):
            name, accepted = f"{gen}/{stage}", [stage_key(ctx, gen, stage)]
            accepted += earlier_stage_keys(ctx, gen, stage)
            keys[name] = pinned[name] if pinned.get(name) in accepted else accepted[0]
    return keys


def test_demo_stage_keys_are_those_of_earlier_releases(tmp_path: Path):
    ctx = _context("demo.yaml", tmp_path)
    keys = _accepted_keys(ctx)
    assert {k: keys[k] for k in DEMO_KEYS} == DEMO_KEYS
    assert {k: keys[k] for k in ADDED_KEYS} == ADDED_KEYS
    assert {k: stage_key(ctx, int(k.split("/")[0]), k.split("/", 1)[1]) for k in REKEYED} == REKEYED
    assert config_hash(ctx.config).startswith(RUN_IDS["demo.yaml"].split("-")[-1])


def test_a_record_under_an_earlier_key_is_reused_rekeyed_and_stays_valid(tmp_path: Path):
    """A judge record made when its key held eval.judge.generations: reused (not graded
    again), recorded under today's key, and still valid after judging another generation."""
    from collapse.pipeline import run_stage, valid_record

    ctx = _context("demo.yaml", tmp_path)
    store = ctx.store
    made = {"key": DEMO_KEYS["1/eval.judge"], "outputs": {}, "digest": "d", "info": {"n": 1}}
    with store.manifest_update(1):
        manifest = store.read_manifest(1)
        manifest["stages"]["eval.judge"] = made
        atomic_write_json(store.manifest_path(1), manifest)
    assert valid_record(ctx, 1, "eval.judge") == made  # `collapse status` counts it done
    ran = run_stage(ctx, 1, "eval.judge")
    assert ran["reused"] and ran["info"] == {"n": 1} and ran["key"] == REKEYED["1/eval.judge"]
    assert store.read_record(1, "eval.judge")["key"] == REKEYED["1/eval.judge"]
    judged = [*EARLIER, "eval.judge.generations=[1, 2]"]
    more = Context(load_config(REPO / "configs" / "demo.yaml", judged), store, log=print)
    assert run_stage(more, 1, "eval.judge")["reused"]


@pytest.mark.parametrize("name", sorted(RUN_IDS))
def test_run_ids_are_those_of_earlier_releases(name: str):
    assert run_id_for(load_config(REPO / "configs" / name, EARLIER)) == RUN_IDS[name]


def test_paper_train_key_is_that_of_earlier_releases(tmp_path: Path):
    assert stage_key(_context("paper-33m.yaml", tmp_path), 1, "train") == PAPER_33M_TRAIN_1


def test_an_added_key_at_its_neutral_value_changes_no_hash_and_another_value_does():
    from collapse.config import without_neutral

    config = load_config(REPO / "configs" / "demo.yaml", EARLIER)
    assert run_id_for(config) == RUN_IDS["demo.yaml"]
    model = config.model_dump(mode="json")["model"]
    assert "implementation" not in without_neutral("model", model)
    assert "implementation" in without_neutral("model", {**model, "implementation": "fast"})


# Today's defaults (model.implementation: fast, sample.rng: story, sample.precision: auto) name
# new runs.
TODAY_RUN_IDS = {"demo.yaml": "demo-817c005737", "paper-33m.yaml": "paper-33m-6236c66994"}


@pytest.mark.parametrize("name", sorted(TODAY_RUN_IDS))
def test_run_ids_under_todays_defaults_are_pinned(name: str):
    assert run_id_for(load_config(REPO / "configs" / name)) == TODAY_RUN_IDS[name]


def test_a_sibling_record_under_an_earlier_key_is_taken_under_todays(tmp_path: Path):
    """share_across_runs: a sweep arm takes a sibling's judge record made under the earlier
    formula instead of grading again, and records it under today's key."""
    from collapse.pipeline import run_stage

    sibling = _context("demo.yaml", tmp_path)
    sibling.store.write_run_file(sibling.store.config_path, b"run: {}\n")  # a run, to siblings
    made = {"key": DEMO_KEYS["1/eval.judge"], "outputs": {}, "digest": "d", "info": {"n": 1}}
    with sibling.store.manifest_update(1):
        manifest = sibling.store.read_manifest(1)
        manifest["stages"]["eval.judge"] = made
        atomic_write_json(sibling.store.manifest_path(1), manifest)
    mine = RunStore(tmp_path, "mine")
    for gen in (0, 1):
        kept = sibling.store.read_manifest(gen)
        kept["stages"].pop("eval.judge", None)
        atomic_write_json(mine.manifest_path(gen), kept)
    ctx = Context(sibling.config, mine, log=print)
    taken = run_stage(ctx, 1, "eval.judge")
    assert taken["reused"] and taken["copied_from"] == "pinned" and taken["info"] == {"n": 1}
    assert mine.read_record(1, "eval.judge")["key"] == REKEYED["1/eval.judge"]


def test_todays_defaults_change_only_the_sample_keys(tmp_path: Path):
    """The implementation is in no stage key (it computes the same function); the story rng
    draws other tokens, so the sample stages, and only they, have other keys."""
    ctx = _context("demo.yaml", tmp_path, ())
    keys = _accepted_keys(ctx)
    pinned = DEMO_KEYS | ADDED_KEYS
    differing = sorted(k for k in pinned if keys[k] != pinned[k])
    assert differing == ["1/sample", "2/sample"]


def test_a_run_started_under_the_earlier_defaults_resumes_as_it_was_started(tmp_path: Path):
    from collapse.started import as_started

    root = [f"run.artifact_root={tmp_path}"]
    today = load_config(REPO / "configs" / "demo.yaml", root)
    assert as_started(today) == (today, None)  # nothing started: today's defaults
    mark_started(load_config(REPO / "configs" / "demo.yaml", root + EARLIER))
    config, note = as_started(today)
    assert run_id_for(config) == RUN_IDS["demo.yaml"]
    assert (config.model.implementation, config.sample.rng) == ("transformers", "shard")
    assert note == (
        f"run {RUN_IDS['demo.yaml']} was started before today's defaults: it resumes as started "
        "(model.implementation=transformers, sample.rng=shard, sample.precision=fp32); to use "
        "today's defaults instead, set model.implementation=fast sample.rng=story "
        "sample.precision=auto"
    )
    # A key set explicitly is what the user asked for: only the keys left unset are looked up.
    for explicit in ("sample.rng=story", "model.implementation=fast"):
        asked = load_config(REPO / "configs" / "demo.yaml", [*root, explicit])
        assert as_started(asked) == (asked, None)
    asked = load_config(REPO / "configs" / "demo.yaml", [*root, "sample.rng=shard"])
    assert run_id_for(as_started(asked)[0]) == RUN_IDS["demo.yaml"]
    # Once a run with today's defaults exists, it is the one resumed.
    mark_started(today)
    assert as_started(today) == (today, None)


def test_a_named_run_started_under_the_earlier_defaults_resumes_as_it_was_started(tmp_path):
    from collapse.started import as_started

    named = [f"run.artifact_root={tmp_path}", "run.run_id=mine"]
    mark_started(load_config(REPO / "configs" / "demo.yaml", named + EARLIER))
    config, note = as_started(load_config(REPO / "configs" / "demo.yaml", named))
    assert (run_id_for(config), config.sample.rng) == ("mine", "shard")
    assert note is not None and note.startswith("run mine was started before today's defaults")


def test_collapse_run_and_submit_say_they_resume_a_run_under_the_earlier_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from flows.cli import checked_config

    root = [f"run.artifact_root={tmp_path}"]
    mark_started(load_config(REPO / "configs" / "demo.yaml", root + EARLIER))
    config = checked_config(str(REPO / "configs" / "demo.yaml"), root, "a sweep")
    assert not isinstance(config, str) and run_id_for(config) == RUN_IDS["demo.yaml"]
    said = capsys.readouterr().out
    assert said.startswith(f"run {RUN_IDS['demo.yaml']} was started before today's defaults")


def test_performance_settings_change_no_run_id_and_no_key(tmp_path: Path):
    """sample.slots sizes the pool to the device: the corpus is the same (each story draws its
    own randomness, tests/test_slot_sampler.py); sample.cuda_graphs replays the same kernels
    and train.compile runs other kernels for the same function (tests/test_train.py). A run
    can change any of them and stay the same run."""
    ctx = _context("demo.yaml", tmp_path, ())
    keys = {f"{g}/{s}": stage_key(ctx, g, s) for g in (0, 1, 2) for s in stages_of(ctx, g)}
    sized = _context(
        "demo.yaml",
        tmp_path / "sized",
        ("sample.slots=1024", "sample.cuda_graphs=true", "train.compile=true"),
    )
    assert sized.config.sample.slots == 1024 and sized.config.train.compile
    assert sized.config.sample.cuda_graphs
    assert {
        f"{g}/{s}": stage_key(sized, g, s) for g in (0, 1, 2) for s in stages_of(sized, g)
    } == keys
    assert run_id_for(sized.config) == TODAY_RUN_IDS["demo.yaml"]


def test_a_saved_config_from_before_a_key_existed_reads_as_the_run_had_it(tmp_path: Path):
    """config.yaml of a run started before sample.precision existed lacks the key; read back
    (status, report), the run has fp32, the value it sampled with, not today's default, and
    the config hashes to the run's id again."""
    import yaml

    from collapse.context import open_run

    root = f"run.artifact_root={tmp_path}"
    earlier = load_config(REPO / "configs" / "demo.yaml", [root, *EARLIER])
    mark_started(earlier)
    store = RunStore(tmp_path, run_id_for(earlier))
    saved = config_to_dict(earlier)
    del saved["sample"]["precision"], saved["sample"]["slots"], saved["train"]["compile"]
    store.config_path.write_text(yaml.safe_dump(saved))
    ctx = open_run(store.run_dir)
    assert ctx.config.sample.precision == "fp32"
    assert run_id_for(ctx.config) == RUN_IDS["demo.yaml"]


def test_an_edited_grammar_makes_a_new_synthetic_corpus_and_the_shipped_one_keeps_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    from collapse.corpus import synthetic

    ctx = _context("demo.yaml", tmp_path / "run")
    edited = tmp_path / "grammar"
    shutil.copytree(synthetic.DEFAULT_GRAMMAR_DIR, edited)
    rules = (edited / "grammar.yaml").read_text()
    (edited / "grammar.yaml").write_text(rules.replace("Once upon a time,", "Once upon a time"))
    monkeypatch.setattr(synthetic, "DEFAULT_GRAMMAR_DIR", edited)
    # the stories come from the edited grammar now ...
    assert synthetic.load_grammar().fingerprint == synthetic.grammar_fingerprint()
    # ... so the corpus is recomputed (before, its key ignored the grammar and kept the old
    # stories), and so is what scores corpora against the grammar
    for key in ("0/corpus", "0/eval.source_fit", "1/eval.source_fit"):
        gen, stage = key.split("/")
        assert stage_key(ctx, int(gen), stage) != (DEMO_KEYS | ADDED_KEYS)[key], key
    monkeypatch.undo()
    assert stage_key(ctx, 0, "corpus") == DEMO_KEYS["0/corpus"]
