"""Typed experiment configuration: YAML + dotted overrides -> validated, hashable `Config`.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error, not a silently
ignored key. Loading collects every problem and raises one `ConfigError` listing them all with
dotted keys, which the CLI prints before exiting with code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from collapse import yaml_strict
from collapse.errors import UserError, cause_text
from collapse.evals import default_metrics, registry
from collapse.models.presets import IMPLEMENTATIONS, PRESETS, context_length, resolve_model_fields
from collapse.objectives import OBJECTIVES
from collapse.objectives import unused_settings as unused_objective_settings
from collapse.regimes import REGIMES
from collapse.regimes import unused_settings as unused_regime_settings
from collapse.sections import PositiveFloat, PositiveInt, Section


class ConfigError(UserError):
    """A config that cannot be used; `problems` holds one "dotted.key: message" line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class RunConfig(Section):
    """What to run and where to keep it."""

    name: str = Field(
        "run",
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Prefix of the run id; unset in a config file: the file's name (lower-cased, "
        "other characters as -).",
    )
    seed: int = Field(42, ge=0, description="Root of every seed in the run.")
    generations: PositiveInt = Field(5, description="Model generations to train (gen 1..N).")
    artifact_root: str = Field(
        "artifacts",
        description="Directory holding one folder per run, or an fsspec URL "
        "(s3://bucket/prefix, gs://bucket/prefix, file:///path) with credentials in the "
        "environment; runs then work on a local staging copy ($COLLAPSE_STAGING).",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run folder name; derived from the config hash when unset.",
    )

    @field_validator("artifact_root")
    @classmethod
    def _usable_root(cls, value: str) -> str:
        from collapse.object_store import is_url, url_problem

        problem = url_problem(value) if is_url(value) else None
        if problem is None:
            return value
        if "credentials" in problem:  # never echo the input: it holds a secret
            raise PydanticCustomError("secret", problem)
        raise ValueError(problem)


class ModelConfig(Section):
    """GPT-Neo architecture. A preset fills every field; explicit fields override it."""

    preset: Literal[tuple(PRESETS)] | None = Field(  # type: ignore[valid-type]
        None, description="TinyStories-1M/-33M architecture (the paper's); fills the fields below."
    )
    implementation: Literal[tuple(IMPLEMENTATIONS)] = Field(  # type: ignore[valid-type]
        "fast",
        description="Code that computes the architecture: transformers (the reference) or fast "
        "(plain PyTorch: SDPA attention, preallocated KV cache; same weights and checkpoints).",
    )
    num_layers: PositiveInt | None = Field(None, description="Transformer blocks.")
    hidden_size: PositiveInt | None = Field(None, description="Width of the residual stream.")
    num_heads: PositiveInt | None = Field(None, description="Attention heads per block.")
    intermediate_size: PositiveInt | None = Field(None, description="MLP width; 4 x hidden.")
    window_size: PositiveInt | None = Field(None, description="Local-attention window (tokens).")
    max_position_embeddings: PositiveInt | None = Field(
        None, description="Longest sequence the model can see (learned positions)."
    )
    attention_pattern: Literal["global-local", "global", "local"] | None = Field(
        None, description="Per-layer attention; global-local alternates, as GPT-Neo does."
    )
    activation_function: str | None = Field(None, description="MLP activation (gelu_new).")
    layer_norm_epsilon: PositiveFloat | None = Field(None, description="LayerNorm epsilon.")


class TokenizerConfig(Section):
    """`gpt2` (real GPT-2 BPE, offline), `bpe` (trained on the run's corpus) or `hub:<name>`."""

    name: str = Field("bpe", description="gpt2 | bpe | hub:<name>.")
    vocab_size: PositiveInt = Field(4096, description="Only for `bpe`.")
    min_frequency: PositiveInt = Field(2, description="Only for `bpe`.")

    @field_validator("name")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value in ("gpt2", "bpe") or (value.startswith("hub:") and len(value) > 4):
            return value
        raise ValueError(f"must be 'gpt2', 'bpe' or 'hub:<name>', got {value!r}")


