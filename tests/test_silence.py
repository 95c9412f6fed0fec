"""Windows without speech in the training data: empty transcripts, fixed draws, never packed."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_baldwhisper.training.packing import plan_packs
from mlx_baldwhisper.training.silence import (SECONDS, silence_window_count, silence_windows,
                                              with_silence)
from test_packing import EOT, PROMPT, TB, synthetic

LIKE = synthetic(1)[0]


def test_silence_windows_have_empty_transcripts_in_both_forms():
    windows = silence_windows(LIKE, TB, 12, n_mels=80)
    assert len(windows) == 12
    for w in windows:
        assert w.text == "" and w.language == LIKE.language
        assert w.tokens.tolist() == [*PROMPT, 60, EOT]  # eot right after <|notimestamps|>
        assert w.targets[w.mask > 0].tolist() == [EOT]  # only the eot is trained
        stamped = w.with_timestamps()
        assert stamped.tokens.tolist() == [*PROMPT, TB, EOT]  # <|0.00|>, then nothing
        assert stamped.targets[stamped.mask > 0].tolist() == [TB, EOT]
        assert SECONDS[0] <= w.duration <= SECONDS[1]
        assert w.mel.shape == (3000, 80) and w.mel.dtype == LIKE.mel.dtype


def test_silence_windows_are_quiet_varied_and_drawn_the_same_every_time():
    a, b = silence_windows(LIKE, TB, 20, 80), silence_windows(LIKE, TB, 20, 80)
    assert all(np.array_equal(x.mel, y.mel) and x.duration == y.duration for x, y in zip(a, b))
    assert len({round(x.duration, 3) for x in a}) == 20  # lengths differ
    # Whisper's log-Mel puts speech peaks near 1.5 (1.46 on jfk.flac); these stay far below.
    peaks = [float(x.mel.astype(np.float32).max()) for x in a]
    assert max(peaks) < 0.5 and min(peaks) == -1.5  # -1.5: digital silence, the floor


@pytest.mark.parametrize("n, share, expected", [(1741, 0.02, 35), (10, 0.02, 1), (100, 0.0, 0)])
def test_silence_window_count(n, share, expected):
    assert silence_window_count(n, share) == expected


def test_silence_share_out_of_range_is_refused():
    with pytest.raises(ValueError, match="silence_share"):
        silence_window_count(100, 1.5)


def test_silence_windows_join_the_clips_but_never_a_pack():
    clips = synthetic(200)
    items = with_silence(clips, 0.05, TB, 2)
    assert len(items) == 210 and items[:200] == clips
    for pack in plan_packs(items, seed=0):
        placed = [*pack.members, *([pack.cut_off] if pack.cut_off is not None else [])]
        assert all(i < 200 for i in placed)


def test_finetune_trains_on_cached_silence_windows(corpus):
    import json

    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    (corpus / "cfg.json").write_text(json.dumps({"silence_share": 0.5}))
    args = ["finetune", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", str(corpus / "t"),
            "--batch-size", "2", "--eval-limit", "2", "--max-steps", "3", "--config", str(corpus / "cfg.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    train = len((corpus / "train.tsv").read_text().splitlines()) - 1
    files = [f for f in (corpus / "cache").iterdir() if f.suffix == ".npy"]
    assert len(files) == 4 + silence_window_count(train, 0.5)  # the clips, and the silence encoded once
    rows = [json.loads(line) for line in (corpus / "t.run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["kind"] == "train"][-1] == 3
