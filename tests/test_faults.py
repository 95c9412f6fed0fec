"""Faults a long run meets on a laptop: damaged checkpoints, a full disk, and a second
process on the same output. (kill -9 at random moments: test_kill.py.)"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_model
from test_trainer import ListBatcher, ce_loss, cfg, make_batches, same, tiny, weights
from mlx_baldwhisper import diskspace, load_model, locks
from mlx_baldwhisper.cli import main
from mlx_baldwhisper.convert import convert
from mlx_baldwhisper.diskspace import DiskFullError
from mlx_baldwhisper.evaluate import save_hypotheses
from mlx_baldwhisper.features import FeatureCache
from mlx_baldwhisper.folders import MARKER
from mlx_baldwhisper.locks import OutputBusyError
from mlx_baldwhisper.training import merge_search as search_module
from mlx_baldwhisper.training.checkpoint import (CorruptCheckpointError, load_checkpoint,
                                                 resumable_checkpoint, verify_checkpoint)
from mlx_baldwhisper.training.merge_search import MergeSearchConfig, merge_search
from mlx_baldwhisper.training.recipe import Recipe, RecipeConfig
from mlx_baldwhisper.training.trainer import Trainer
from mlx_baldwhisper.weights import mlx_folder


def train(out: Path, steps: int, **kw):
    """``steps`` steps into ``out``, resuming; with a constant learning rate, so that a run
    extended to more steps equals one that went there at once."""
    model = tiny(0)
    settings = cfg(max_steps=steps, schedule="constant", warmup_steps=0, **kw)
    res = Trainer(model, ce_loss, settings, out).train(ListBatcher(make_batches(3)), resume=True)
    return res, model


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- 2. torn or corrupt checkpoints --------------------------------------------------

@pytest.mark.parametrize("damage", ["flipped bit", "torn file", "no manifest", "bad manifest",
                                    "legacy torn"])
def test_a_damaged_checkpoint_is_skipped_and_the_run_still_ends_identical(tmp_path, caplog, damage):
    _, reference = train(tmp_path / "ref", 8)
    train(tmp_path / "run", 6, save_every=2)
    newest = step_dir(tmp_path / "run", 6)
    weights_file = newest / "model.safetensors"
    if damage == "flipped bit":
        flip_byte(weights_file, weights_file.stat().st_size // 2)
    elif damage == "torn file":
        with open(newest / "optimizer.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    elif damage == "no manifest":
        (newest / "manifest.json").unlink()
    elif damage == "legacy torn":  # as written before manifests, then torn
        (newest / "manifest.json").unlink()
        state = json.loads((newest / "state.json").read_text())
        del state["format"]
        (newest / "state.json").write_text(json.dumps(state))
        with open(weights_file, "r+b") as f:
            f.truncate(100)
    else:
        (newest / "manifest.json").write_text("{not json")
    assert verify_checkpoint(newest) is not None
    with caplog.at_level(logging.WARNING):
        res, model = train(tmp_path / "run", 8, save_every=2)
    skipped = [m for m in caplog.messages if "skipping the checkpoint" in m]
    assert len(skipped) == 1 and "step-00000006" in skipped[0], caplog.messages
    assert res.status == "completed" and same(weights(model), weights(reference))
    assert verify_checkpoint(step_dir(tmp_path / "run", 6)) is None  # re-saved whole


def test_a_damaged_checkpoint_is_never_loaded(tmp_path):
    for run in ("a", "b"):
        train(tmp_path / run, 4, save_every=2)
        flip_byte(step_dir(tmp_path / run, 4) / "state.json", 5)
    flip_byte(step_dir(tmp_path / "b", 2) / "model.safetensors", 200)
    other = tiny(5)
    tr = Trainer(other, ce_loss, cfg(), tmp_path / "unused")
    with pytest.raises(CorruptCheckpointError, match="state.json does not match its SHA-256"):
        load_checkpoint(step_dir(tmp_path / "a", 4), other, tr.optimizer)
    assert load_checkpoint(tmp_path / "a", other, tr.optimizer)["step"] == 2  # a run: its good one
    assert resumable_checkpoint(tmp_path / "b") is None
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        load_checkpoint(tmp_path / "b", other, tr.optimizer)


# -- 3. a full disk ------------------------------------------------------------------

def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_mx_save(monkeypatch):
    """mx.save_safetensors stores a third of the file, then fails as a full disk does."""
    real = mx.save_safetensors

    def save(path, arrays, metadata=None):
        real(path, arrays, metadata)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 3)
        raise enospc()
    monkeypatch.setattr(mx, "save_safetensors", save)


def full_write_bytes(monkeypatch, name: str = "") -> None:
    """Path.write_bytes stores 100 bytes, then fails as a full disk does, for the files
    whose name contains ``name`` (the temp files of that output); others are written."""
    real = Path.write_bytes

    def write(path: Path, data: bytes) -> int:
        if name not in path.name:
            return real(path, data)
        real(path, data[:100])
        raise enospc()
    monkeypatch.setattr(Path, "write_bytes", write)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def leftovers(folder: Path) -> list[str]:
    """Hidden files other than a run folder's marker: temp files a failed write left."""
    return [n for n in hidden(folder) if n != MARKER]


