"""Timestamped training targets: one segment per clip, drawn for a share of the clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_baldwhisper.dataset import Example, TokenizedExample, prepare, segment_end
from mlx_baldwhisper.tokenizer import get_tokenizer
from mlx_baldwhisper.training.data import Batcher
from mlx_baldwhisper.weights import embedded

SR = 16000


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(embedded.folder("base")[0], True, "en", "transcribe")


def clip(path: Path, speech: float, silence: float = 0.0) -> str:
    t = np.arange(int(SR * speech)) / SR
    audio = np.concatenate([0.3 * np.sin(2 * np.pi * 300 * t), np.zeros(int(SR * silence))])
    sf.write(path, audio.astype(np.float32), SR)
    return str(path)


def test_timestamp_targets_of_a_clip(tmp_path, tokenizer):
    tk = tokenizer
    items, _ = prepare([Example(clip(tmp_path / "a.wav", 1.0, 1.0), "Hello world", "en"),
                        Example(clip(tmp_path / "b.wav", 1.5), "Hi", "en")], tk, 80)
    a, b = items
    sot = [tk.sot, tk.special["<|en|>"], tk.transcribe]
    text = tk.encode(" Hello world")
    assert a.tokens.tolist() == [*sot, tk.no_timestamps, *text, tk.eot]  # today's targets
    # the speech ends at 1.00 s; with the VAD's 0.2-s padding the segment ends at 1.20 s
    assert a.timestamp_tokens.tolist() == [*sot, tk.timestamp_begin, *text, tk.timestamp_begin + 60, tk.eot]
    assert b.timestamp_tokens.tolist() == [*sot, tk.timestamp_begin, *tk.encode(" Hi"),
                                           tk.timestamp_begin + 75, tk.eot]  # all speech: 1.50 s
    stamped = a.with_timestamps()
    assert stamped.prompt_length == 3 and stamped.mel is a.mel
    assert stamped.targets[stamped.mask > 0].tolist() == [tk.timestamp_begin, *text,
                                                          tk.timestamp_begin + 60, tk.eot]
    assert a.targets[a.mask > 0].tolist() == [*text, tk.eot]
    assert tk.decode_with_timestamps(stamped.tokens[3:].tolist()) == \
        "<|0.00|> Hello world<|1.20|><|endoftext|>"


def test_segment_end_is_rounded_and_clamped():
    assert segment_end(np.zeros(SR)) == pytest.approx(1.0)  # no speech found: the whole clip
    t = np.arange(int(SR * 1.234)) / SR
    assert segment_end(np.sin(2 * np.pi * 300 * t)) == pytest.approx(1.24)
    assert segment_end(np.ones(SR * 31)) == pytest.approx(30.0)
    assert segment_end(np.ones(10)) == pytest.approx(0.02)


def items_with_timestamps(n: int, eot: int = 99) -> list[TokenizedExample]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        text = list(rng.integers(3, 50, rng.integers(1, 9)))
        toks = np.array([1, 2, 60] + text + [eot], np.int32)  # 60 stands for <|notimestamps|>
        stamped = np.array([1, 2, 61] + text + [61 + i, eot], np.int32)
        out.append(TokenizedExample(f"clip{i}", "t", "en", np.full((4, 2), i, np.float16), toks, 3, 1.0,
                                    stamped))
    return out


def epochs(b: Batcher, n: int) -> list[dict[int, list[int]]]:
    """Per epoch, each item's targets as trained."""
    out = []
    for _ in range(n):
        seen = {}
        for batch in b:
            for k, i in enumerate(batch["index"]):
                seen[int(i)] = batch["targets"][k][batch["mask"][k] > 0].tolist()
        out.append(seen)
    return out


