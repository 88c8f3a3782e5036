"""`model.implementation: fast`: GPT-Neo in plain PyTorch, the same function and checkpoints.

The module has the parameter names and shapes of `transformers.GPTNeoForCausalLM`, so state
dicts move both ways and a saved folder is an ordinary transformers checkpoint. What differs is
how it computes:

- Attention is `scaled_dot_product_attention(..., scale=1.0)` (GPT-Neo does not scale by
  1/sqrt(head_dim)) instead of the reference's eager matmul-softmax-matmul. Global layers are
  causal; local layers let position i see positions i-window+1 .. i (the token itself and the
  window-1 before it), the reference's mask `tril(1) xor tril(1, -window)`. Where a sequence is no
  longer than the window the local mask equals the causal one and the fused causal path is used.
- Precision: in fp32 the reference upcasts q and k to fp32, a no-op, and we compute the same
  fp32 attention. Under bf16/fp16 autocast the reference's upcast is undone by autocast itself:
  its q.k matmul runs in the low dtype, so the unscaled scores are rounded to bf16 before the
  softmax (which autocast runs in fp32 on CUDA, in bf16 on the CPU). SDPA also takes
  low-precision q, k, v under autocast, but its fused kernels (flash, memory-efficient, the CPU
  flash kernel) keep the scores and the softmax in fp32 inside the kernel, so ours is at least as
  precise as the reference there; outputs are in the low dtype in both.
- Decoding keeps a preallocated KV cache (`DecodeState`): a full-length cache for global layers
  and a ring buffer of `window` slots for local layers, with a position counter per row so that
  rows can be restarted independently (continuous batching). On CUDA with a bf16/fp16 cache a
  decode step attends with FlashAttention-2's variable-length kernel, which reads each row's
  own positions only; elsewhere with SDPA over the longest row's, masked per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, GPTNeoConfig

from collapse.device import arithmetic_name
from collapse.errors import cause_text
from collapse.models.gpt_neo_hf import gpt_neo_config, init_model

# Buffers older transformers versions wrote into GPT-Neo checkpoints; they are masks, not weights.
_STALE_BUFFERS = (".attn.attention.bias", ".attn.attention.masked_bias")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu_new":
        # transformers' NewGELUActivation is this tanh approximation written out in five ops;
        # the fused kernel is the same formula (differences at float rounding level).
        return lambda x: F.gelu(x, approximate="tanh")
    from transformers.activations import ACT2FN  # any other activation the config names

    return ACT2FN[name]


class _SelfAttention(nn.Module):
    """One attention layer: `attn.attention` of a reference block, same parameters."""

    def __init__(self, config: GPTNeoConfig, local: bool):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = width // config.num_heads
        self.local = local
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=True)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q, k, v = (
            p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, -1))

    def forward(
        self, x: torch.Tensor, local_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-sequence attention; also returns k and v [batch, heads, seq, head_dim]."""
        q, k, v = self._heads(x)
        mask = local_mask if self.local else None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0
        )
        return self._merge(y), k, v

    def step(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        reads: _Reads,
    ) -> torch.Tensor:
        """One token per row: write its k/v at `slots`, attend over what `reads` lets it see.

        `keys`/`values` are [batch, slots, heads, head_dim] (see `DecodeState`).
        """
        q, k, v = self._heads(x)
        keys[rows, slots] = k[:, :, 0].to(keys.dtype)
        values[rows, slots] = v[:, :, 0].to(values.dtype)
        if reads.used is not None:
            y = _flash_decode(q[:, :, 0].to(keys.dtype), keys, values, reads)[:, :, None]
        else:
            view = (keys[:, : reads.read].transpose(1, 2), values[:, : reads.read].transpose(1, 2))
            y = F.scaled_dot_product_attention(q, *view, attn_mask=reads.visible, scale=1.0)
        return self._merge(y)


@dataclass
class _Reads:
    """Which cache slots each row reads in one decode step, for one kind of layer.

    SDPA: every row reads the first `read` slots, masked by `visible` [batch, 1, 1, read].
    Flash: row r reads its own first `used[r]` slots only (int32 [batch]); `starts` is
    r * (the layer's slots per row), int32 [batch + 1], where row r's cache begins in the
    cache viewed as [batch * slots, heads, head_dim]; `read` is then the longest `used`;
    `queries` is 0..batch, int32 (row r's one query is query r), shared by every layer.
    """

    read: int
    visible: torch.Tensor | None = None
    used: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    queries: torch.Tensor | None = None


