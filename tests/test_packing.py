"""Packed windows: consecutive clips joined into <= 30-s windows with one segment each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_baldwhisper.dataset import TokenizedExample
from mlx_baldwhisper.training.data import Batcher
from mlx_baldwhisper.training.packing import (GAP_STEPS, MAX_TOKENS, MIN_CUT_STEPS, WINDOW_STEPS,
                                              Pack, build_window, compose_mel, packed_windows,
                                              plan_packs)

TB, EOT, PROMPT = 1000, 99, [1, 2, 3]  # stand-ins for <|0.00|>, eot and sot/language/task


def synthetic(n: int, seed: int = 0, lo: float = 2.0, hi: float = 9.0) -> list[TokenizedExample]:
    """Clips of lo-hi s whose text tokens name them (10 + index, repeated), with a 2-bin
    log-Mel holding their index over their audio and a low floor after it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo * 50, hi * 50))  # 0.02-s steps
        end = length - int(rng.integers(0, 15))  # speech ends up to 0.3 s before the clip does
        text = [10 + i] * int(rng.integers(1, 12))
        mel = np.full((3000, 2), -1.0, np.float16)
        mel[:2 * length] = i
        out.append(TokenizedExample(f"c{i}", f"t{i}", "ha", mel, np.array([*PROMPT, 60, *text, EOT], np.int32),
                                    4, length * 0.02, np.array([*PROMPT, TB, *text, TB + end, EOT], np.int32)))
    return out


def segments(window) -> list[tuple[int, list[int], int]]:
    """(start, text, end) of each complete segment, and the cut-off start as (start, [], -1)."""
    body, out = window.tokens[len(PROMPT):-1].tolist(), []
    k = 0
    while k < len(body):
        j = k + 1
        while j < len(body) and body[j] < TB:
            j += 1
        out.append((body[k] - TB, body[k + 1:j], body[j] - TB) if j < len(body) else (body[k] - TB, [], -1))
        k = j + 1
    return out


def test_packs_fit_30_s_keep_order_and_cut_at_the_edge():
    items = synthetic(300)
    packs = plan_packs(items, seed=0)
    windows = [build_window(items, p) for p in packs]
    cut = [w for w in windows if w.pack.cut_off is not None]
    assert len(packs) > 40 and 0.3 < len(cut) / len(packs) < 0.7
    seen = []
    for p, w in zip(packs, windows):
        assert list(p.members) == list(range(p.members[0], p.members[0] + len(p.members)))  # consecutive
        segs = segments(w)
        complete = segs[:-1] if p.cut_off is not None else segs
        assert [s[1][0] - 10 for s in complete] == list(p.members)  # every clip's segment, in order
        assert all(s[1] == list(items[i].timestamp_tokens[4:-2]) for s, i in zip(complete, p.members))
        stamps = [t for s in complete for t in (s[0], s[2])]
        assert stamps == sorted(stamps) and 0 == stamps[0] and stamps[-1] <= WINDOW_STEPS  # <= 30 s
        assert w.duration <= 30.0 and len(w.tokens) - len(PROMPT) <= MAX_TOKENS
        for k in range(1, len(p.members)):  # gaps of 0.1-1.0 s of silence
            gap = p.starts[k] - p.starts[k - 1] - round(items[p.members[k - 1]].duration / 0.02)
            assert GAP_STEPS[0] <= gap <= GAP_STEPS[1]
        if p.cut_off is not None:  # the next clip, cut at the edge: only its start, no text
            c = items[p.cut_off]
            assert p.cut_off == p.members[-1] + 1 and segs[-1] == (p.cut_start, [], -1)
            assert p.cut_start <= WINDOW_STEPS - MIN_CUT_STEPS
            assert p.cut_start + int(c.timestamp_tokens[-2]) - TB > WINDOW_STEPS  # its speech crosses it
            assert 10 + p.cut_off not in w.tokens.tolist() and w.duration == pytest.approx(30.0)
            assert w.tokens[-2] == TB + p.cut_start
        else:
            assert w.tokens[-3] < TB <= w.tokens[-2]  # one timestamp at the end: nothing follows
        seen += list(p.members)
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # each clip completes once
    assert len(seen) > 280  # all but the clips left alone between packs


