"""The initial (human) corpus: from the hub, local files or the built-in story generator.

Every source goes through `datasets`, so local files and the hub share one code path; the
validation split is either the dataset's own or a seeded holdout, fixed for the whole run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from collapse.errors import UserError, cause_text, logger_silenced
from collapse.seeding import derive_seed

# Rows a check before a run's first start reads of a local file (the corpus here, each split of
# a downstream task's data): a moment even for a large .txt or .csv.
PREVIEW_ROWS = 1000
_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_FORMAT_HINTS = {
    "text": "a .txt corpus must be UTF-8 text (corpus.txt_mode: blocks | lines)",
    "json": "a .jsonl corpus needs one JSON object per line, with the text under "
    "corpus.text_column",
    "parquet": "a .parquet corpus must be a Parquet file with a string column corpus.text_column",
}


class CorpusSourceError(UserError, ValueError):
    """The configured corpus cannot be read; the message says what to fix."""


def _hub(cfg: Any) -> tuple[Dataset, Dataset | None]:
    try:
        train = load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
        val = (
            load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.validation_split)
            if cfg.validation_split
            else None
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot load"
        raise CorpusSourceError(
            f"corpus.dataset: cannot load {cfg.dataset!r} from the Hugging Face hub "
            f"({cause_text(exc)}); check the id and network, or use "
            "corpus.source: synthetic | local"
        ) from None
    return train, val


def _local_file(cfg: Any) -> tuple[Path, str, dict[str, Any]]:
    """The local corpus file, its `datasets` builder and that builder's arguments.

    Raises:
        CorpusSourceError: the file is missing, empty, a folder or of an unknown type.
    """
    path = Path(cfg.path)
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise CorpusSourceError(
            f"corpus.path: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet"
        )
    # Checked here, when the corpus is read, not when the config is loaded: a finished run
    # whose corpus file has since moved must still load.
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise CorpusSourceError(
            f"corpus.path: {str(path)!r} does not exist{where}; set corpus.path to the "
            "corpus file (.txt, .jsonl or .parquet)"
        )
    if not path.is_file():
        raise CorpusSourceError(f"corpus.path: {str(path)!r} is not a file")
    if path.stat().st_size == 0:  # `datasets` fails on an empty .jsonl with a bare StopIteration
        raise CorpusSourceError(f"corpus.path: {str(path)!r} is empty")
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = "paragraph" if cfg.txt_mode == "blocks" else "line"
    return path, builder, kwargs


def _unreadable(path: Path, builder: str, exc: Exception) -> CorpusSourceError:
    return CorpusSourceError(
        f"corpus.path: cannot read {str(path)!r} as {path.suffix} ({cause_text(exc)}); "
        f"{_FORMAT_HINTS[builder]}"
    )


def _local(cfg: Any) -> Dataset:
    path, builder, kwargs = _local_file(cfg)
    try:
        with logger_silenced("datasets"):  # it logs the parse error we raise below
            return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # pyarrow, datasets and the OS raise many types; all mean "unreadable"
        raise _unreadable(path, builder, exc) from exc


def local_corpus_problems(cfg: Any, rows: int = PREVIEW_ROWS) -> list[str]:
    """What is wrong with a local corpus file that its first `rows` rows already show.

    Streamed through the same `datasets` builder the corpus stage uses, so checking a config
    costs a moment, and an unreadable file or a missing text column stops `collapse run`
    before anything starts instead of in the corpus stage. Other sources: nothing to check
    here (the hub is not fetched before the run).

    Args:
        cfg: the `CorpusConfig`.
        rows: rows read.
    """
    if cfg.source != "local":
        return []
    try:
        path, builder, kwargs = _local_file(cfg)
    except CorpusSourceError as exc:
        return [str(exc)]
    column = _text_column(cfg)
    try:
        with logger_silenced("datasets"):
            stream = load_dataset(
                builder, data_files=str(path), split="train", streaming=True, **kwargs
            )
            first = list(itertools.islice(stream, rows))
    except Exception as exc:  # a parse error surfaces while rows are read
        return [str(_unreadable(path, builder, exc))]
    if not first:
        return [f"corpus.path: {cfg.path!r} holds no documents"]
    if column not in first[0]:
        return [
            f"corpus.text_column: file {cfg.path!r} has no column {column!r} "
            f"(columns: {', '.join(first[0])})"
        ]
    if not any(_is_text(row[column]) for row in first):
        return [
            f"corpus.path: {cfg.path!r} holds no text in column {column!r} (read its first "
            f"{len(first)} rows)"
        ]
    return []


def _text_column(cfg: Any) -> str:
    """The column a local file's texts are in: `text` for .txt, else `corpus.text_column`."""
    return cfg.text_column if Path(cfg.path).suffix.lower() != ".txt" else "text"


