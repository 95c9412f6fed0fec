"""Training stages from the command line alone: options, summaries, exit codes, resume rules."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlx_baldwhisper.cli import main
from mlx_baldwhisper.training.checkpoint import read_checkpoint_state
from mlx_baldwhisper.training.recipe import RecipeConfig

ROOT = Path(__file__).parents[1]


def stage(corpus: Path, name: str, out: str, *extra: str) -> list[str]:
    model = ["--model", str(corpus / "start")] if name == "finetune" else []
    return [name, *model, "--train", str(corpus / "train.tsv"), "--dev", str(corpus / "dev.tsv"),
            "--language", "ha", "--out", out, "--batch-size", "2", "--eval-limit", "2", *extra]


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def test_every_stage_ends_with_its_scores_and_model(corpus):
    teacher = str(corpus / "teacher")
    r = run(stage(corpus, "finetune", teacher, "--max-steps", "2", "--lr", "1e-3",
                  "--language-token", "yo"))
    assert r.exit_code == 0, r.output
    assert re.search(r"best dev WER [\d.]+%  CER [\d.]+% \(step 2\); model: .*teacher", r.output)
    cfg = json.loads((corpus / "teacher" / "config.json").read_text())
    assert cfg["language_tokens"] == {"ha": "yo"}
    assert cfg["training"][-1]["max_steps"] == 2 and cfg["training"][-1]["lr"] == 1e-3
    assert cfg["long_form"] == {"resume_early_end": True, "condition_on_previous_text": False}
    r = run(stage(corpus, "recover", str(corpus / "merged"), "--teacher", teacher, "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    assert "best dev WER" in r.output and "merged" in r.output
    merged = json.loads((corpus / "merged" / "config.json").read_text())
    assert merged["surgery"]["recovered"] is True and merged["language_tokens"] == {"ha": "yo"}
    r = run(stage(corpus, "shear", str(corpus / "final"), "--teacher", teacher,
                  "--student", str(corpus / "merged"), "--rank", "8", "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    assert "best dev WER" in r.output and json.loads(
        (corpus / "final" / "config.json").read_text())["embedding_rank"] == 8


def test_resume_refuses_other_settings_and_extends_steps(corpus, caplog):
    out = str(corpus / "t")
    assert run(stage(corpus, "finetune", out, "--max-steps", "2")).exit_code == 0
    r = run(stage(corpus, "finetune", out, "--max-steps", "2", "--lr", "0.5", "--batch-size", "3"))
    assert r.exit_code == 1
    assert "other settings" in r.output and "lr: 0.0001 -> 0.5" in r.output and "batch_size: 2 -> 3" in r.output
    before = json.loads((corpus / "t" / "config.json").read_text())["training"]
    assert before[-1]["lr"] == 1e-4  # the model folder still describes the weights it holds
    r = run(stage(corpus, "finetune", out, "--max-steps", "3"))  # more steps: safe, applied
    assert r.exit_code == 0, r.output
    assert "after 3 steps" in r.output
    assert any("max_steps changed from 2 to 3" in m for m in caplog.messages)
    r = run(stage(corpus, "finetune", out, "--max-steps", "1", "--lr", "0.5", "--no-resume"))
    assert r.exit_code == 0 and "after 1 steps" in r.output, r.output


def test_ctrl_c_exits_130_and_the_same_command_resumes(corpus):
    args = [sys.executable, "-m", "mlx_baldwhisper", *stage(corpus, "finetune", str(corpus / "t"),
                                                               "--max-steps", "100000")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = corpus / "t.run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    state = read_checkpoint_state(corpus / "t.run")
    step = state["step"]
    assert step >= 1
    r = run(stage(corpus, "finetune", str(corpus / "t"), "--max-steps", str(step + 1)))
    assert r.exit_code == 0, r.output
    assert f"after {step + 1} steps" in r.output


def test_evaluate_without_usable_utterances_is_an_error(corpus):
    (corpus / "empty.tsv").write_text("path\tsentence\nclips/c0.wav\t...\n")
    r = run(["evaluate", "--model", str(corpus / "start"), "--data", str(corpus / "empty.tsv"),
             "--language", "ha"])
    assert r.exit_code == 1
    assert "no usable utterances" in r.output and "nan" not in r.output.lower()


def test_print_config_is_a_complete_loadable_example():
    r = run(["recipe", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output)
    assert RecipeConfig.from_dict(printed).to_dict() == RecipeConfig().to_dict()
    assert printed["recover"]["train"]["max_steps"] > 0 and "rank" in printed["shear"]


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--max-steps", "-1"], ["--lr", "0"]])
def test_invalid_numbers_are_usage_errors(corpus, bad):
    r = run(stage(corpus, "finetune", str(corpus / "t"), *bad))
    assert r.exit_code == 2 and "Invalid value" in r.output


def test_every_option_has_help_text():
    def commands(group: click.Group):
        for name, cmd in group.commands.items():
            yield name, cmd
    missing = [f"{name} {p.name}" for name, cmd in commands(main) for p in cmd.params
               if isinstance(p, click.Option) and not p.help and p.name != "help"]
    assert not missing, missing
    for name in ("finetune", "merge-search", "recover", "shear", "recipe"):
        opts = {o for p in main.commands[name].params for o in p.opts}
        assert {"--max-steps", "--batch-size", "--lr", "--eval-limit", "--save-every", "--cache-dir",
                "--language-token", "--resume", "--force", "--print-config"} <= opts, name


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    install = next(b for b in blocks if "pip install" in b).strip()
    test = next(b for b in blocks if "pytest" in b).strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and test in ci
    installs = [ln for ln in ci if "pip install" in ln or "pip3 install" in ln]
    assert installs == [install]


def test_gitignore_covers_the_readme_outputs():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"mlx_models/", "out/"} <= set(ignored)


def test_shear_recovers_a_model_factored_by_convert(corpus, caplog):
    from mlx_baldwhisper.convert import convert
    from mlx_baldwhisper.surgery import Surgery

    bald = corpus / "bald"
    convert(str(corpus / "start"), str(bald), "float32", Surgery(merge=True, rank=8), log=lambda *_: None)
    r = run(stage(corpus, "shear", str(corpus / "recovered"), "--teacher", str(corpus / "start"),
                  "--student", str(bald), "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    cfg = json.loads((corpus / "recovered" / "config.json").read_text())
    assert cfg["embedding_rank"] == 8 and cfg["n_text_layer"] == 2 and cfg["surgery"]["recovered"]
    assert any("already factored at rank 8: training at that rank, not 96" in m for m in caplog.messages)
