"""The fast GPT-Neo computes the reference's function and reads and writes its checkpoints.

Models here get "sharp" random weights (`_sharpen`): with the default init (std 0.02) attention
is nearly uniform and a misplaced mask or window changes logits by little more than rounding, so
equality would prove little. Sharpened, a one-position window error moves logits by orders of
magnitude more than the tolerances (`test_the_window_is_exact_off_by_one_is_not` checks that).

Tolerances: both sides compute in fp32 with different kernels (SDPA vs matmul-softmax-matmul,
fused vs five-op tanh GELU), so results agree to float rounding, not bitwise. fp32 rounds at
6e-8 relative; sums over hundreds of terms, through up to 8 layers with peaked softmaxes, grow
that to a few 1e-6 of the output's scale (measured: 3e-6 to 8e-6 of max |logit| for sharpened
models, about 1e-6 for default-init ones). So outputs are compared as
max |ours - reference| <= RTOL * max |reference| with RTOL = 3e-5, unless a test says otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoForCausalLM

from collapse.config import ModelConfig
from collapse.metrics.perplexity import perplexity
from collapse.models import (
    build_model,
    count_parameters,
    implementation,
    implementation_of,
    load_model,
    resolve_model_fields,
    save_model,
)
from collapse.models.gpt_neo_fast import GPTNeoFast, from_state_dict
from collapse.models.gpt_neo_fast import decode_attention as gpt_neo_fast_decode_attention
from collapse.models.gpt_neo_hf import gpt_neo_config
from collapse.sample import sample_batch

RTOL = 3e-5  # fp32 rounding through different kernels, relative to the output scale (see above)
FAST, REF = implementation("fast"), implementation("transformers")
# Window 8 with sequences of 40: most positions of a local layer see a strict suffix.
WINDOWED = dict(
    num_layers=4, hidden_size=32, num_heads=4, window_size=8, max_position_embeddings=64
)


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is peaked and every position matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.w" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "wpe" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # q.k ~ 4 sqrt(head_dim): peaked softmax rows
                p.copy_(2 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def _pair(fields: dict, vocab: int = 97, seed: int = 0, sharpen: bool = True):
    """The reference and ours holding the same weights."""
    model_cfg = ModelConfig(**fields)
    ref = REF.build(resolve_model_fields(model_cfg), vocab, 0, 0, seed).eval()
    if sharpen:
        _sharpen(ref, seed)
    config = gpt_neo_config(resolve_model_fields(model_cfg), vocab, 0, 0)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}  # no shared storage
    return ref, from_state_dict(config, state).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _close(expected: torch.Tensor, got: torch.Tensor, rtol: float = RTOL) -> bool:
    """Equal up to `rtol` of the expected output's largest magnitude (see the module notes)."""
    return _max_diff(expected, got) <= rtol * float(expected.abs().max())


@torch.no_grad()
@pytest.mark.parametrize(
    "fields, vocab, length",
    [
        (dict(preset="tinystories-1m"), 50257, 48),
        (dict(preset="tinystories-33m"), 512, 16),  # small vocab: the 33M trunk is the point
        (WINDOWED, 97, 40),
    ],
    ids=["1m", "33m", "window-8-seq-40"],
)
def test_same_weights_same_logits(fields, vocab, length):
    ref, ours = _pair(fields, vocab)
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    assert _close(ref(ids).logits, ours(ids))


@torch.no_grad()
def test_the_window_is_exact_off_by_one_is_not():
    ref, ours = _pair(WINDOWED)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    expected = ref(ids).logits
    assert _close(expected, ours(ids))
    for wrong in (7, 9):  # the current token plus 6 previous, or plus 8 (right: plus 7)
        ours.config.window_size = wrong
        assert not _close(expected, ours(ids), rtol=100 * RTOL)


def test_gradients_equal_the_reference():
    ref, ours = _pair(WINDOWED)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    for logits in (ref(ids).logits, ours(ids)):
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        ).backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        # backward through other kernels: the same rounding argument, per parameter's scale
        assert _close(grads[name].grad, p.grad), name


@torch.no_grad()
def test_right_padded_batch_equals_the_reference_at_real_positions():
    ref, ours = _pair(WINDOWED)
    lengths = [40, 23, 9, 1]
    ids = torch.randint(1, 97, (4, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0  # pad = eos, as perplexity pads
    expected, got = ref(ids, attention_mask=mask).logits, FAST.logits(ours, ids, mask)
    for row, n in enumerate(lengths):
        assert _close(expected[row, :n], got[row, :n])
        alone = ours(ids[row : row + 1, :n])[0]  # the padded row equals the row alone
        assert _close(alone, got[row, :n])  # batch shape may change the kernel's rounding
    with pytest.raises(ValueError, match="right-padded"):
        FAST.logits(ours, ids, mask.flip(1))  # left padding


@torch.no_grad()
def test_greedy_decoding_is_token_identical_to_generate():
    ref, ours = _pair(WINDOWED)
    prompt = torch.randint(1, 97, (3, 5), generator=torch.Generator().manual_seed(5))
    new = 30  # 35 positions, far past the window of 8
    expected = ref.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
    )[:, 5:]
    last, state = FAST.prefill(ours, prompt)
    tokens = []
    for _ in range(new):
        nxt = last.argmax(-1)
        tokens.append(nxt)
        last, state = FAST.decode(ours, nxt, state)
    assert torch.equal(torch.stack(tokens, 1), expected)


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 5, 12])  # 12: the prompt alone overflows the window
def test_prefill_and_decode_equal_the_full_sequence(prompt_len):
    _, ours = _pair(WINDOWED)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(6))
    full = ours(ids)
    last, state = FAST.prefill(ours, ids[:, :prompt_len], capacity=48)
    steps = [last]
    for t in range(prompt_len, 40):
        last, state = FAST.decode(ours, ids[:, t], state)
        steps.append(last)
    # the cached path is other kernels on other shapes: rounding again, so RTOL
    assert _close(full[:, prompt_len - 1 :], torch.stack(steps, 1))
    assert state.positions.tolist() == [40] * 3