def test_full_disk_model_folder_keeps_the_earlier_one(tmp_path, monkeypatch):
    model = tiny_model()
    out = tmp_path / "m"
    mlx_folder.save_atomic(model, out, model.tokenizer_dir, "first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_mx_save(monkeypatch)
    with pytest.raises(DiskFullError, match=rf"write {out}: it needs about [\d.]+ MB and [\d.]+ GB is free"):
        mlx_folder.save_atomic(model, out, model.tokenizer_dir, "second")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and hidden(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10_000)  # checked before writing
    with pytest.raises(DiskFullError, match="10.0 KB is free"):
        mlx_folder.save_atomic(model, tmp_path / "new", model.tokenizer_dir, "x")
    assert not (tmp_path / "new").exists() and hidden(tmp_path) == []


def test_full_disk_checkpoint_stops_the_run_and_keeps_the_last_one(tmp_path, monkeypatch):
    train(tmp_path, 2, save_every=1)
    full_mx_save(monkeypatch)
    with pytest.raises(DiskFullError, match="step-00000003: it needs"):
        train(tmp_path, 4, save_every=1)
    monkeypatch.undo()
    assert hidden(tmp_path / "checkpoints") == [] and resumable_checkpoint(tmp_path).name == "step-00000002"
    res, model = train(tmp_path, 4, save_every=1)  # space freed: the same call resumes
    assert res.step == 4 and same(weights(model), weights(train(tmp_path / "ref", 4)[1]))


def test_full_disk_feature_cache(tmp_path, monkeypatch):
    cache = FeatureCache("enc", tmp_path / "cache")
    item = str(tmp_path / "clip.wav")
    Path(item).write_bytes(b"any bytes: the key hashes them")
    full_write_bytes(monkeypatch)
    with pytest.raises(DiskFullError, match=r"cache/[0-9a-f]{64}\.npy: it needs about"):
        cache.put(item, np.ones((1500, 32), np.float16))
    assert list((tmp_path / "cache").iterdir()) == []


def test_full_disk_convert_leaves_no_half_folder(corpus, monkeypatch):
    out = corpus / "converted"
    convert(str(corpus / "start"), str(out), "float32", log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_mx_save(monkeypatch)
    with pytest.raises(DiskFullError, match="converted: it needs"):
        convert(str(corpus / "start"), str(out), "float32", force=True, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p for p in hidden(corpus) if "converted" in p] == []


# The auxiliary files of a run: each is replaced whole, or (a log) added to whole.

def test_full_disk_metrics_line_is_added_whole_or_not_at_all(tmp_path, monkeypatch):
    train(tmp_path, 2, save_every=1)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real = os.write

    def write(fd: int, data) -> int:  # a metrics line gets 10 bytes onto the disk, then fails
        if b'"kind"' not in bytes(data):
            return real(fd, data)
        real(fd, bytes(data)[:10])
        raise enospc()
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DiskFullError, match=r"metrics.jsonl: it needs about"):
        train(tmp_path, 4, save_every=1)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    res, _ = train(tmp_path, 4, save_every=1)  # space freed: the same call resumes
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert res.step == 4 and [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4]


def test_full_disk_metrics_plot_is_a_warning_and_the_run_keeps_its_model(tmp_path, monkeypatch, caplog):
    """The plot comes after the best model and the last checkpoint are saved: a run that
    cannot draw it still completes, with a warning naming the file."""
    pytest.importorskip("matplotlib")
    wers = iter([0.9, 0.8, 0.7, 0.6])  # each evaluation is the best so far

    def run(steps: int):
        settings = cfg(max_steps=steps, schedule="constant", warmup_steps=0, plot=True, eval_every=1)
        return Trainer(tiny(0), ce_loss, settings, tmp_path, evaluate_fn=lambda m: {"wer": next(wers)}
                       ).train(ListBatcher(make_batches(3)), resume=True)
    run(2)
    png = (tmp_path / "metrics.png").read_bytes()
    full_write_bytes(monkeypatch, "metrics.png")
    with caplog.at_level(logging.WARNING):
        res = run(4)
    warned = [m for m in caplog.messages if "metrics plot was not written" in m]
    assert len(warned) == 1 and "metrics.png: it needs about" in warned[0], caplog.messages
    assert res.status == "completed" and res.step == 4
    assert (tmp_path / "metrics.png").read_bytes() == png and leftovers(tmp_path) == []
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 4
    assert (tmp_path / "best" / "weights.safetensors").exists()


STAGE = {"wer": 0.2, "cer": 0.1, "n": 2, "params": 1e6, "train_seconds": 1.0, "eval_seconds": 1.0}


@pytest.mark.parametrize("name", ["results.json", "results.md"])
def test_full_disk_recipe_results_keep_the_earlier_file(tmp_path, monkeypatch, name):
    recipe = Recipe("train.tsv", "dev.tsv", str(tmp_path), RecipeConfig())
    recipe.results["stages"]["teacher"] = STAGE
    recipe._save_results()
    before = (tmp_path / name).read_bytes()
    recipe.results["stages"]["final"] = STAGE
    full_write_bytes(monkeypatch, name)
    with pytest.raises(DiskFullError, match=rf"{tmp_path / name}: it needs about"):
        recipe._save_results()
    assert (tmp_path / name).read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["teacher.tsv", "teacher.json"])