def test_timestamp_prob_draws(tmp_path):
    items = items_with_timestamps(40)
    plain = [x.targets[x.mask > 0].tolist() for x in items]
    stamped = [x.with_timestamps().targets[x.with_timestamps().mask > 0].tolist() for x in items]

    today = Batcher(items, 4, seed=3)
    never = Batcher(items, 4, seed=3, timestamp_prob=0.0)
    for a, b in zip(today, never):  # 0: today's batches, exactly
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(seen == dict(enumerate(plain)) for seen in epochs(Batcher(items, 4, seed=3, timestamp_prob=0.0), 2))
    assert all(seen == dict(enumerate(stamped)) for seen in epochs(Batcher(items, 4, seed=3, timestamp_prob=1.0), 2))

    half = epochs(Batcher(items, 4, seed=3, timestamp_prob=0.5), 3)
    assert half == epochs(Batcher(items, 4, seed=3, timestamp_prob=0.5), 3)  # deterministic
    assert half != epochs(Batcher(items, 4, seed=4, timestamp_prob=0.5), 3)
    for seen in half:
        chosen = [i for i in range(40) if seen[i] == stamped[i]]
        assert 10 <= len(chosen) <= 30 and all(seen[i] in (plain[i], stamped[i]) for i in range(40))
    assert half[0] != half[1]  # drawn again each epoch

    run = Batcher(items, 4, seed=3, timestamp_prob=0.5)  # a resumed run draws the same
    first = [run.next_batch() for _ in range(25)]  # 10 batches an epoch
    for stop in (5, 10, 14):
        run = Batcher(items, 4, seed=3, timestamp_prob=0.5)
        [run.next_batch() for _ in range(stop)]
        resumed = Batcher(items, 4, seed=0, timestamp_prob=0.5)
        resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
        again = [resumed.next_batch() for _ in range(25 - stop)]
        assert all(np.array_equal(a["targets"], b["targets"]) for a, b in zip(first[stop:], again))
    with pytest.raises(ValueError, match="timestamp_prob"):
        Batcher(items, 4, timestamp_prob=1.5)


def test_batches_mask_the_timestamps_in_not_out():
    items = items_with_timestamps(4)
    batch = Batcher(items, 4, shuffle=False, timestamp_prob=1.0).next_batch()
    for k, i in enumerate(batch["index"]):
        n = len(items[i].timestamp_tokens) - 1
        assert batch["targets"][k, :n].tolist() == items[i].timestamp_tokens[1:].tolist()
        assert batch["mask"][k, 1:n].all() and batch["mask"][k, n:].sum() == 0
        assert batch["targets"][k, 1] == 61  # <|0.00|> is a trained target ...
        assert batch["targets"][k, n - 2] == 61 + i  # ... and so is the end


def test_stage_configs_carry_timestamp_prob():
    from mlx_baldwhisper.training.common import StageData, stage_settings
    from mlx_baldwhisper.training.finetune import FinetuneConfig
    from mlx_baldwhisper.training.recipe import RecipeConfig
    from mlx_baldwhisper.training.recover import RecoverConfig
    from mlx_baldwhisper.training.shear import ShearConfig, token_frequencies

    for cls in (FinetuneConfig, RecoverConfig, ShearConfig):
        assert cls().timestamp_prob == 0.5
    cfg = RecipeConfig.from_dict({"finetune": {"timestamp_prob": 0.0}, "shear": {"timestamp_prob": 1.0}})
    assert (cfg.finetune.timestamp_prob, cfg.recover.timestamp_prob, cfg.shear.timestamp_prob) == (0.0, 0.5, 1.0)
    assert cfg.search.recover.timestamp_prob == 0.5
    items = items_with_timestamps(6)
    data = StageData(items, items, "en", None)
    assert stage_settings(FinetuneConfig(), data)["timestamp_prob"] == 0.5  # checked on resume
    assert data.batches(2, 0, timestamp_prob=0.25).timestamp_prob == 0.25

    plain = token_frequencies(data, 100, 0.0)
    assert plain[60] > 0 and plain[61] == 0  # today's weights: no timestamps
    mixed = token_frequencies(data, 100, 0.0, timestamp_prob=0.5, timestamp_begin=61)
    assert 0 < mixed[60] < plain[60]  # <|notimestamps|> is fed to half the clips now
    assert np.allclose(mixed[61:], mixed[61]) and mixed[61] > 0  # spread over every timestamp
    assert mixed.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("stage", ["recover", "shear"])
