"""Typed experiment configuration: YAML + dotted overrides -> validated, hashable `Config`.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error, not a silently
ignored key. Loading collects every problem and raises one `ConfigError` listing them all with
dotted keys, which the CLI prints before exiting with code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one "dotted.key: message" line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunConfig(Section):
    """What to run and where to keep it."""

    name: str = Field("run", pattern=r"^[a-z0-9][a-z0-9-]*$", description="Prefix of the run id.")
    seed: int = Field(42, ge=0, description="Root of every seed in the run.")
    generations: PositiveInt = Field(5, description="Model generations to train (gen 1..N).")
    artifact_root: str = Field("artifacts", description="Directory holding one folder per run.")
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run folder name; derived from the config hash when unset.",
    )


class ModelConfig(Section):
    """GPT-Neo architecture. A preset fills every field; explicit fields override it."""

    preset: Literal["tinystories-1m", "tinystories-33m"] | None = Field(
        None, description="TinyStories-1M/-33M architecture (the paper's); fills the fields below."
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
        if self.source == "local":
            if not self.path:
                raise ValueError("corpus.path is required when corpus.source is 'local'")
            if not Path(self.path).exists():
                raise ValueError(
                    f"corpus.path {self.path!r} does not exist (give a .txt, .jsonl or .parquet)"
                )
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
    checkpoint_every: PositiveInt = Field(200, description="Optimizer steps between checkpoints.")

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
    batch_size: PositiveInt = Field(200, description="Sequences sampled together.")
    shard_size: PositiveInt = Field(1000, description="Sequences per Parquet shard.")
    temperature: PositiveFloat = Field(1.0, description="Softmax temperature (paper: 1).")
    top_k: int = Field(0, ge=0, description="0 disables top-k (the paper: disabled).")
    top_p: float = Field(1.0, gt=0, le=1, description="1.0 disables nucleus sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")


class OOVEvalConfig(Section):
    """Non-word counts (eval `oov`)."""

    lexicon_min_count: PositiveInt = Field(
        3, description="Words seen this often in the human corpus join the lexicon (names)."
    )
    max_documents: PositiveInt | None = Field(
        None, description="Score only the first N documents of each corpus (cost cap)."
    )
    processes: PositiveInt = Field(
        1, description="Worker processes counting shards in parallel (1: in-process)."
    )


class DiversityEvalConfig(Section):
    """Repetition and diversity (eval `diversity`)."""

    n_max: int = Field(4, ge=1, le=8, description="distinct-n and rep-n for n = 1..n_max.")
    self_bleu_samples: int = Field(
        200, ge=2, description="Documents in the seeded self-BLEU sample."
    )


class ExcerptsEvalConfig(Section):
    """Stories shown per generation (eval `excerpts`)."""

    count: PositiveInt = Field(8, description="Stories per generation (seeded choice).")
    max_words: PositiveInt = Field(40, description="First sentence, or this many words.")


class JudgeConfig(Section):
    """LLM-judge grades of story completions (eval `judge`, the paper's GPT-Eval).

    Generation 0 has no model of its own: its judge stage grades a randomly initialised model of
    the run's architecture, the paper's baseline.
    """

    model: str | None = Field(
        None, description="Judge model name; null: the judge stage is skipped (and says so)."
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama); null: OpenAI."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the key (never stored)."
    )
    api_key_secret: str | None = Field(
        None, description="Prefect Secret block holding the key; read at run time, never stored."
    )
    prompts: Literal["tinystories", "file", "validation"] = Field(
        "validation",
        description="tinystories: the 44 prompts from the hub; file: prompts_path; validation: "
        "validation stories cut mid-sentence (offline).",
    )
    prompts_path: str | None = Field(None, description="prompts: file (.yaml, .json, .txt).")
    num_prompts: PositiveInt = Field(44, description="At most this many prompts.")
    completions_per_prompt: PositiveInt = Field(10, description="Completions per prompt.")
    max_new_tokens: PositiveInt = Field(210, description="Length cap of a completion.")
    generations: list[int] | None = Field(
        None, description="Generations judged (paper: [1, 6, ..., 36]); null: all. Plus gen 0."
    )
    temperature: float | None = Field(
        0.0, ge=0, description="Judge temperature; null: not sent (for reasoning models)."
    )
    max_tokens: PositiveInt = Field(
        100, description="Reply length cap (reasoning models need room to think: ~2000)."
    )
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="How the cap is sent; OpenAI reasoning models: the latter."
    )
    max_concurrency: PositiveInt = Field(4, description="Judge requests in flight.")
    timeout_s: PositiveFloat = Field(60.0, description="Per-request timeout (seconds).")
    max_attempts: PositiveInt = Field(6, description="Tries per request (errors, 429, 5xx).")

    @model_validator(mode="after")
    def _prompt_file(self) -> JudgeConfig:
        if self.prompts == "file":
            if not self.prompts_path:
                raise ValueError("prompts_path is required when prompts is 'file'")
            if not Path(self.prompts_path).is_file():
                raise ValueError(f"prompts_path {self.prompts_path!r} does not exist")
        return self


EVALUATIONS = ("perplexity", "entropy", "oov", "diversity", "excerpts", "judge")


class EvalConfig(Section):
    """Per-generation evaluations."""

    metrics: list[str] = Field(
        list(EVALUATIONS),
        description="Evaluations run on every generation, by registry name.",
    )
    batch_size: PositiveInt = Field(32, description="Perplexity windows per forward pass.")
    context: PositiveInt | None = Field(
        None, description="Perplexity window; default: the model's max positions or train.seq_len."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")
    oov: OOVEvalConfig = OOVEvalConfig()
    diversity: DiversityEvalConfig = DiversityEvalConfig()
    excerpts: ExcerptsEvalConfig = ExcerptsEvalConfig()
    judge: JudgeConfig = JudgeConfig()

    @field_validator("metrics")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        # The names of collapse.evals.REGISTRY (a test keeps the two equal; importing the
        # registry here would be circular).
        unknown = [m for m in value if m not in EVALUATIONS]
        if unknown:
            raise ValueError(f"unknown evaluations {unknown}; choose from {list(EVALUATIONS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists an evaluation twice: {value}")
        return value


class OrchestrationConfig(Section):
    """How Prefect runs the stages; changes here never change results."""

    gpu_concurrency_limit: str | None = Field(
        None, description="Name of a Prefect global concurrency limit held by GPU stages."
    )
    progress_bars: Literal["auto", "on", "off"] = Field(
        "auto", description="Training/sampling progress bars; auto: when stderr is a terminal."
    )
    generation_deployment: str | None = Field(
        None,
        pattern=r"^[^/]+/[^/]+$",
        description=(
            "'flow/deployment' of a deployed generation flow (e.g. 'generation/gpu'): each "
            "generation then runs on that deployment's work pool through run_deployment. "
            "run.artifact_root must be storage that the workers share."
        ),
    )


class Config(Section):
    """A whole experiment."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        from collapse.models import resolve_model_fields

        fields = resolve_model_fields(self.model)  # raises ValueError naming missing fields
        positions = fields["max_position_embeddings"]
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
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Left out of the run hash, so the run (its folder) stays the same: extending `run.generations`,
# moving the artifact root, orchestration, and the evaluations (adding one, or a judge, to a
# finished run computes just that; each evaluation's stage key covers its own settings).
_HASH_EXCLUDED = {("run", "generations"), ("run", "artifact_root"), ("run", "run_id")}
_HASH_EXCLUDED_SECTIONS = {"orchestration", "eval"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError([f"override {item!r} must look like key.sub=value"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"override {item!r} has an empty key part"])
    return parts, yaml.safe_load(raw) if raw.strip() else None


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
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file.
        overrides: `key.sub=value` strings (values parsed as YAML).

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem, with dotted keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must hold a mapping of sections"])
    data = apply_overrides(data, overrides or [])
    data.setdefault("run", {})
    if isinstance(data["run"], dict):
        data["run"].setdefault("name", _name_from_path(path))
    return validate_config(data)


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
    for section, key in _HASH_EXCLUDED:
        data.get(section, {}).pop(key, None)
    return section_hash(data)


def run_id_for(config: Config) -> str:
    """The run folder name: `run.run_id`, or `<run.name>-<first 10 hex of config_hash>`."""
    return config.run.run_id or f"{config.run.name}-{config_hash(config)[:10]}"