def test_same_seed_same_packs():
    items = synthetic(120)
    a, b = packed_windows(items, 7), packed_windows(items, 7)
    assert [w.pack for w in a] == [w.pack for w in b]
    assert all(np.array_equal(x.mel, y.mel) and np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert [w.pack for w in a] != [w.pack for w in packed_windows(items, 8)]


def test_packs_skip_clips_without_timestamps_and_other_prompts():
    items = synthetic(12, lo=1.0, hi=2.0)
    items[4].timestamp_tokens = None
    for x in items[8:]:  # another language from clip 8 on
        x.tokens[1] = x.timestamp_tokens[1] = 7
    packs = plan_packs(items, 0)
    assert [p.members for p in packs] == [(0, 1, 2, 3), (5, 6, 7), (8, 9, 10, 11)]
    assert build_window(items, packs[2]).tokens[1] == 7
    assert all(p.cut_off is None for p in packs)  # nothing reaches the 30-s edge
    assert plan_packs(synthetic(1), 0) == []  # one clip alone is no pack


def test_the_window_mel_is_its_clips_mels_placed():
    items = synthetic(30)
    for p in plan_packs(items, 3)[:6]:
        mel = build_window(items, p).mel.astype(np.float32)
        placed = list(zip(p.members, p.starts)) + ([(p.cut_off, p.cut_start)] if p.cut_off is not None else [])
        for i, s in placed:
            a, b = 2 * s, min(3000, 2 * (s + round(items[i].duration / 0.02)))
            assert (mel[a:b] == max(i, mel.max() - 2)).all()
        assert mel.min() == mel.max() - 2  # silence between and after: the window's floor


def test_composed_mel_matches_the_mel_of_the_joined_audio():
    from mlx_baldwhisper.audio import N_SAMPLES, log_mel_spectrogram, pad_or_trim

    rng = np.random.default_rng(0)

    def tone(seconds: float, amp: float, hz: float) -> np.ndarray:
        t = np.arange(int(16000 * seconds)) / 16000
        return (amp * np.sin(2 * np.pi * hz * t) + 0.01 * amp * rng.standard_normal(t.size)).astype(np.float32)

    def mel(audio: np.ndarray) -> np.ndarray:
        return np.asarray(log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES), 80))

    clips = [tone(3.01, 0.3, 300), tone(2.5, 0.02, 700), tone(4.3, 0.1, 500)]  # loud and quiet
    starts = [0, 168, 333]  # 0.02-s steps: 0.34 s and 0.16 s of silence between them
    joined = np.zeros(N_SAMPLES, np.float32)
    for c, s in zip(clips, starts):
        joined[320 * s:320 * s + len(c)] = c
    composed = compose_mel([mel(c).astype(np.float16) for c in clips], starts).astype(np.float32)
    diff = np.abs(composed - mel(joined)).max(axis=1)
    junctions = [f for s in starts[1:] for f in (2 * s - 1, 2 * s, 2 * s + 1)]
    assert np.delete(diff, junctions).max() < 2e-3  # float16 rounding
    assert diff.max() > 0.1  # the junctions differ (reflect padding vs the gap's silence)


def test_batches_draw_packs_per_epoch_deterministically_and_resume():
    items = synthetic(60)
    packs = packed_windows(items, 0)
    n = len(items)

    def rows(b: Batcher, epochs: int) -> list[list[int]]:
        out = []
        for _ in range(epochs):
            out.append(sorted(int(i) for batch in b for i in batch["index"]))
        return out

    plain = rows(Batcher(items, 4, seed=1), 2)
    assert rows(Batcher(items, 4, seed=1, packs=packs, pack_prob=0.0), 2) == plain  # 0: today's
    assert rows(Batcher(items, 4, seed=1, packs=packs, pack_prob=1.0), 1)[0] == \
        sorted(set(range(n)) - {i for w in packs for i in w.pack.members}) + [n + k for k in range(len(packs))]
    half = rows(Batcher(items, 4, seed=1, packs=packs, pack_prob=0.5, timestamp_prob=0.5), 3)
    assert half == rows(Batcher(items, 4, seed=1, packs=packs, pack_prob=0.5, timestamp_prob=0.5), 3)
    assert half[0] != half[1]  # drawn again each epoch
    for epoch in half:  # each clip's text once an epoch: alone, or in the pack shown
        shown = [i - n for i in epoch if i >= n]
        texts = [i for i in epoch if i < n] + [i for p in shown for i in packs[p].pack.members]
        assert sorted(texts) == sorted(set(texts)) and 0 < len(shown) < len(packs)

    batch = next(b for b in Batcher(items, 4, seed=1, packs=packs, pack_prob=1.0) if b["index"].max() >= n)
    k = int(np.argmax(batch["index"] >= n))
    w = packs[int(batch["index"][k]) - n]
    assert batch["targets"][k][batch["mask"][k] > 0].tolist() == w.tokens[len(PROMPT):].tolist()  # stamped
    assert np.array_equal(batch["mel"][k], w.mel.astype(np.float32))

    run = Batcher(items, 4, seed=1, packs=packs, pack_prob=0.5, timestamp_prob=0.5)
    first = [run.next_batch() for _ in range(30)]
    for stop in (3, 11, 17):
        run = Batcher(items, 4, seed=1, packs=packs, pack_prob=0.5, timestamp_prob=0.5)
        [run.next_batch() for _ in range(stop)]
        resumed = Batcher(items, 4, seed=0, packs=packs, pack_prob=0.5, timestamp_prob=0.5)
        resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
        again = [resumed.next_batch() for _ in range(30 - stop)]
        assert all(np.array_equal(a[key], b[key]) for a, b in zip(first[stop:], again) for key in a)
    with pytest.raises(ValueError, match="packs"):
        Batcher(items, 4, packs=packs[:-1], pack_prob=0.5).load_state_dict(run.state_dict())
    with pytest.raises(ValueError, match="pack_prob"):
        Batcher(items, 4, packs=packs, pack_prob=2.0)