def _synthetic(cfg: Any, seed: int) -> Dataset:
    from datasets.table import InMemoryTable

    from collapse.corpus.synthetic import generate_stories, grammar_fingerprint

    table = InMemoryTable.from_pydict({"text": generate_stories(cfg.num_stories, seed)})
    grammar = grammar_fingerprint()[:16]
    # The stories are a function of (grammar, count, seed): that is their fingerprint. Without one,
    # `datasets` fingerprints the table by pickling it, and dill finds a pickled function's
    # globals by disassembling it into a redirected stdout, which Prefect's log_prints logs
    # instead, line by line, in every corpus stage.
    return Dataset(table, fingerprint=f"collapse-synthetic-{grammar}-{cfg.num_stories}-{seed}")


def _non_empty(ds: Dataset, column: str, source: str) -> Dataset:
    if column not in ds.column_names:
        raise CorpusSourceError(
            f"corpus.text_column: {source} has no column {column!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    # A module-level function, not a lambda: `datasets` fingerprints a lambda by its bytecode,
    # which it prints (and Prefect's log_prints then logs line by line).
    return ds.filter(_is_text, input_columns=column)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _texts(ds: Dataset, column: str) -> list[str]:
    return [t.strip() for t in ds[column]]


def load_documents(cfg: Any, run_seed: int) -> tuple[list[str], list[str]]:
    """Load the initial corpus and split it.

    Args:
        cfg: the `CorpusConfig`.
        run_seed: the run seed (the synthetic corpus and the holdout derive from it).

    Returns:
        (train texts, validation texts), empty documents dropped.
    """
    val_ds: Dataset | None = None
    if cfg.source == "hub":
        train_ds, val_ds = _hub(cfg)
        column, where = cfg.text_column, f"dataset {cfg.dataset!r}"
    elif cfg.source == "local":
        train_ds = _local(cfg)
        column = _text_column(cfg)
        where = f"file {cfg.path!r}"
    else:
        train_ds = _synthetic(cfg, derive_seed(run_seed, "corpus", "synthetic"))
        column, where = "text", "the synthetic corpus"
    train_ds = _non_empty(train_ds, column, where)
    if val_ds is not None:
        val_ds = _non_empty(val_ds, column, where)
    if cfg.max_documents is not None:
        train_ds = train_ds.select(range(min(cfg.max_documents, len(train_ds))))
    if val_ds is None:
        if len(train_ds) < 2:
            raise CorpusSourceError(f"corpus: {where} has fewer than 2 documents")
        parts = train_ds.train_test_split(
            test_size=cfg.validation_fraction, seed=derive_seed(run_seed, "holdout") % 2**32
        )
        train_ds, val_ds = parts["train"], parts["test"]
    if cfg.max_validation_documents is not None:
        val_ds = val_ds.select(range(min(cfg.max_validation_documents, len(val_ds))))
    train, val = _texts(train_ds, column), _texts(val_ds, column)
    if not train or not val:
        raise CorpusSourceError(f"corpus: {where} leaves an empty train or validation split")
    return train, val
