"""Sequence-level KD: the teacher's transcripts as alternate targets of the training clips."""

import json

import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper.decoding import tokenizer_for
from mlx_baldwhisper.training import seqkd
from mlx_baldwhisper.training.common import load_data
from mlx_baldwhisper.training.data import Batcher
from mlx_baldwhisper.training.recover import RecoverConfig, recover
from mlx_baldwhisper.training.trainer import TrainConfig


@pytest.fixture
def data(corpus):
    model = tiny_model(seed=5)
    return model, load_data(model, str(corpus / "train.tsv"), str(corpus / "dev.tsv"), "ha",
                            str(corpus / "cache"))


def test_pseudo_labels_keep_prompt_and_segment_end_and_obey_the_filter(data):
    model, d = data
    tk = tokenizer_for(model, "ha")
    texts = ["ina kwana", "", "sannu da zuwa yau yau yau", "wani abu daban"]
    labels = seqkd.pseudo_labelled(d.train, texts, tk, max_wer=0.5)
    first = d.train[0]
    ids = tk.encode(" ina kwana")
    assert labels[0].tokens.tolist() == first.tokens[:first.prompt_length].tolist() + ids + [tk.eot]
    assert labels[0].prompt_length == first.prompt_length and labels[0].text == "ina kwana"
    # the timestamped form ends at the human clip's segment end
    assert labels[0].timestamp_tokens[-2] == first.timestamp_tokens[-2]
    assert labels[0].timestamp_tokens[first.prompt_length:-2].tolist() == ids
    assert labels[1] is None  # empty transcript
    # clip 2 ("yaya aiki") vs 6 other words: WER 3.0; clip 3 ("na gode sosai") vs 3 other words: 1.0
    assert labels[2] is None and labels[3] is None
    assert seqkd.pseudo_labelled(d.train, texts, tk)[2] is not None  # no filter: kept
    # at the boundary: clip 1 ("sannu da zuwa") with one word wrong is WER 1/3
    near = ["", "sannu da zuwaa", "", ""]
    assert seqkd.pseudo_labelled(d.train, near, tk, max_wer=1 / 3)[1] is not None
    assert seqkd.pseudo_labelled(d.train, near, tk, max_wer=0.3)[1] is None
    assert seqkd.kept_share(labels) == 0.25


def test_batcher_trains_the_drawn_share_on_alternates(data):
    model, d = data
    tk = tokenizer_for(model, "ha")
    alternates = seqkd.pseudo_labelled(d.train, ["a b", "c d", "", "e f"], tk)

    def targets(prob, seed=0):
        b = Batcher(d.train, 4, seed=seed, features=d.features, include_mel=False, shuffle=False,
                    alternates=alternates, alternate_prob=prob)
        batch = b.next_batch()
        return [tuple(t[m > 0]) for t, m in zip(batch["targets"], batch["mask"])], batch["index"]

    every, idx = targets(1.0)
    for row, i in zip(every, idx):
        expect = d.train[i] if alternates[i] is None else alternates[i]
        assert row == tuple(expect.targets[expect.mask > 0])
    none, idx = targets(0.0)
    assert all(row == tuple(d.train[i].targets[d.train[i].mask > 0]) for row, i in zip(none, idx))
    assert targets(0.5)[0] == targets(0.5)[0]  # drawn from (seed, epoch): the same twice
    with pytest.raises(ValueError, match="one alternate"):
        Batcher(d.train, 4, alternates=alternates[:2], alternate_prob=0.5)


def test_transcripts_are_decoded_once_then_read_back(data, tmp_path, monkeypatch):
    model, d = data
    path = tmp_path / "stage.run" / "teacher_transcripts.json"
    texts = seqkd.teacher_transcripts(model, d, path)
    assert len(texts) == len(d.train) and json.loads(path.read_text())["transcripts"] == texts
    monkeypatch.setattr(seqkd, "evaluate", lambda *a, **kw: pytest.fail("decoded again"))
    assert seqkd.teacher_transcripts(model, d, path) == texts


def test_gather_round_trips_unicode():
    got = seqkd._gather({0: "ƙasa ɗaya", 2: "ok"}, 3)
    assert got == ["ƙasa ɗaya", "", "ok"]


def test_recover_with_seqkd_trains_and_records_it(data, tmp_path):
    model, d = data
    student = tiny_model(seed=6)
    cfg = RecoverConfig(train=TrainConfig(lr=1e-3, warmup_steps=1, max_steps=3, progress=False, plot=False),
                        batch_size=2, eval_limit=1, seqkd_prob=1.0)
    result = recover(student, model, d, cfg, tmp_path / "rec")
    assert result.status == "completed"
    assert seqkd.transcripts_path(model, d, tmp_path / "rec.run").exists()
    assert seqkd.transcripts_path(model, d, tmp_path).parent == d.features.directory / "transcripts"
    record = json.loads((tmp_path / "rec" / "config.json").read_text())["training"][-1]
    assert record["seqkd_prob"] == 1.0


def test_transcripts_of_another_teacher_or_a_torn_file_are_decoded_again(data, tmp_path):
    model, d = data
    path = tmp_path / "other.run" / "t.json"
    texts = seqkd.teacher_transcripts(model, d, path)
    other = tiny_model(seed=9)
    saved = json.loads(path.read_text())
    seqkd.teacher_transcripts(other, d, path)
    assert json.loads(path.read_text())["teacher"] != saved["teacher"]
    path.write_text(path.read_text()[:20])  # torn
    assert seqkd.teacher_transcripts(model, d, path) == texts