def test_feature_cache_serves_packs_under_their_own_content_key(tmp_path):
    from conftest import tiny_model
    from mlx_baldwhisper.features import FeatureCache, encoder_fingerprint
    from mlx_baldwhisper.training.common import training_packs
    from mlx_baldwhisper.training.distributed import shard

    model = tiny_model()
    items = synthetic(8, lo=4.0, hi=12.0)
    for x in items:  # tiny model: 80 mel bins
        x.mel = np.repeat(x.mel[:, :1], 80, axis=1)
    cache = FeatureCache(encoder_fingerprint(model), tmp_path / "c")
    cache.compute(model, items, progress=False)
    packs = training_packs(model, items, 0, 1.0, [cache])
    assert packs and all(w in cache for w in packs) and cache.disk_usage()[0] == len(items) + len(packs)
    again = FeatureCache(encoder_fingerprint(model), tmp_path / "c")
    assert all(w in again for w in training_packs(model, items, 0, 1.0, []))  # same seed: same keys
    assert not any(w in again for w in training_packs(model, items, 1, 1.0, []))  # other packs
    other = FeatureCache("another encoder", tmp_path / "c")
    with pytest.raises(ValueError, match="another encoder"):
        training_packs(model, items, 0, 1.0, [other])

    b = Batcher(items, 16, seed=0, features=cache, include_mel=False, packs=packs, pack_prob=1.0)
    batch = b.next_batch()
    n = len(items)
    rows = [i for i in range(len(batch["index"])) if batch["index"][i] >= n]
    assert rows
    for r in rows:
        w = packs[int(batch["index"][r]) - n]
        assert np.array_equal(batch["features"][r], cache.get(w))
        assert not any(np.array_equal(cache.get(w), cache.get(items[i])) for i in w.pack.members)
    half = shard(batch, 1, 2)  # the strided share of a rank: every per-row array alike
    assert np.array_equal(half["index"], batch["index"][1::2])
    assert np.array_equal(half["features"], batch["features"][1::2])
    assert np.array_equal(half["targets"], batch["targets"][1::2])


def test_finetune_with_every_window_packed_runs_end_to_end(corpus):
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    (corpus / "cfg.json").write_text(json.dumps({"finetune": {"pack_prob": 1.0, "timestamp_prob": 0.0},
                                                 "silence_share": 0.0}))
    args = ["finetune", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", str(corpus / "t"),
            "--batch-size", "2", "--eval-limit", "2", "--max-steps", "2", "--config", str(corpus / "cfg.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    files = [f for f in (corpus / "cache").iterdir() if f.suffix == ".npy"]
    assert len(files) == 4 + 1  # the four clips (dev's are among them) and their one pack
    rows = [json.loads(line) for line in (corpus / "t.run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["kind"] == "train"]
    assert train[-1]["step"] == 2 and all(np.isfinite(x["loss"]) for x in train)
    state = json.loads((corpus / "t" / "config.json").read_text())["training"][-1]
    assert state["stage"] == "finetune"


def test_audio_context_stage_trains_on_packs_at_every_context(corpus, tmp_path):
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.training.audio_context import (AudioContextConfig, frozen_copy,
                                                        teach_audio_context)
    from mlx_baldwhisper.training.common import load_data
    from mlx_baldwhisper.training.trainer import TrainConfig

    model = load_model(str(corpus / "start"))
    data = load_data(model, str(corpus / "train.tsv"), str(corpus / "dev.tsv"), "ha",
                     str(tmp_path / "cache"))
    cfg = AudioContextConfig(margin=16, jitter=16, variants=2, batch_size=4, eval_limit=2, pack_prob=1.0,
                             train=TrainConfig(warmup_steps=0, max_steps=2, progress=False, plot=False))
    assert teach_audio_context(model, frozen_copy(model), data, cfg, tmp_path / "short").status == "completed"
    # the 4 clips and their pack at full context and at each training margin, and the 2 dev
    # clips at the inference margin
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4 + 1 + 2 * (4 + 1) + 2