class CorpusConfig(Section):
    """The initial (human) corpus: generation 0."""

    source: Literal["synthetic", "hub", "local"] = Field(
        "synthetic", description="Built-in story grammar, a hub dataset, or a local file."
    )
    # synthetic
    num_stories: PositiveInt = Field(4000, description="synthetic: stories to generate.")
    # hub
    dataset: str | None = Field(None, description="hub: dataset id, e.g. roneneldan/TinyStories.")
    dataset_config: str | None = Field(None, description="hub: dataset configuration name.")
    split: str = Field("train", description="hub: split holding the training stories.")
    validation_split: str | None = Field(
        None, description="hub: the dataset's own validation split; else a holdout is cut."
    )
    text_column: str = Field("text", description="hub/jsonl/parquet: column of the stories.")
    # local
    path: str | None = Field(None, description="local: file (.txt, .jsonl, .parquet).")
    txt_mode: Literal["blocks", "lines"] = Field(
        "blocks", description="local txt: one document per blank-line block, or per line."
    )
    # all sources
    max_documents: PositiveInt | None = Field(None, description="Keep only the first N docs.")
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Holdout cut (seeded) when there is no validation split."
    )
    max_validation_documents: PositiveInt | None = Field(
        None, description="Cap on validation documents (perplexity cost)."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> CorpusConfig:
        if self.source == "hub" and not self.dataset:
            raise ValueError("corpus.dataset is required when corpus.source is 'hub'")
        # Only the setting is checked here; whether the file exists is checked by the corpus
        # stage that reads it (a saved run must open on a machine that lacks the file).
        if self.source == "local" and not self.path:
            raise ValueError("corpus.path is required when corpus.source is 'local'")
        return self


class TrainConfig(Section):
    """One generation's training: identical for every generation."""

    lr: PositiveFloat = Field(5e-4, description="AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant (the paper) or cosine decay to 0."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    batch_size: PositiveInt = Field(16, description="Sequences per forward pass.")
    effective_batch: PositiveInt = Field(16, description="Sequences per optimizer step.")
    seq_len: PositiveInt = Field(256, description="Tokens per training sequence (context).")
    epochs: PositiveFloat | None = Field(1, description="Passes over the corpus.")
    token_budget: PositiveInt | None = Field(None, description="Train on this many tokens.")
    grad_clip: PositiveFloat | None = Field(1.0, description="Max gradient norm; null: off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA with bf16 support, else fp16; fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")
    objective: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        "mle",
        description="Training objective: "
        + "; ".join(f"{o.name}: {o.description}" for o in OBJECTIVES.values()),
    )
    eta: float = Field(0.5, ge=0, le=1, description="mixce: weight of the MLE part.")
    gamma: float = Field(0.5, ge=0, le=1, description="tailr: the gamma of TaiLr's weights.")
    alpha: float = Field(
        1.0, ge=0, description="unlikelihood: weight of the penalty on repeated tokens."
    )
    regime: Literal[tuple(REGIMES)] = Field(  # type: ignore[valid-type]
        "replace",
        description="Training data of generation g >= 2: "
        + "; ".join(f"{r.name}: {r.description}" for r in REGIMES.values()),
    )
    real_fraction: float = Field(
        0.1, ge=0, le=1, description="mix: share of human stories in each training corpus."
    )
    accumulate_tokens: PositiveInt | None = Field(
        None, description="accumulate: subsample to this many tokens; null: everything."
    )
    checkpoint_every: PositiveInt = Field(200, description="Optimizer steps between checkpoints.")
    deterministic: bool = Field(
        False,
        description="Bitwise-repeatable GPU training: deterministic kernels and cuBLAS "
        "workspace (slower); CPU training is repeatable either way. In-process runs then do not "
        "overlap evaluations with training (the mode is process-wide).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the fast model's trunk (embeddings, blocks, final norm) and "
        "the loss's per-chunk log-softmax and gradient while training; the head's matmuls stay "
        "eager. Other kernels for the same function, so not part of the run id: switch it on or "
        "off mid-run. Off until measured on a GPU.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.effective_batch % self.batch_size:
            raise ValueError(
                f"train.effective_batch ({self.effective_batch}) must be a multiple of "
                f"train.batch_size ({self.batch_size})"
            )
        if (self.epochs is None) == (self.token_budget is None):
            raise ValueError("set exactly one of train.epochs and train.token_budget")
        return self


class SampleConfig(Section):
    """Ancestral sampling of the next generation's corpus."""

    num_sequences: PositiveInt = Field(2000, description="Size of each generated corpus.")
    max_new_tokens: PositiveInt = Field(600, description="Length cap; a sequence stops at EOS.")
    batch_size: PositiveInt = Field(
        200,
        description="Sequences sampled together: static batches, or the continuous-batching "
        "pool (fast model, story rng) when sample.slots is unset.",
    )
    slots: PositiveInt | None = Field(
        None,
        description="Stories decoded at once by the continuous-batching pool (fast model, story "
        "rng); null: sample.batch_size. Each story draws its own randomness, so this does not "
        "change the corpus and is not part of the run id: size it to the device, even mid-run.",
    )
    shard_size: PositiveInt = Field(1000, description="Sequences per Parquet shard.")
    temperature: PositiveFloat = Field(1.0, description="Softmax temperature (paper: 1).")
    top_k: int = Field(0, ge=0, description="0 disables top-k (the paper: disabled).")
    top_p: float = Field(1.0, gt=0, le=1, description="1.0 disables nucleus sampling.")
    rng: Literal["shard", "story"] = Field(
        "story",
        description="shard: one seeded stream per shard, shared by its batches; story: "
        "counter-based per (generation, story, position), so a story does not depend on "
        "sample.batch_size or on the stories beside it.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="The model's arithmetic while sampling; auto: bf16 autocast on CUDA with bf16 "
        "support, else fp16; fp32 on CPU (as train.precision). Logits, softmax and draw stay fp32.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Continuous batching on CUDA with flash decode attention: replay the steps "
        "between two looks at the pool as one recorded CUDA graph (one launch instead of ~150 "
        "kernels a step). The same kernels, so not part of the run id. Off until measured.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")


class EvalSettings(Section):
    """Per-generation evaluations."""

    metrics: list[str] = Field(
        default_factory=default_metrics,
        description="Evaluations run on every generation, by registry name.",
    )
    batch_size: PositiveInt = Field(32, description="Perplexity windows per forward pass.")
    context: PositiveInt | None = Field(
        None,
        description="Perplexity window; default: the smaller of the model's max positions and "
        "train.seq_len.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")

    @field_validator("metrics")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        known = list(registry())
        unknown = [m for m in value if m not in known]
        if unknown:
            raise ValueError(f"unknown evaluations {unknown}; choose from {known}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists an evaluation twice: {value}")
        return value


def _eval_config() -> type[EvalSettings]:
    """The `eval` section: the common settings plus one sub-section per evaluation that has one."""
    sections: dict[str, Any] = {}
    for name, entry in registry().items():
        if entry.settings is None:
            continue
        if name in EvalSettings.model_fields:
            raise ValueError(f"evaluation {name!r} clashes with the setting eval.{name}")
        sections[name] = (entry.settings, Field(default_factory=entry.settings))
    return create_model(
        "EvalConfig", __base__=EvalSettings, __doc__=EvalSettings.__doc__, **sections
    )


# Assembled from the registry once, when the config module is imported.
EvalConfig = _eval_config()


class OrchestrationConfig(Section):
    """How Prefect runs the stages; changes here never change results."""

    gpu_concurrency_limit: str | None = Field(
        None, description="Name of a Prefect global concurrency limit held by GPU stages."
    )
    share_across_runs: bool = Field(
        True,
        description="Take a stage another run under run.artifact_root finished under the same "
        "key (hard links) instead of computing it again.",
    )
    progress_bars: Literal["auto", "on", "off"] = Field(
        "auto", description="Training/sampling progress bars; auto: when stderr is a terminal."
    )
    generation_deployment: str | None = Field(
        None,
        pattern=r"^[^/]+/[^/]+$",
        description=(
            "'flow/deployment' of a deployed generation flow (e.g. 'generation/gpu'): the GPU "
            "jobs then run on that deployment's work pool through run_deployment (mode "
            "distributed). run.artifact_root must be storage that the workers share."
        ),
    )
    mode: Literal["local", "distributed"] | None = Field(
        None,
        description="local: every stage in this process; distributed: each GPU job (a "
        "generation's chain stages, each evaluation that needs a GPU) is a flow run of "
        "generation_deployment, CPU evaluations stay here. Unset: distributed when "
        "generation_deployment is set, else local.",
    )
    pipeline: bool = Field(
        True,
        description="Run generation n's evaluations beside generation n+1's train and sample "
        "(only the chain waits for the chain); false: one generation after the other.",
    )

    @model_validator(mode="after")
    def _mode_needs_deployment(self) -> OrchestrationConfig:
        if self.mode == "distributed" and not self.generation_deployment:
            raise ValueError(
                "orchestration.mode distributed needs orchestration.generation_deployment "
                "(e.g. generation/gpu)"
            )
        if self.mode == "local" and self.generation_deployment:
            raise ValueError(
                "orchestration.generation_deployment is only used with orchestration.mode "
                "distributed: unset one of them"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Whether GPU jobs run as flow runs of `generation_deployment`."""
        return self.generation_deployment is not None


class Config(Section):
    """A whole experiment."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = Field(default_factory=EvalConfig)  # type: ignore[valid-type]
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        resolve_model_fields(self.model)  # raises ValueError naming missing fields
        positions = context_length(self.model)
        problems = []
        if self.train.seq_len > positions:
            problems.append(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
                f"({positions})"
            )
        if self.sample.max_new_tokens + 1 > positions:
            problems.append(
                f"sample.max_new_tokens ({self.sample.max_new_tokens}) + the BOS token exceeds "
                f"model.max_position_embeddings ({positions})"
            )
        if self.train.compile and self.model.implementation != "fast":
            problems.append("train.compile needs model.implementation: fast")
        if self.sample.cuda_graphs and (
            self.model.implementation != "fast" or self.sample.rng != "story"
        ):
            problems.append(
                "sample.cuda_graphs needs continuous batching: model.implementation: fast and "
                "sample.rng: story"
            )
        for name in self.eval.metrics:
            check = registry()[name].check
            problems += check(self) if check else []
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Left out of the run hash, so the run (its folder) stays the same: extending `run.generations`,
# moving the artifact root, orchestration, and the evaluations (adding one, or a judge, to a
# finished run computes just that; each evaluation's stage key covers its own settings). The
# keys below are left out of the stage keys too (`without_neutral`): performance settings that
# change no output (the sampling pool's size, CUDA graphs, compiled training) can change
# mid-run.
_HASH_EXCLUDED = {
    ("run", "generations"),
    ("run", "artifact_root"),
    ("run", "run_id"),
    ("sample", "slots"),
    ("sample", "cuda_graphs"),
    ("train", "compile"),
}
_HASH_EXCLUDED_SECTIONS = {"orchestration", "eval"}

# Keys added after runs existed, left out of every hash while they hold the value that all
# earlier runs implicitly had: adding a key never renames a run folder nor recomputes a stage,
# and choosing another value does. Stage key functions use `without_neutral` for the same rule.
# A key whose default has since changed (implementation, rng, sample precision) names a new run
# when left unset; `collapse.started` resumes the run started under the earlier default
# instead, if it exists.
HASH_NEUTRAL: dict[tuple[str, str], Any] = {
    ("model", "implementation"): "transformers",
    ("sample", "rng"): "shard",
    ("sample", "precision"): "fp32",
    ("train", "deterministic"): False,
    ("train", "objective"): "mle",
    ("train", "regime"): "replace",
}


def with_earlier_values(data: Any) -> Any:
    """Config data with each `HASH_NEUTRAL` key it lacks set to its neutral value (in place).

    That is the config as the runs from before the key existed had it, which is not always
    today's default (`sample.precision`: fp32 then, auto now): a config.yaml saved then lacks
    the key, and `collapse.started` reads a user's file this way when only such a run exists.
    """
    if not isinstance(data, dict):
        return data
    for (section, key), earlier in HASH_NEUTRAL.items():
        values = data.setdefault(section, {})
        if isinstance(values, dict):
            values.setdefault(key, earlier)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError([f"override {item!r} must look like key.sub=value"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"override {item!r} has an empty key part"])
    if not raw.strip():
        return parts, None
    try:
        return parts, yaml_strict.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(
            [
                f"override {item!r}: the value is not valid YAML ({problem}); write it as YAML "
                "(a list as [1, 2], a string with brackets or colons in quotes)"
            ]
        ) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted `key=value` override set."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{'.'.join(parts)}: {part!r} is not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see README config reference)"
    elif (
        "input" in err
        and err["type"] not in ("missing", "secret")
        and not isinstance(err["input"], dict)
        and repr(err["input"]) not in msg
    ):
        msg = f"{msg}, got {err['input']!r}"
    msg = msg.removeprefix("Value error, ")
    if not loc or msg.startswith(f"{loc}.") or msg.startswith(f"{loc}:"):
        return msg  # a section-level check already names its dotted key
    return f"{loc}: {msg}"


def validate_config(data: dict[str, Any]) -> Config:
    """Validate a plain dict, raising ConfigError with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError(["the config file must hold a mapping of sections"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_format_error(e) for e in exc.errors()]) from None


def input_problems(data: dict[str, Any]) -> list[str]:
    """Input files a config (a plain dict, valid or not) names that do not exist: the corpus.

    Not part of validation: a saved run must open where its inputs are absent (a GPU worker,
    a moved corpus). `collapse run` checks them before a run's first start (`start_problems`,
    which adds what the evaluations read); afterwards the stage that reads a file checks it,
    if it has to run at all.
    """
    corpus = data.get("corpus") if isinstance(data.get("corpus"), dict) else {}
    if corpus.get("source") == "local" and corpus.get("path"):
        if not Path(str(corpus["path"])).exists():
            return [
                f"corpus.path {corpus['path']!r} does not exist (give a .txt, .jsonl or .parquet)"
            ]
    return []


def start_problems(config: Config) -> list[str]:
    """What stops a validated config's run before its first start: a missing corpus file
    (`input_problems`) or one whose first rows cannot be used, a local tokenizer folder that
    cannot be used, and what its evaluations' `inputs` checks find in the files they read (the
    judge's prompts file, downstream tasks' local data).
    """
    from collapse.corpus.sources import local_corpus_problems
    from collapse.tokenizer import local_tokenizer_problems

    problems = input_problems(config_to_dict(config)) or local_corpus_problems(config.corpus)
    problems += local_tokenizer_problems(config.tokenizer.name)
    for name in config.eval.metrics:
        inputs = registry()[name].inputs
        if inputs is not None:
            problems += inputs(config)
    return problems


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, check_inputs: bool = True
) -> Config:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file.
        overrides: `key.sub=value` strings (values parsed as YAML).
        check_inputs: also report input files that do not exist (`input_problems`).

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem, with dotted keys.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"config file {str(path)!r} is a folder; name a YAML file in it"])
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = yaml_strict.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot be read as text ({cause_text(exc)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must hold a mapping of sections"])
    data = apply_overrides(data, overrides or [])
    data.setdefault("run", {})
    if isinstance(data["run"], dict):
        data["run"].setdefault("name", _name_from_path(path))
    missing = input_problems(data) if check_inputs else []
    try:
        config = validate_config(data)
    except ConfigError as exc:
        raise ConfigError(exc.problems + missing) from None
    if missing:
        raise ConfigError(missing)
    return config


def _name_from_path(path: Path) -> str:
    name = "".join(c if c.isalnum() else "-" for c in path.stem.lower()).strip("-")
    return name or "run"


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain JSON-able dict of a config (tuples as lists)."""
    return json.loads(config.model_dump_json())


def section_hash(value: Any) -> str:
    """sha256 of the canonical JSON of a config section or any JSON-able value."""
    if isinstance(value, BaseModel):
        value = json.loads(value.model_dump_json())
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def config_hash(config: Config) -> str:
    """Hash of what determines a run's data chain (not generations, paths, orchestration, eval)."""
    data = config_to_dict(config)
    for section in _HASH_EXCLUDED_SECTIONS:
        data.pop(section, None)
    for section in data:
        data[section] = without_neutral(section, data[section])
    return section_hash(data)


def without_neutral(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A section's values without those that cannot change a result.

    Those are the `_HASH_EXCLUDED` keys, the `HASH_NEUTRAL` keys holding their neutral value,
    and in `train` the settings of the objectives and data regimes that are not chosen
    (`train.eta` does nothing under `tailr`, `train.real_fraction` nothing under `replace`).
    """
    unused: set[str] = set()
    if section == "train":
        unused = unused_objective_settings(values.get("objective", "mle"))
        unused |= unused_regime_settings(values.get("regime", "replace"))
    return {
        key: value
        for key, value in values.items()
        if key not in unused
        and (section, key) not in _HASH_EXCLUDED
        and ((section, key) not in HASH_NEUTRAL or HASH_NEUTRAL[(section, key)] != value)
    }


def run_id_for(config: Config) -> str:
    """The run folder name: `run.run_id`, or `<run.name>-<first 10 hex of config_hash>`."""
    return config.run.run_id or f"{config.run.name}-{config_hash(config)[:10]}"