def test_distillation_runs_over_the_timestamp_tokens(stage, tokenizer):
    """The teacher's and student's losses cover the timestamp targets: dropping them from
    the mask changes the loss."""
    import mlx.core as mx

    from conftest import tiny_model
    from mlx_baldwhisper.surgery import Surgery, compress
    from mlx_baldwhisper.training.losses import LearnableTemperature
    from mlx_baldwhisper.training.recover import distill_loss_fn
    from mlx_baldwhisper.training.shear import ShearConfig, shear_loss_fn

    tk = tokenizer
    sot = [tk.sot, tk.special["<|en|>"], tk.transcribe, tk.no_timestamps]
    text = tk.encode(" hello there")
    items = []
    for i in range(2):
        toks = np.array([*sot, *text, tk.eot], np.int32)
        stamped = np.array([*sot[:-1], tk.timestamp_begin, *text, tk.timestamp_begin + 50 + i, tk.eot], np.int32)
        items.append(TokenizedExample(f"c{i}", "t", "en", np.zeros((4, 2), np.float16), toks, 4, 1.0, stamped))
    batch = Batcher(items, 2, shuffle=False, include_mel=False, timestamp_prob=1.0).next_batch()
    batch["features"] = np.random.default_rng(0).standard_normal((2, 1500, 32)).astype(np.float32)
    teacher = tiny_model(seed=1)
    t = LearnableTemperature(2.0)
    if stage == "recover":
        student, loss_fn = tiny_model(seed=2), distill_loss_fn(teacher, t, 1.0, 1.0)
    else:
        student = compress(tiny_model(seed=2), Surgery(rank=8))
        loss_fn = shear_loss_fn(teacher, t, ShearConfig(rank=8))
    stamps = batch["targets"] >= tk.timestamp_begin
    assert stamps.sum() == 4 and (batch["mask"][stamps] == 1).all()
    full = loss_fn(student, batch)[1]
    without = loss_fn(student, {**batch, "mask": batch["mask"] * ~stamps})[1]
    for part in ("ce", "kl"):
        assert abs(float(full[part]) - float(without[part])) > 1e-4, part
        assert mx.isfinite(full[part]).item()


def test_timestamp_targets_of_a_packed_window(tmp_path, tokenizer):
    """Two clips joined 0.2 s apart, then a third cut off at the 30-s edge: one segment per
    complete clip, the cut-off one only as its start (openai's long-form form), no text."""
    from mlx_baldwhisper.training.packing import Pack, build_window

    tk = tokenizer
    items, _ = prepare([Example(clip(tmp_path / "a.wav", 1.0, 1.0), "Hello world", "en"),
                        Example(clip(tmp_path / "b.wav", 1.5), "Hi", "en"),
                        Example(clip(tmp_path / "c.wav", 2.0), "Cut off", "en")], tk, 80)
    sot = [tk.sot, tk.special["<|en|>"], tk.transcribe]
    hello, hi = tk.encode(" Hello world"), tk.encode(" Hi")
    ts = tk.timestamp_begin
    # a: 2.00 s of audio, speech to 1.20 s; b after a 0.20-s gap at 2.20 s, speech to 3.70 s
    whole = build_window(items, Pack((0, 1), (0, 110)))
    assert whole.tokens.tolist() == [*sot, ts, *hello, ts + 60, ts + 110, *hi, ts + 185, tk.eot]
    assert tk.decode_with_timestamps(whole.tokens[3:].tolist()) == \
        "<|0.00|> Hello world<|1.20|><|2.20|> Hi<|3.70|><|endoftext|>"
    assert whole.prompt_length == 3 and whole.with_timestamps() is whole
    assert whole.targets[whole.mask > 0].tolist() == whole.tokens[3:].tolist()  # from <|0.00|> on
    assert whole.duration == pytest.approx(3.70) and whole.text == "Hello world Hi"

    cut = build_window(items, Pack((0, 1), (0, 110), cut_off=2, cut_start=1480))
    assert tk.decode_with_timestamps(cut.tokens[3:].tolist()) == \
        "<|0.00|> Hello world<|1.20|><|2.20|> Hi<|3.70|><|29.60|><|endoftext|>"
    assert cut.tokens.tolist() == [*sot, ts, *hello, ts + 60, ts + 110, *hi, ts + 185, ts + 1480, tk.eot]
    assert cut.duration == pytest.approx(30.0) and cut.text == "Hello world Hi"
