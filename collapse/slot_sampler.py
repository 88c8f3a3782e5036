"""Continuous batching: a fixed pool of decoding slots, each story in a slot until it ends.

A static batch decodes until its longest story ends: with stories of mean ~150 tokens and a cap
of 600, most of its steps are spent on rows that have already finished. Here, when a story
ends (EOS or `max_new_tokens`) it is handed out and its slot starts the next story at once, so
steps go to stories that are still being written. The model's decode state must allow restarting
single rows (`ModelImplementation.slots`, e.g. `model.implementation: fast`).

Every story draws its tokens from counter-based uniforms keyed by (key, story index, token
number) (`collapse.sample.story_uniforms`), so its tokens depend neither on its slot, nor on the
stories beside it, nor on the pool size: the same as a static batch with per-story randomness,
up to floating-point differences between batch shapes (none on the CPU in the tests).

The host looks at which stories ended only every `check_every` steps (one synchronisation),
so on a GPU the steps between checks are queued without waiting; a story that ends between
checks stops recording at once, and its slot idles until the next check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from collapse.errors import cause_text
from collapse.models import implementation_of


@torch.inference_mode()
def sample_stories(
    model: torch.nn.Module,
    stories: Sequence[int],
    *,
    key: int,
    max_new_tokens: int,
    start_id: int,
    end_id: int,
    slots: int,
    warp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
    check_every: int | None = None,
    cuda_graphs: bool = False,
    report: dict[str, str] | None = None,
) -> Iterator[tuple[int, list[int], bool]]:
    """Sample the given stories; yields (story index, tokens, ended with EOS) as each ends.

    Args:
        model: a model whose implementation supports slots.
        stories: global story indices, fed to the slots in this order.
        key: the randomness key (e.g. `derive_seed(run seed, "sample", generation)`).
        max_new_tokens: length cap of a story.
        start_id: token every story starts after.
        end_id: token that ends a story (not part of the yielded tokens).
        slots: stories decoded at once.
        warp: logits [slots, vocab] (fp32) -> scores (temperature, top-k, top-p); None: as is.
        device: default: the model's.
        check_every: decoding steps between looks at which stories ended; default 1 on the
            CPU (a look is free), 8 elsewhere (a look waits for the device).
        cuda_graphs: on CUDA, record the `check_every` steps between two looks as one CUDA
            graph and replay it, so the host launches one graph instead of ~150 kernels a
            step (see `_graphed_steps`); where that cannot be done, steps run one by one and
            `report` says why.
        report: if given, filled with how the steps ran: `attention` (the decode state's)
            and `cuda_graphs` (`on`, `off`, or `off: why`).

    Yields:
        Each story once, in the order they end.
    """
    from collapse.sample import draw_tokens, story_uniforms

    impl = implementation_of(model)
    if not impl.slots:
        raise ValueError(f"model.implementation {impl.name!r} cannot restart single rows")
    device = device or next(model.parameters()).device
    check_every = check_every or (1 if device.type == "cpu" else 8)
    # A finished row keeps decoding (discarded) until the next check: room for that too.
    context = impl.context_length(model)
    check_every = max(1, min(check_every, context - max_new_tokens))
    capacity = min(context, max_new_tokens + check_every)

    queue = list(stories)
    n = min(slots, len(queue))
    if n == 0:
        return
    story = torch.tensor(queue[:n], dtype=torch.long, device=device)
    del queue[:n]
    drawn = torch.zeros(n, dtype=torch.long, device=device)  # tokens drawn by the slot's story
    alive = torch.ones(n, dtype=torch.bool, device=device)
    ended_eos = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    feed = torch.zeros(n, dtype=torch.long, device=device)  # the token each slot reads next
    owned = [True] * n  # host side: the slot holds a story not yet handed out
    start = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    logits, state = impl.prefill(model, start, capacity=capacity)

    def draw(logits: torch.Tensor) -> None:
        """Draw each slot's next token, record it, and set `feed` (all in place)."""
        scores = logits.float() if warp is None else warp(logits.float())
        nxt = draw_tokens(torch.softmax(scores, dim=-1), story_uniforms(key, story, drawn))
        column = drawn.clamp(max=max_new_tokens - 1)[:, None]
        kept = torch.where(alive[:, None], nxt[:, None], tokens.gather(1, column))
        tokens.scatter_(1, column, kept)
        drawn.add_(alive)
        ending = alive & ((nxt == end_id) | (drawn >= max_new_tokens))
        ended_eos.logical_or_(ending & (nxt == end_id))
        alive.logical_and_(~ending)
        feed.copy_(torch.where(alive, nxt, end_id))

    def step() -> None:
        draw(impl.decode(model, feed, state)[0])

    draw(logits)
    del logits
    graphed, graphs_note = None, "off"
    if cuda_graphs:
        graphed, why = _graphed_steps(step, check_every, state, device)
        graphs_note = "on" if graphed is not None else f"off: {why}"
    if report is not None:
        note = getattr(state, "attention_note", "")
        report["attention"] = getattr(state, "attention", impl.name) + (
            f" ({note})" if note else ""
        )
        report["cuda_graphs"] = graphs_note
    while True:
        # look at the slots after steps 1, 1 + check_every, ...: a story's tokens do not depend
        # on when its end is seen, only the idle steps of its slot do
        done_rows = [r for r in (~alive).nonzero().flatten().tolist() if owned[r]]
        if done_rows:
            rows = torch.tensor(done_rows, device=device)
            lengths = drawn[rows].tolist()
            eos = ended_eos[rows].tolist()
            ids = story[rows].tolist()
            host_tokens = tokens[rows].tolist()
            for i, r in enumerate(done_rows):
                owned[r] = False
                kept_tokens = host_tokens[i][: lengths[i] - (1 if eos[i] else 0)]
                yield ids[i], kept_tokens, bool(eos[i])
        idle = (~alive).nonzero().flatten().tolist()
        if not any(owned) and not queue:
            return
        if idle:
            refill = idle[: len(queue)]
            if refill:
                rows = torch.tensor(refill, device=device)
                story[rows] = torch.tensor(queue[: len(refill)], device=device)
                del queue[: len(refill)]
                drawn[rows] = 0
                alive[rows] = True
                ended_eos[rows] = False
                for r in refill:
                    owned[r] = True
            # every idle row restarts at position 0 (refilled or not), so none runs out of
            # cache while it waits
            rows = torch.tensor(idle, device=device)
            state.reset(rows)
            feed[rows] = start_id
        if graphed is not None:
            graphed.replay()
            state.span += check_every  # the replayed steps' host-side count
        else:
            for _ in range(check_every):
                step()


def _graphed_steps(
    step: Callable[[], None], count: int, state: Any, device: torch.device
) -> tuple[Any, str]:
    """`count` calls of `step` recorded as one CUDA graph, or (None, why not).

    Needs a decode state whose steps have the same shapes every time and no host-side input:
    the fast model's with flash attention (`DecodeState.static`; SDPA reads a length that
    grows on the host). Every buffer a step reads or writes is a tensor updated in place, so
    replaying the graph is `count` steps. Autocast's weight cache is off inside the graph (its
    casts are recorded and rerun, as PyTorch requires), and capture is thread-local, so other
    threads (evaluations beside sampling) may use the GPU meanwhile.

    First `count` real steps run eagerly on the stream that then records, so that every kernel,
    library and per-stream workspace (cuBLAS's) a step uses exists before recording, outside
    the graph's memory pool. Nothing runs while recording, so the state is as after those
    steps; the host-side step count is restored. The count starts at 0 for the recording (the
    static steps never read it, but a step checks it against the cache's capacity, which a
    short `max_new_tokens` leaves little above `count` + the steps taken).
    """
    if device.type != "cuda":
        return None, f"{device.type} device"
    if getattr(state, "attention", None) != "flash":
        note = getattr(state, "attention_note", "")
        return None, "needs flash decode attention" + (f" ({note})" if note else "")
    amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(count):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    span = state.span
    state.span = 0
    state.static = True
    graph = torch.cuda.CUDAGraph()
    try:
        # the outer stream context restores this thread's stream even if ending the capture
        # fails inside the inner one's exit
        with (
            torch.cuda.stream(side),
            torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"),
            torch.autocast(
                "cuda", dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False
            ),
        ):
            for _ in range(count):
                step()
    except (RuntimeError, ValueError) as error:
        state.static = False
        return None, f"capture failed: {cause_text(error)}"
    finally:
        state.span = span
    torch.cuda.current_stream(device).wait_stream(side)
    return graph, ""