@torch.no_grad()
def test_a_reset_row_starts_a_new_sequence_while_the_others_continue():
    _, ours = _pair(WINDOWED)
    gen = torch.Generator().manual_seed(7)
    first, second = (
        torch.randint(0, 97, (2, 30), generator=gen),
        torch.randint(0, 97, (20,), generator=gen),
    )
    last, state = FAST.prefill(ours, first[:, :1])
    for t in range(1, 25):  # row 1 is 25 tokens in (past the window) when it is reset
        last, state = FAST.decode(ours, first[:, t], state)
    state.reset(torch.tensor([1]))
    assert state.positions.tolist() == [25, 0]
    row0, row1 = [], []
    for t in range(20):
        nxt = torch.stack([first[0, 25 + t] if t < 5 else second[t], second[t]])
        last, state = FAST.decode(ours, nxt, state)
        row0.append(last[0])
        row1.append(last[1])
    assert _close(ours(second[None])[0], torch.stack(row1))
    continued = torch.cat([first[0, :30], second[5:20]])
    assert _close(ours(continued[None])[0, 25:], torch.stack(row0))


def _varlen_by_hand(q, keys, values, reads):
    """What FlashAttention's variable-length kernel computes from the arguments `_flash_decode`
    passes it: row r attends to the `used[r]` rows of the flattened cache from `starts[r]` on."""
    batch, capacity, heads, head_dim = keys.shape
    flat_k, flat_v = (t.reshape(batch * capacity, heads, head_dim) for t in (keys, values))
    assert reads.starts.tolist() == [r * capacity for r in range(batch + 1)]
    assert reads.queries.tolist() == list(range(batch + 1))  # one query per row
    assert reads.used.dtype == torch.int32 and int(reads.used.max()) <= reads.read
    out = []
    for r in range(batch):
        start, used = int(reads.starts[r]), int(reads.used[r])
        k, v = flat_k[start : start + used].transpose(0, 1), flat_v[start : start + used]
        weights = torch.softmax(q[r, :, None, :] @ k.transpose(1, 2), dim=-1)  # scale 1
        out.append((weights @ v.transpose(0, 1))[:, 0])
    return torch.stack(out)


@torch.no_grad()
def test_the_flash_decode_path_reads_each_rows_own_positions(monkeypatch):
    # The CUDA kernel cannot run here; its arguments can. With the kernel replaced by what it
    # computes, the flash path (per-row lengths into the slot-major cache, ring included) gives
    # the masked SDPA path's logits, through a wrap of the window and a reset row.
    from collapse.models import gpt_neo_fast

    _, ours = _pair(WINDOWED)
    monkeypatch.setattr(gpt_neo_fast, "_flash_decode", _varlen_by_hand)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(9))
    runs = []
    for how in ("sdpa", "flash"):
        last, state = FAST.prefill(ours, ids[:, :2], capacity=48, attention="sdpa")
        state.attention = how
        steps = [last]
        for t in range(2, 40):
            if t == 20:
                state.reset(torch.tensor([2]))
            last, state = FAST.decode(ours, ids[:, t], state)
            steps.append(last)
        runs.append(torch.stack(steps, 1))
    assert _close(runs[0], runs[1])


def test_the_flash_check_catches_a_kernel_that_fails_or_reads_too_far(monkeypatch):
    # the check's own tiny call, with the CUDA kernel replaced by stand-ins on the CPU
    from collapse.models import gpt_neo_fast

    cpu = torch.device("cpu")

    def reads_everything(q, keys, values, reads):
        return _varlen_by_hand(q, keys, values, replace(reads, used=torch.full_like(reads.used, 2)))

    def missing(q, keys, values, reads):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")

    verdicts = {}
    for name, kernel in (("right", _varlen_by_hand), ("far", reads_everything), ("no", missing)):
        monkeypatch.setattr(gpt_neo_fast, "_flash_decode", kernel)
        verdicts[name] = gpt_neo_fast.flash_decode_fails(cpu, torch.float32, 4, 8)
    assert verdicts == {
        "right": "",
        "far": "flash varlen read past seqused_k",
        "no": "flash varlen unavailable: RuntimeError: FlashAttention only supports Ampere GPUs "
        "or newer. more",
    }