def _flash_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: _Reads
) -> torch.Tensor:
    """Attention of one query per row [batch, heads, head_dim] over that row's own first
    `reads.used[r]` cache slots, by FlashAttention-2's variable-length kernel.

    A masked SDPA call reads every row's cache up to the furthest row's position (~600 slots
    once a pool of stories is running) while a row holds on average a few hundred fewer; this
    reads each row's own. Called through the private `aten._flash_attention_forward`
    because the public `torch.nn.attention.varlen.varlen_attn` gained `seqused_k` only in
    torch 2.13; `decode_attention` checks that the call works before a state uses it.
    """
    batch, capacity, heads, head_dim = keys.shape
    out = torch.ops.aten._flash_attention_forward(
        q,
        keys.view(batch * capacity, heads, head_dim),
        values.view(batch * capacity, heads, head_dim),
        reads.queries,
        reads.starts,
        1,
        reads.read,
        0.0,
        False,
        False,
        scale=1.0,
        seqused_k=reads.used,
    )[0]
    return out.view(batch, heads, head_dim)


class _MLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        inner = config.intermediate_size or 4 * config.hidden_size
        self.c_fc = nn.Linear(config.hidden_size, inner)
        self.c_proj = nn.Linear(inner, config.hidden_size)
        self.act = _activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, config: GPTNeoConfig, local: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        # `attn.attention.*`: the reference nests the layer one module deeper.
        self.attn = nn.ModuleDict({"attention": _SelfAttention(config, local)})
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = _MLP(config)


class GPTNeoFast(nn.Module):
    """GPT-Neo causal LM with the reference's parameter names; `model(ids)` gives logits."""

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        if not config.tie_word_embeddings:
            raise ValueError("the fast GPT-Neo supports tied input and output embeddings only")
        self.config = config
        width = config.hidden_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, width),
                "wpe": nn.Embedding(config.max_position_embeddings, width),
                "h": nn.ModuleList(
                    _Block(config, kind == "local") for kind in config.attention_layers
                ),
                "ln_f": nn.LayerNorm(width, eps=config.layer_norm_epsilon),
            }
        )
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output head the input embedding (one parameter, as in the reference)."""
        self.lm_head.weight = self.transformer.wte.weight

    @property
    def window(self) -> int:
        """Positions a local layer sees: the current one and `window - 1` before it."""
        return int(self.config.window_size)

    def _local_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        if length <= self.window:
            return None  # the window covers everything before: plain causal attention
        i = torch.arange(length, device=device)
        offset = i[:, None] - i[None, :]
        return (offset >= 0) & (offset < self.window)

    def hidden(
        self, input_ids: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Final hidden states [batch, seq, hidden] of unpadded rows at positions 0..seq-1.

        Args:
            input_ids: [batch, seq] token ids.
            kv: if given, each layer's keys and values [batch, heads, seq, head_dim] are
                appended to it (prefill fills the cache from them).
        """
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        local_mask = self._local_mask(length, input_ids.device)
        for block in self.transformer.h:
            y, k, v = block.attn.attention(block.ln_1(x), local_mask)
            if kv is not None:
                kv.append((k, v))
            x = x + y
            x = x + block.mlp(block.ln_2(x))
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [batch, seq, vocab] of every position."""
        return self.lm_head(self.hidden(input_ids))


@dataclass
class DecodeState:
    """The KV cache of a batch being decoded, one independent sequence per row (slot).

    `keys[i]`/`values[i]` are layer i's cache [batch, slots, heads, head_dim] (slot-major, so a
    row's cache is one contiguous run, as the flash kernel reads it): `capacity` slots for a
    global layer (position p lives in slot p), `min(window, capacity)` for a local one, a ring
    buffer (position p lives in slot p % window, so the slots hold exactly the window).
    `positions[r]` is the position of the next token row r reads (= tokens it has read). A row
    reads only slots holding one of its own positions <= its current one, so stale entries left
    by a row's earlier sequence are never seen. The tensors are updated in place by `decode`.

    For continuous batching: `reset(rows)` starts those rows over (their next token, typically
    BOS, is read at position 0) while the other rows continue; a row must be reset or dropped
    before its position reaches `capacity`. Multi-token prompts for a restarted row are read one
    token per `decode` call (teacher forcing); `prefill` reads equal-length prompts of a whole
    batch at once.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    local: list[bool]
    positions: torch.Tensor
    capacity: int
    window: int
    span: int
    """Host-side max of `positions`: global layers read slots [0, span]; no device sync."""
    zeroed: int
    """Global-cache slots [0, zeroed) hold finite values (written or zeroed). The cache is
    allocated with `torch.empty` (on the CPU, pages of a large allocation that are never touched
    are never committed: a 600-token sample does not pay for 2048 positions); under SDPA each
    slot is zeroed just before it is first read, because garbage NaNs would leak through the
    masked attention (0 * NaN). The flash kernel never reads a slot the row has not written."""
    attention: str = "sdpa"
    """`flash` or `sdpa`: how decode steps attend (`decode_attention`)."""
    attention_note: str = ""
    """Why `sdpa` where flash was not used (empty otherwise)."""
    head: torch.Tensor | None = None
    """The output head's weight in the CUDA autocast dtype at prefill (`next_token_logits`)."""
    static: bool = False
    """Flash only: read lengths are bounded by the cache sizes instead of the host-side `span`,
    so that every step has the same shapes and host inputs (a CUDA graph can record steps);
    the kernel still reads each row's own positions only."""

    def reset(self, rows: torch.Tensor) -> None:
        """Start `rows` (indices or a bool mask over the batch) over as new sequences.

        Their next `decode` token is read at position 0 with no history. Costs one host sync
        (the new maximum position).
        """
        self.positions[rows] = 0
        self.span = int(self.positions.max())