def test_full_disk_hypotheses_keep_the_earlier_file(tmp_path, monkeypatch, name):
    row = {"audio": "a.wav", "language": "ha", "reference": "ina kwana", "hypothesis": "ina kwana",
           "reference_norm": "ina kwana", "hypothesis_norm": "ina kwana", "wer": 0.0, "cer": 0.0}
    path = tmp_path / "hypotheses" / name
    save_hypotheses({"wer": 0.0, "cer": 0.0, "rows": [row]}, path)
    before = path.read_bytes()
    full_write_bytes(monkeypatch, name)
    with pytest.raises(DiskFullError, match=rf"{path}: it needs about"):
        save_hypotheses({"wer": 0.5, "cer": 0.2, "rows": [row] * 20}, path)
    assert path.read_bytes() == before and leftovers(path.parent) == []


def test_full_disk_merge_search_keeps_the_earlier_trials(tmp_path, monkeypatch):
    """The trials themselves are stubbed: only the writing of trials.jsonl is under test."""
    monkeypatch.setattr(search_module, "compress", lambda teacher, surgery: surgery)
    monkeypatch.setattr(search_module, "recover", lambda *a, **kw: None)
    monkeypatch.setattr(search_module, "dev_evaluator",
                        lambda data, limit: lambda student: {"wer": 1 - student.alpha, "cer": 0.0})
    out, search = tmp_path / "search", MergeSearchConfig(ratios=(0.0, 0.5))
    teacher = SimpleNamespace(dims=SimpleNamespace(n_text_layer=2))
    assert merge_search(teacher, None, search, out)["alpha"] == 0.5
    before = (out / "trials.jsonl").read_bytes()
    full_write_bytes(monkeypatch, "trials.jsonl")
    with pytest.raises(DiskFullError, match=rf"{out / 'trials.jsonl'}: it needs about"):
        merge_search(teacher, None, search, out)
    assert (out / "trials.jsonl").read_bytes() == before and leftovers(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB filesystem (tmpfs), where the system allows mounting one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_really_full_disk(small_disk, corpus, monkeypatch):
    """MLX reports a full disk without an errno; the 6.6 MB tiny model cannot fit in 4 MB."""
    out = small_disk / "model"
    with pytest.raises(DiskFullError, match=r"model: it needs about [\d.]+ MB and [0-4].\d MB is free"):
        convert(str(corpus / "start"), str(out), "float32", log=lambda *_: None)
    monkeypatch.setattr(mlx_folder, "ensure_space", lambda *a: None)  # so the write itself fails
    with pytest.raises(DiskFullError, match="model: it needs about"):
        convert(str(corpus / "start"), str(out), "float32", log=lambda *_: None)
    assert list(small_disk.iterdir()) == []


# -- 4. one writer per output --------------------------------------------------------

HOLD = ("import sys, time; from mlx_baldwhisper import locks; locks.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def holder(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def finetune_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", str(out),
            "--batch-size", "2", "--eval-limit", "1", "--max-steps", "1", *extra]


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_lock_taken_over(corpus, caplog):
    out = corpus / "teacher"
    proc = holder(out)
    try:
        start = time.monotonic()
        r = CliRunner().invoke(main, finetune_args(corpus, out))
        assert r.exit_code == 1 and f"PID {proc.pid}" in r.output, r.output
        assert "being written by another process" in r.output and time.monotonic() - start < 5
        assert not (corpus / "teacher.run").exists()  # refused before anything was written
        with pytest.raises(OutputBusyError, match=f"PID {proc.pid}"):
            convert(str(corpus / "start"), str(out), log=lambda *_: None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert locks.lock_path(out).exists()  # left behind by kill -9 ...
    with caplog.at_level(logging.WARNING):  # ... and taken over
        r = CliRunner().invoke(main, finetune_args(corpus, out))
    assert r.exit_code == 0, r.output
    assert any(f"lock left by process {proc.pid}, which is no longer running" in m for m in caplog.messages)
    assert not locks.lock_path(out).exists() and not locks.lock_path(corpus / "teacher.run").exists()


def test_locks_are_reentrant_and_recipes_share_an_out_only_across_stages(corpus):
    with locks.hold(corpus / "x"):
        with locks.hold(corpus / "x"):
            pass
        assert locks.lock_path(corpus / "x").exists()
    assert not locks.lock_path(corpus / "x").exists()
    out = corpus / "run"
    proc = holder(out / "removed")  # another recipe process runs the removal baseline
    try:
        cfg = RecipeConfig(model=str(corpus / "start"))
        with pytest.raises(OutputBusyError, match=f"run/removed is being written .*PID {proc.pid}"):
            Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(out), cfg).run()
        with pytest.raises(ValueError, match="is needed but not selected"):  # got past the locks
            Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(out), cfg,
                   stages=("merged",)).run()
    finally:
        proc.kill()
        proc.wait()


def test_an_interrupted_swap_is_restored(tmp_path):
    """Killed between moving the earlier folder aside and renaming the new one in."""
    model = tiny_model()
    out = tmp_path / "m"
    mlx_folder.save_atomic(model, out, model.tokenizer_dir, "first")
    aside = tmp_path / ".m.mbw-old-abc"
    aside.mkdir()
    out.rename(aside / "m")
    (tmp_path / ".m.mbw-tmp-def").mkdir()  # the new copy, maybe half written
    mlx_folder.recover(out)
    assert json.loads((out / "config.json").read_text())["source"] == "first"
    assert hidden(tmp_path) == [] and load_model(str(out)).dims.n_text_layer == 4
