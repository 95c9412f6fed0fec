"""Nothing we write ever deletes what we did not write; compressed models say when they need recovery."""

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_model
from mlx_baldwhisper import load_model
from mlx_baldwhisper.cli import main
from mlx_baldwhisper.convert import convert
from mlx_baldwhisper.surgery import Surgery, break_even_rank, check_request
from mlx_baldwhisper.folders import MARKER, OutputExistsError, is_model_folder, run_folder
from mlx_baldwhisper.training.common import save_model_folder
from mlx_baldwhisper.training.recipe import Recipe, RecipeConfig
from mlx_baldwhisper.weights import mlx_folder, read_checkpoint

FIXTURE = str(Path(__file__).parent / "fixtures" / "ct2")


def user_files(folder: Path) -> dict[str, str]:
    """A user's working folder: a thesis and a data folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "data").mkdir()
    (folder / "data" / "notes.txt").write_text("field recordings")
    return {"thesis.tex": "three years of work", "data/notes.txt": "field recordings"}


def assert_intact(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


def stage_args(corpus: Path, out: str, *extra: str) -> list[str]:
    return ["finetune", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", out,
            "--max-steps", "1", "--batch-size", "2", "--eval-limit", "1", *extra]


@pytest.mark.parametrize("out", ["here", "."])
def test_finetune_refuses_a_folder_it_did_not_write(corpus, out, monkeypatch):
    work = corpus / "work"
    files = user_files(work)
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, stage_args(corpus, "." if out == "." else str(work)))
    assert r.exit_code == 1
    assert "did not write" in r.output and "--force" in r.output
    assert_intact(work, files)
    assert not is_model_folder(work)


def test_force_writes_into_it_and_deletes_nothing(corpus, monkeypatch):
    work = corpus / "work"
    files = user_files(work)
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, stage_args(corpus, ".", "--force"))
    assert r.exit_code == 0, r.output
    assert_intact(work, files)
    assert is_model_folder(work) and load_model(str(work)).dims.n_text_layer == 4
    assert (work.parent / "work.run" / MARKER).exists()


def test_atomic_save_swaps_only_our_own_folder(tmp_path):
    model = tiny_model()
    folder = tmp_path / "m"
    mlx_folder.save_atomic(model, folder, model.tokenizer_dir, "first")
    mlx_folder.save_atomic(model, folder, model.tokenizer_dir, "second")  # ours: swapped whole
    assert json.loads((folder / "config.json").read_text())["source"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    (folder / "README.md").write_text("my notes")  # a user's file inside our folder survives
    mlx_folder.save_atomic(model, folder, model.tokenizer_dir, "third")
    assert (folder / "README.md").read_text() == "my notes"
    assert json.loads((folder / "config.json").read_text())["source"] == "third"
    theirs = tmp_path / "theirs"
    files = user_files(theirs)
    with pytest.raises(OutputExistsError, match="did not write"):
        mlx_folder.save_atomic(model, theirs, model.tokenizer_dir, "x")
    assert_intact(theirs, files)


def test_convert_refuses_then_forces_without_deleting(tmp_path):
    out = tmp_path / "out"
    files = user_files(out)
    with pytest.raises(OutputExistsError, match="did not write"):
        convert(FIXTURE, str(out), "float32", log=lambda *_: None)
    convert(FIXTURE, str(out), "float32", force=True, log=lambda *_: None)
    assert_intact(out, files)
    assert is_model_folder(out)
    with pytest.raises(FileExistsError, match="--force"):  # our own folder: still asks first
        convert(FIXTURE, str(out), "float32", log=lambda *_: None)


def test_recipe_refuses_a_folder_it_did_not_write(corpus):
    work = corpus / "work"
    files = user_files(work)
    cfg = RecipeConfig(model=str(corpus / "start"))
    with pytest.raises(OutputExistsError, match="did not write"):
        Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(work), cfg).run()
    assert_intact(work, files)


def test_run_folder_sits_beside_the_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_folder(Path(".")) == tmp_path.parent / (tmp_path.name + ".run")
    assert run_folder(Path("a/teacher")) == tmp_path / "a" / "teacher.run"


def test_unrecovered_compression_warns_once_at_load(tmp_path, caplog):
    out = tmp_path / "bald"
    convert(FIXTURE, str(out), "float32", Surgery(merge=True, rank=8), log=lambda *_: None)
    surgery = json.loads((out / "config.json").read_text())["surgery"]
    assert surgery["recovered"] is False
    with caplog.at_level(logging.WARNING, logger="mlx_baldwhisper"):
        model = load_model(str(out))
        load_model(str(out))
    warned = [r.getMessage() for r in caplog.records if "never recovered" in r.getMessage()]
    assert len(warned) == 1 and "mlx_baldwhisper shear" in warned[0] and str(out) in warned[0]
    save_model_folder(model, tmp_path / "recovered", {"stage": "shear"})
    assert json.loads((tmp_path / "recovered" / "config.json").read_text())["surgery"]["recovered"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlx_baldwhisper"):
        load_model(str(tmp_path / "recovered"))
        load_model(FIXTURE)  # never compressed: nothing to say
    assert not [r for r in caplog.records if "never recovered" in r.getMessage()]


def test_rank_that_saves_nothing_is_warned(caplog):
    ckpt = read_checkpoint(FIXTURE)
    width, vocab = ckpt.dims.n_text_state, ckpt.dims.n_vocab
    limit = break_even_rank(vocab, width)
    assert vocab * (limit - 1) + (limit - 1) * width < vocab * width <= vocab * limit + limit * width
    assert break_even_rank(51865, 512) == 507  # whisper-base
    with caplog.at_level(logging.WARNING, logger="mlx_baldwhisper"):
        check_request(ckpt, Surgery(rank=limit - 1))
        assert not caplog.records
        check_request(ckpt, Surgery(rank=limit))
    assert "saves no parameters" in caplog.records[0].getMessage()