def test_decode_attention_says_why_it_uses_sdpa():
    _, ours = _pair(WINDOWED)
    cpu = torch.device("cpu")
    assert gpt_neo_fast_decode_attention(ours, cpu, torch.bfloat16) == (
        "sdpa",
        "cpu device (flash needs CUDA)",
    )
    _, state = FAST.prefill(ours, torch.zeros(2, 1, dtype=torch.long))
    assert (state.attention, state.attention_note) == ("sdpa", "cpu device (flash needs CUDA)")
    with pytest.raises(ValueError, match="auto | sdpa"):
        FAST.prefill(ours, torch.zeros(2, 1, dtype=torch.long), attention="fastest")


@pytest.mark.gpu
@torch.no_grad()
def test_flash_and_sdpa_decoding_agree_on_cuda():
    # the 33M trunk's head size (48) under bf16 autocast: the path `sample.precision: auto` takes
    cuda = torch.device("cuda")
    _, ours = _pair(dict(preset="tinystories-33m", window_size=8), vocab=512, sharpen=False)
    ours = ours.to(cuda)
    ids = torch.randint(0, 512, (6, 40), generator=torch.Generator().manual_seed(10)).to(cuda)
    runs = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for how in ("auto", "sdpa"):
            last, state = FAST.prefill(ours, ids[:, :1], capacity=48, attention=how)
            assert state.attention == ("flash" if how == "auto" else "sdpa"), state.attention_note
            steps = [last]
            for t in range(1, 40):
                if t == 20:
                    state.reset(torch.tensor([1, 4], device=cuda))
                last, state = FAST.decode(ours, ids[:, t], state)
                steps.append(last)
            runs.append(torch.stack(steps, 1).float())
    # both in bf16, through different kernels: bf16 rounding (2^-8) of the output's scale
    assert _close(runs[1], runs[0], rtol=2e-2)


@torch.no_grad()
def test_decoding_past_the_capacity_is_an_error():
    _, ours = _pair(WINDOWED)
    _, state = FAST.prefill(ours, torch.zeros(2, 3, dtype=torch.long), capacity=4)
    _, state = FAST.decode(ours, torch.zeros(2, dtype=torch.long), state)
    with pytest.raises(ValueError, match="capacity"):
        FAST.decode(ours, torch.zeros(2, dtype=torch.long), state)


def test_transformers_checkpoints_load_and_ours_load_in_transformers(tmp_path: Path):
    ref, ours = _pair(WINDOWED)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(8))
    REF.save(ref, tmp_path / "ref")
    loaded = FAST.load(tmp_path / "ref", torch.device("cpu"))
    FAST.save(ours, tmp_path / "ours")
    theirs = GPTNeoForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        assert torch.equal(loaded(ids), ours(ids))  # same weights, same code: bitwise
        assert torch.equal(theirs(ids).logits, expected)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == ref_config
    for name, p in theirs.state_dict().items():
        assert torch.equal(p, ref.state_dict()[name]), name


def test_build_equals_the_reference_build_and_leaves_the_global_rng_alone():
    fields = resolve_model_fields(ModelConfig(**WINDOWED))
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    ours = FAST.build(fields, 97, 0, 0, seed=11)
    assert torch.equal(torch.rand(3), expected_draw)
    ref = REF.build(fields, 97, 0, 0, seed=11)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(p, ref.state_dict()[n]) for n, p in ours.state_dict().items())
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_dispatch_counts_and_config_round_trip(tmp_path: Path):
    model_cfg = ModelConfig(preset="tinystories-1m", implementation="fast")
    model = build_model(model_cfg, 50257, 50256, 50256, seed=0)
    assert isinstance(model, GPTNeoFast) and implementation_of(model) is FAST
    assert count_parameters(model) == {"total": 3_745_984, "non_embedding": 398_464}
    assert FAST.context_length(model) == 2048
    save_model(model, tmp_path)
    again = load_model(model_cfg, tmp_path, torch.device("cpu"))
    assert implementation_of(again) is FAST
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_sampling_and_perplexity_run_on_the_fast_model_and_match_the_reference():
    ref, ours = _pair(WINDOWED, sharpen=False)  # trained-like scale: samples are not all alike
    drawn = {}
    for name, model in (("ref", ref), ("ours", ours)):
        torch.manual_seed(9)
        drawn[name] = sample_batch(model, 6, 30, bos_id=0, eos_id=0)
    # Same RNG stream and logits equal to ~1e-7: a draw differs only if a uniform lands within
    # ~1e-7 of a CDF step, which does not happen for these fixed seeds (deterministic on CPU).
    assert drawn["ours"] == drawn["ref"]
    docs = [list(range(1, 30)), [5, 6, 7], list(range(40, 90))]  # the last one spans 2 windows
    expected = perplexity(ref, docs, 0, 0, context=32, batch_size=2)
    got = perplexity(ours, docs, 0, 0, context=32, batch_size=2)
    assert got["tokens"] == expected["tokens"]
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)  # fp32 rounding
