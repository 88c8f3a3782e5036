"""Fine-tune a language model as a sequence classifier and score it (the paper's GLUE runs).

The classifier is the model's final hidden state at each row's last real token, through a new
linear head without bias: what transformers' `GPTNeoForSequenceClassification` computes, written
once over the model interface (`collapse.models.features`) so the reference and the fast
implementation share it (a test checks it against transformers' class). Rows are right-padded with
the end-of-text id (pad = EOS, the usual GPT-Neo choice) and pooled by their known lengths, so a
pad never changes a real position (attention is causal) and batch size never changes a logit.

Training follows transformers' `Trainer` defaults the paper's code relied on: AdamW (no weight
decay), the learning rate decaying linearly to 0 with no warm-up, fixed batch size, a fractional
number of epochs allowed. Batches are bucketed by length (sorted within seeded pools of 50
batches, then shuffled) so padding does not dominate.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from collapse.device import autocast, autocast_dtype
from collapse.downstream.data import Examples
from collapse.models import features

POOL_BATCHES = 50  # length-bucketing pool, in batches


@dataclass(frozen=True)
class Encoded:
    """Token ids of each example (start token first) and their labels."""

    ids: list[np.ndarray]
    labels: np.ndarray
    truncated: int  # examples cut at max_length


def encode(
    tokenizer: Any,
    examples: Examples,
    start_id: int,
    separator: str,
    max_length: int,
) -> Encoded:
    """Tokenize examples: `start, text` or `start, first + separator + second`, cut at max_length.

    The start token is what the model saw before every training document (it also makes an
    empty text a valid one-token input); no end-of-text token is added, since pad = EOS.
    """
    joined = [separator.join(texts) for texts in examples.texts]
    encoded = tokenizer(joined, add_special_tokens=False)["input_ids"] if joined else []
    ids, truncated = [], 0
    for row in encoded:
        full = [start_id, *row]
        truncated += len(full) > max_length
        ids.append(np.asarray(full[:max_length], dtype=np.int64))
    return Encoded(ids, np.asarray(examples.labels, dtype=np.int64), truncated)


class SequenceClassifier(torch.nn.Module):
    """A language model's last-real-token hidden state through a linear head (no bias)."""

    def __init__(self, model: torch.nn.Module, num_labels: int, seed: int) -> None:
        super().__init__()
        self.model = model
        config = model.config
        # transformers initialises the head N(0, initializer_range); seeded here, without
        # touching the global RNG: not even Linear's own default init (skip_init), which would
        # draw from it unlocked while another thread of a pipelined run is inside a seeded
        # block (e.g. building the next generation's model: its weights then changed).
        self.score = torch.nn.utils.skip_init(
            torch.nn.Linear, config.hidden_size, num_labels, bias=False
        )
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(num_labels, config.hidden_size)
        weight.normal_(0.0, config.initializer_range, generator=generator)
        device = next(model.parameters()).device
        self.score.weight.data.copy_(weight.to(device))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, num_labels] of right-padded rows with the given lengths."""
        hidden = features(self.model, input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, lengths - 1]).float()


def length_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Index batches of similar lengths: shuffled and bucketed with `rng`, else sorted."""
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(
    data: Encoded, index: np.ndarray, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(right-padded ids, lengths, labels) of the examples at `index`, on `device`."""
    rows = [data.ids[i] for i in index]
    lengths = np.asarray([len(r) for r in rows])
    ids = np.full((len(rows), lengths.max()), pad_id, dtype=np.int64)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = row
    return (
        torch.from_numpy(ids).to(device),
        torch.from_numpy(lengths).to(device),
        torch.from_numpy(data.labels[index]).to(device),
    )


def _steps(n_examples: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * n_examples / batch_size))


def _train_batches(data: Encoded, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    epoch = 0
    lengths = [len(r) for r in data.ids]
    while True:  # epochs go on until the caller has its steps (epochs may be fractional)
        yield from length_batches(lengths, batch_size, np.random.default_rng([seed, epoch]))
        epoch += 1


@torch.no_grad()
def predict(
    classifier: SequenceClassifier,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> np.ndarray:
    """Predicted classes of every example, in the examples' order."""
    classifier.eval()
    predictions = np.empty(len(data.labels), dtype=np.int64)
    for index in length_batches([len(r) for r in data.ids], batch_size, None):
        ids, lengths, _ = collate(data, index, pad_id, device)
        with autocast(device, amp):
            logits = classifier(ids, lengths)
        predictions[index] = logits.argmax(-1).cpu().numpy()
    return predictions


def scores(labels: np.ndarray, predictions: np.ndarray, majority: int) -> dict[str, float]:
    """Accuracy, weighted and macro F1, Matthews correlation (scikit-learn), and the rate of
    `majority` (the training split's most frequent class) among the labels."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_weighted": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
        "majority_rate": float(np.mean(labels == majority)),
    }


def fine_tune(
    classifier: SequenceClassifier,
    train: Encoded,
    held: Encoded,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    eval_batch_size: int,
    pad_id: int,
    seed: int,
    device: torch.device,
    precision: str = "auto",
    progress: bool = False,
    desc: str = "fine-tune",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune every weight of `classifier` on `train`, then score it on `held`.

    Returns:
        Scores (see `scores`) plus steps, epochs, the mean training loss of the last 10% of
        steps, the majority class and seconds.
    """
    classifier.to(device)
    classifier.train()
    amp = autocast_dtype(precision, device)
    steps = _steps(len(train.labels), batch_size, epochs)
    optimizer = torch.optim.AdamW(
        classifier.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=steps, disable=not progress, desc=desc, unit="step")
    batches = _train_batches(train, batch_size, seed)
    for _ in range(steps):
        ids, lengths, labels = collate(train, next(batches), pad_id, device)
        with autocast(device, amp):
            logits = classifier(ids, lengths)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - started
    majority = Counter(train.labels.tolist()).most_common(1)[0][0]
    predictions = predict(classifier, held, eval_batch_size, pad_id, device, amp)
    tail = losses[-max(1, len(losses) // 10) :]
    result = {
        **scores(held.labels, predictions, majority),
        "majority_label": int(majority),
        "steps": steps,
        "epochs": epochs,
        "final_train_loss": float(np.mean(tail)),
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if log:
        log(
            f"{desc}: {steps} steps, accuracy {result['accuracy']:.3f} "
            f"(majority {result['majority_rate']:.3f}), weighted F1 {result['f1_weighted']:.3f}"
        )
    return result
