"""Training conditioned on the previous text, as transcribe() conditions each window."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import mlx.core as mx

from mlx_baldwhisper.training.common import ce_loss, scored
from mlx_baldwhisper.training.data import Batcher
from mlx_baldwhisper.training.losses import cross_entropy
from mlx_baldwhisper.training.packing import packed_windows
from test_packing import EOT, PROMPT, synthetic

SOT_PREV = 50361


def test_prompt_is_input_only():
    clip = synthetic(1)[0]
    prompted = clip.with_prompt([SOT_PREV, 7, 8])
    assert prompted.tokens.tolist() == [SOT_PREV, 7, 8, *clip.tokens.tolist()]
    # the targets trained are exactly the clip's own: its text and eot, never the prompt
    assert prompted.targets[prompted.mask > 0].tolist() == clip.targets[clip.mask > 0].tolist()
    stamped = prompted.with_timestamps()
    assert stamped.tokens.tolist() == [SOT_PREV, 7, 8, *clip.timestamp_tokens.tolist()]
    assert stamped.targets[stamped.mask > 0].tolist() == \
        clip.with_timestamps().targets[clip.with_timestamps().mask > 0].tolist()
    assert clip.with_prompt([]) is clip


def expected_prompt(items, first: int) -> list[int]:
    """What transcribe() would prompt with after the clips before ``first``: each one's
    timestamped segment <|0.00|> text <|end|>, in order, the last 223 tokens."""
    body = [t for x in items[:first] for t in x.timestamp_tokens[len(PROMPT):-1].tolist()]
    return [SOT_PREV, *body[-223:]]


def _trained(b: Batcher) -> dict[int, list[int]]:
    out = {}
    for _ in range(len(b)):
        batch = b.next_batch()
        for row, i in enumerate(batch["index"]):
            n = int(np.flatnonzero(batch["mask"][row])[-1]) + 1  # past it: padding
            out[int(i)] = batch["inputs"][row][:n].tolist()
    return out


def test_a_share_of_items_is_conditioned_on_the_previous_clips_text():
    items = synthetic(400)
    b = Batcher(items, 8, seed=3, prompt_prob=0.5, sot_prev=SOT_PREV)
    seen = _trained(b)
    prompted = [i for i, toks in seen.items() if toks[0] == SOT_PREV]
    assert 0.4 < len(prompted) / len(items) < 0.6 and 0 not in prompted
    for i in prompted:
        prompt = expected_prompt(items, i)
        assert seen[i][:len(prompt)] == prompt
        assert seen[i][len(prompt):len(prompt) + len(PROMPT)] == PROMPT
        assert len(prompt) <= 224 and prompt[-1] == items[i - 1].timestamp_tokens[-2]
    again = _trained(Batcher(items, 8, seed=3, prompt_prob=0.5, sot_prev=SOT_PREV))
    assert again == seen  # the draws come from the seed and epoch alone


def test_prompts_leave_the_timestamp_draws_alone():
    items = synthetic(200)
    plain = Batcher(items, 8, seed=1, timestamp_prob=0.5)
    both = Batcher(items, 8, seed=1, timestamp_prob=0.5, prompt_prob=0.5, sot_prev=SOT_PREV)
    a, b = _trained(plain), _trained(both)
    assert a.keys() == b.keys()
    for i in a:
        body = b[i][b[i].index(PROMPT[0]):] if b[i][0] == SOT_PREV else b[i]
        assert body == a[i]


def test_a_pack_is_conditioned_on_the_clip_before_its_first():
    items = synthetic(120)
    packs = packed_windows(items, seed=0)
    b = Batcher(items, 4, seed=0, packs=packs, pack_prob=1.0, prompt_prob=1.0, sot_prev=SOT_PREV)
    seen = _trained(b)
    for k, p in enumerate(packs):
        i, first = len(items) + k, p.pack.members[0]
        if i in seen and first > 0:
            prompt = expected_prompt(items, first)
            assert seen[i][:len(prompt)] == prompt


def test_prompt_prob_needs_the_token_and_a_share():
    items = synthetic(4)
    with pytest.raises(ValueError, match="sot_prev"):
        Batcher(items, 2, prompt_prob=0.5)
    with pytest.raises(ValueError, match="prompt_prob"):
        Batcher(items, 2, prompt_prob=1.5, sot_prev=SOT_PREV)


def test_long_previous_text_is_cut_to_transcribes_limit():
    items = synthetic(2)
    body = np.arange(10, 400, dtype=np.int32)
    items[0] = replace(items[0], timestamp_tokens=np.array([*PROMPT, 1000, *body, 1100, EOT], np.int32))
    b = Batcher(items, 2, seed=0, shuffle=False, prompt_prob=1.0, sot_prev=SOT_PREV)
    seen = _trained(b)
    assert seen[1][0] == SOT_PREV and seen[1][1:224] == [*body[-222:].tolist(), 1100]
    assert seen[1][224:224 + len(PROMPT)] == PROMPT


def test_prompted_items_are_batched_together():
    """Buckets sort by the length as trained, so an unprompted clip is not padded to a
    prompted batch-mate's 224 tokens."""
    items = synthetic(240)
    b = Batcher(items, 8, seed=0, shuffle=False, prompt_prob=0.5, sot_prev=SOT_PREV)
    lengths = []
    for _ in range(len(b)):
        batch = b.next_batch()
        lengths.append([int(np.flatnonzero(m)[-1]) + 1 for m in batch["mask"]])
    assert all(max(x) <= min(y) for x, y in zip(lengths, lengths[1:]))
    mixed = [x for x in lengths if (x[0] > 60) != (x[-1] > 60)]
    assert len(mixed) <= 1  # one batch at most holds both kinds


def test_loss_over_the_target_rows_equals_the_loss_over_all_positions():
    from conftest import tiny_model

    model, items = tiny_model(), synthetic(40)
    b = Batcher(items, 8, seed=0, prompt_prob=0.5, sot_prev=SOT_PREV, include_mel=False)
    batch = b.next_batch()
    n, mels = batch["inputs"].shape[0], model.dims.n_mels
    batch["mel"] = np.random.default_rng(0).standard_normal((n, 3000, mels)).astype(np.float32) * 0.1
    at = scored(batch)
    assert at.targets.shape == (1, int(batch["mask"].sum()))
    fast = ce_loss(model, batch)[0]
    logits = model.decoder(mx.array(batch["inputs"]), model.embed_audio(mx.array(batch["mel"])))[0]
    full = cross_entropy(logits, mx.array(batch["targets"]), mx.array(batch["mask"]))
    assert abs(fast.item() - full.item()) < 1e-4