def decode_attention(
    model: GPTNeoFast, device: torch.device, dtype: torch.dtype
) -> tuple[str, str]:
    """How decode steps attend for a cache of `dtype` on `device`: ("flash", "") where
    FlashAttention-2's variable-length kernel runs (a CUDA device, a bf16/fp16 cache, a head
    size that is a multiple of 8 up to 256) and one tiny call shows it reads only the slots
    `seqused_k` allows, else ("sdpa", why).
    """
    heads = model.config.num_heads
    head_dim = model.config.hidden_size // heads
    if device.type != "cuda":
        return "sdpa", f"{device.type} device (flash needs CUDA)"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", f"{arithmetic_name(dtype)} cache (flash takes bf16 or fp16)"
    if head_dim % 8 or head_dim > 256:
        return "sdpa", f"head size {head_dim} (flash takes multiples of 8 up to 256)"
    why = flash_decode_fails(device, dtype, heads, head_dim)
    return ("sdpa", why) if why else ("flash", "")


def flash_decode_fails(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> str:
    """Why `_flash_decode` cannot serve here ("" when it can), from one tiny call: a row whose
    cache holds two slots, of which it may read one, valued 1 there and NaN in the other, so
    the output is all ones only if the kernel runs and never touches the slots it is not told
    to read (a kernel that read and masked them would give NaN: 0 x NaN; the real cache past a
    row's length holds whatever an earlier story left, or never-written memory)."""
    keys = torch.zeros(1, 2, heads, head_dim, dtype=dtype, device=device)
    values = torch.ones_like(keys)
    values[:, 1] = float("nan")
    q = torch.ones(1, heads, head_dim, dtype=dtype, device=device)
    reads = _Reads(
        read=2,
        used=torch.ones(1, dtype=torch.int32, device=device),
        starts=torch.tensor([0, 2], dtype=torch.int32, device=device),
        queries=torch.tensor([0, 1], dtype=torch.int32, device=device),
    )
    try:
        out = _flash_decode(q, keys, values, reads)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return f"flash varlen unavailable: {cause_text(error)}"
    if not bool((out == 1).all()):
        return "flash varlen read past seqused_k"
    return ""


def _new_state(
    model: GPTNeoFast,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    capacity: int,
    attention: str = "auto",
) -> DecodeState:
    """A cache holding the prompt's keys and values (every row read the same `length` tokens).

    `attention`: `auto` (flash where `decode_attention` allows, else SDPA) or `sdpa`.
    """
    batch, heads, length, head_dim = kv[0][0].shape
    device = kv[0][0].device
    window = min(model.window, capacity)
    keys, values, local = [], [], []
    for block, (k, v) in zip(model.transformer.h, kv, strict=True):
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [batch, length, heads, head_dim]
        is_local = block.attn.attention.local
        if is_local:
            shape = (batch, window, heads, head_dim)
            ck, cv = k.new_zeros(shape), v.new_zeros(shape)
            first = max(0, length - window)  # older positions have left the window
            slots = torch.arange(first, length, device=device) % window
            ck.index_copy_(1, slots, k[:, first:])
            cv.index_copy_(1, slots, v[:, first:])
        else:
            shape = (batch, capacity, heads, head_dim)
            ck, cv = k.new_empty(shape), v.new_empty(shape)
            ck[:, :length] = k
            cv[:, :length] = v
        keys.append(ck)
        values.append(cv)
        local.append(is_local)
    positions = torch.full((batch,), length, dtype=torch.long, device=device)
    how, note = "sdpa", "decode attention: sdpa asked for"
    if attention == "auto":
        how, note = decode_attention(model, device, keys[0].dtype)
    elif attention != "sdpa":
        raise ValueError(f"decode attention {attention!r}: auto | sdpa")
    head = _autocast_head(model, device)
    return DecodeState(
        keys, values, local, positions, capacity, window, length, length, how, note, head
    )


@contextlib.contextmanager
def compiled_trunk(model: torch.nn.Module, backend: str = "inductor") -> Iterator[None]:
    """Run `model.hidden` (embeddings, blocks, final norm) through `torch.compile` inside, and
    the training loss's per-chunk elementwise work (`collapse.models.loss.chunk_gradient`:
    log-softmax, weights, the logits' gradient), which eager makes in several passes over
    each [chunk, vocab] block.

    The output head's matmuls stay eager (cuBLAS already runs them whole), and so does the
    loss's backward, which only scales the gradients its forward made. The module tree and
    its state dict are untouched (the compiled functions shadow the method and the loss's
    default on the instance, and are removed on exit).

    Raises:
        ValueError: for a model of another implementation.
    """
    if not isinstance(model, GPTNeoFast):
        raise ValueError("train.compile needs model.implementation: fast")
    from collapse.models.loss import chunk_gradient

    model.hidden = torch.compile(model.hidden, backend=backend)  # type: ignore[method-assign]
    model.loss_gradient = torch.compile(chunk_gradient, backend=backend)
    try:
        yield
    finally:
        del model.hidden, model.loss_gradient


def _autocast_head(model: GPTNeoFast, device: torch.device) -> torch.Tensor | None:
    """The output head's weight in the CUDA autocast dtype, if CUDA autocast is on, else None."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return model.lm_head.weight.to(torch.get_autocast_dtype("cuda"))
    return None


def next_token_logits(
    model: GPTNeoFast, hidden: torch.Tensor, head: torch.Tensor | None = None
) -> torch.Tensor:
    """The head's logits [rows, vocab] for the tokens to draw, from final hidden states.

    Under CUDA autocast the head's GEMM runs in the autocast dtype with an fp32 result
    (`torch.mm(..., out_dtype=torch.float32)`; cuBLAS accumulates in fp32 anyway), instead of
    rounding the logits to bf16, whose spacing at a logit of 10 is 0.06: that would move every
    token's probability by up to ~3%. Elsewhere (fp32, the CPU): the head as is.

    Args:
        model: the model.
        hidden: final hidden states [rows, hidden].
        head: the head's weight already cast to the autocast dtype (`DecodeState.head`: cast
            once per state rather than once per step, 3 bytes a weight saved each step); used
            only when it has that dtype.
    """
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        low = torch.get_autocast_dtype("cuda")
        if head is None or head.dtype != low:
            head = model.lm_head.weight.to(low)
        return torch.mm(hidden.to(low), head.t(), out_dtype=torch.float32)
    return model.lm_head(hidden)


@torch.no_grad()
def decode_step(
    model: GPTNeoFast, next_ids: torch.Tensor, state: DecodeState
) -> tuple[torch.Tensor, DecodeState]:
    """Read one token per row at that row's position; returns its logits [batch, vocab].

    Raises:
        ValueError: when a row's position has reached the cache's capacity.
    """
    if state.span >= state.capacity:
        raise ValueError(
            f"decoding past the cache capacity ({state.capacity} positions): reset or drop rows"
        )
    pos = state.positions
    batch = pos.shape[0]
    rows = torch.arange(batch, device=pos.device)
    read = state.capacity if state.static else state.span + 1  # global slots some row sees
    ring = min(state.window, read)  # ring slots beyond `read` were never written in any row
    if state.attention == "flash":
        # row r's query is query r, and its cache starts r caches into the layer's
        queries = torch.arange(batch + 1, dtype=torch.int32, device=pos.device)
        seen = (pos + 1).to(torch.int32)
        global_reads = _Reads(read, used=seen, starts=queries * state.capacity, queries=queries)
        local_reads = _Reads(
            ring, used=seen.clamp(max=state.window), starts=queries * state.window, queries=queries
        )
    else:
        if read > state.zeroed:
            for is_local, ck, cv in zip(state.local, state.keys, state.values, strict=True):
                if not is_local:
                    ck[:, state.zeroed : read] = 0
                    cv[:, state.zeroed : read] = 0
            state.zeroed = read
        seen_slots = torch.arange(read, device=pos.device) <= pos[:, None]
        global_reads = _Reads(read, visible=seen_slots[:, None, None, :])
        local_reads = _Reads(ring, visible=seen_slots[:, None, None, :ring])
    local_slots = pos % state.window

    tr = model.transformer
    x = (tr.wte(next_ids) + tr.wpe(pos))[:, None, :]
    for block, is_local, ck, cv in zip(tr.h, state.local, state.keys, state.values, strict=True):
        attn = block.attn.attention
        if is_local:
            y = attn.step(block.ln_1(x), ck, cv, rows, local_slots, local_reads)
        else:
            y = attn.step(block.ln_1(x), ck, cv, rows, pos, global_reads)
        x = x + y
        x = x + block.mlp(block.ln_2(x))
    logits = next_token_logits(model, tr.ln_f(x[:, 0]), state.head)
    state.positions += 1
    state.span += 1
    return logits, state


def from_state_dict(config: GPTNeoConfig, state: dict[str, torch.Tensor]) -> GPTNeoFast:
    """A model holding `state` (a GPT-Neo state dict, `lm_head.weight` optional since tied).

    The module is built on the meta device and the tensors are assigned, so no random init
    runs (and the global RNG is untouched).

    Raises:
        ValueError: naming missing or unknown parameters.
    """
    state = {k: v for k, v in state.items() if not k.endswith(_STALE_BUFFERS)}
    with torch.device("meta"):
        model = GPTNeoFast(config)
    expected = set(model.state_dict())
    missing = expected - set(state) - {"lm_head.weight"}
    unknown = set(state) - expected
    if missing or unknown:
        raise ValueError(
            f"not a GPT-Neo state dict: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state, assign=True)
    model.tie_weights()  # assign gives the two names separate Parameters; make them one again
    return model


class FastGPTNeo:
    """`model.implementation: fast`: `GPTNeoFast`, SDPA attention and a preallocated KV cache."""

    name = "fast"
    slots = True  # DecodeState.reset: continuous batching

    def build(
        self, fields: dict[str, Any], vocab_size: int, start_id: int, end_id: int, seed: int
    ) -> GPTNeoFast:
        """See `collapse.models.ModelImplementation`.

        The weights are the reference's for the same seed, copied from a reference model built
        by `gpt_neo_hf.init_model`: the draw order of transformers' initialisation is an
        implementation detail that changes between releases, and copying keeps the two
        implementations' generation-1 models identical in every release.
        """
        reference = init_model(gpt_neo_config(fields, vocab_size, start_id, end_id), seed)
        # a config of our own: the reference model writes its runtime choices into its config
        return from_state_dict(
            gpt_neo_config(fields, vocab_size, start_id, end_id), reference.state_dict()
        )

    def load(self, path: Path, device: torch.device) -> GPTNeoFast:
        """See `collapse.models.ModelImplementation`.

        Reads safetensors weights (one file or shards); other formats go through transformers.
        """
        path = Path(path)
        config = GPTNeoConfig.from_pretrained(str(path))
        files = sorted(path.glob("*.safetensors"))
        if files:
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_file(str(file)))
        else:  # e.g. pytorch_model.bin from an old save_pretrained
            from transformers import GPTNeoForCausalLM

            state = GPTNeoForCausalLM.from_pretrained(str(path)).state_dict()
        return from_state_dict(config, state).to(device)

    def save(self, model: GPTNeoFast, path: Path) -> None:
        """See `collapse.models.ModelImplementation`.

        Writes what `GPTNeoForCausalLM.save_pretrained` writes: config.json,
        generation_config.json and model.safetensors without the tied `lm_head.weight`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = GPTNeoConfig.from_dict(model.config.to_dict())
        config.architectures = ["GPTNeoForCausalLM"]
        config.dtype = model.transformer.wte.weight.dtype
        config.save_pretrained(str(path))
        GenerationConfig.from_model_config(config).save_pretrained(str(path))
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if k != "lm_head.weight"
        }
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    def owns(self, model: Any) -> bool:
        """See `collapse.models.ModelImplementation`."""
        return isinstance(model, GPTNeoFast)

    def count_parameters(self, model: GPTNeoFast) -> dict[str, int]:
        """See `collapse.models.ModelImplementation`."""
        total = sum(p.numel() for p in model.parameters())  # the tied head is one parameter
        embedding = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
        return {"total": total, "non_embedding": total - embedding}

    def logits(
        self,
        model: GPTNeoFast,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`.

        `attention_mask` may mark right padding only (pads at the end of rows), as perplexity
        batches do. Attention is causal, so a real position never sees a later pad, and the
        reference numbers positions 0..seq-1 whatever the mask: the logits at real positions
        are those of the unpadded rows and the mask needs no part in the computation (the
        fused causal kernel stays usable). Logits at pad positions are unspecified.

        Raises:
            ValueError: if the mask has a pad before a real token (left or inner padding).
        """
        if attention_mask is not None and bool(
            (attention_mask[:, 1:] > attention_mask[:, :-1]).any()
        ):
            raise ValueError("the fast GPT-Neo takes right-padded attention masks only")
        return model(input_ids)

    def loss(
        self,
        model: GPTNeoFast,
        input_ids: torch.Tensor,
        weigh: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`: the output head runs in chunks, its
        gradients made in the same pass (`collapse.models.loss.weighted_nll`), so the
        micro-batch's logits never exist whole and are made once.
        """
        from collapse.models.loss import chunk_gradient, weighted_nll

        hidden = model.hidden(input_ids)[:, :-1].flatten(0, 1)
        targets = input_ids[:, 1:].flatten()
        # `compiled_trunk` puts a compiled chunk_gradient on the instance while it runs
        gradient = vars(model).get("loss_gradient", chunk_gradient)
        return weighted_nll(hidden, model.lm_head.weight, targets, weigh, gradient=gradient)

    def features(self, model: GPTNeoFast, input_ids: torch.Tensor) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`."""
        return model.hidden(input_ids)

    def prefill(
        self,
        model: GPTNeoFast,
        input_ids: torch.Tensor,
        capacity: int | None = None,
        attention: str = "auto",
    ) -> tuple[torch.Tensor, DecodeState]:
        """See `collapse.models.ModelImplementation`.

        Args:
            model: the model.
            input_ids: [batch, seq] prompts of equal length (no padding).
            capacity: positions the cache holds per row (default: the model's context length;
                less saves memory when the caller knows its longest sequence).
            attention: how decode steps attend: `auto` (FlashAttention's variable-length
                kernel where `decode_attention` finds it usable, else SDPA) or `sdpa`
                (benchmarks compare the two).

        Returns:
            The last position's logits [batch, vocab] and a `DecodeState`.
        """
        capacity = capacity or self.context_length(model)
        if not input_ids.shape[1] <= capacity <= self.context_length(model):
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens, capacity {capacity}, "
                f"context {self.context_length(model)}"
            )
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            hidden = model.hidden(input_ids, kv)
            last = next_token_logits(model, hidden[:, -1])
        return last, _new_state(model, kv, capacity, attention)

    def decode(
        self, model: GPTNeoFast, next_ids: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState]:
        """See `collapse.models.ModelImplementation` and `decode_step`; `state` is updated."""
        return decode_step(model, next_ids, state)

    def context_length(self, model: GPTNeoFast) -> int:
        """See `collapse.models.ModelImplementation`."""
        return int(model.config.max_position_embeddings)


IMPLEMENTATION = FastGPTNeo()
