"""benchmarks/recovery_ablation.py on a tiny model: each variant recovers the same teacher
with its own config, the removal baseline stands in the merged column, and a finished
variant is not trained again."""

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from mlx_baldwhisper.training.recipe import Recipe, RecipeConfig
from test_recipe import tiny_config

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from recovery_ablation import STAGES, VARIANTS, main, merged  # noqa: E402


def test_variants_share_one_teacher_and_fill_the_table(corpus):
    base = {**tiny_config(str(corpus / "start")), "search": None, "merge_groups": "0;1,2,3",
            "long_form_seconds": 0}
    config = corpus / "base.json"
    config.write_text(json.dumps(base))
    train, dev = str(corpus / "train.tsv"), str(corpus / "dev.tsv")
    Recipe(train, dev, str(corpus / "teacher-run"), RecipeConfig.from_dict(base), stages=("teacher",)).run()
    args = ["--teacher-run", str(corpus / "teacher-run"), "--config", str(config), "--out", str(corpus / "ab"),
            "--variants", "hidden,removal", "--train", train, "--dev", dev, "--procs", "1", "--seed", "3"]

    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    teacher = json.loads((corpus / "teacher-run" / "results.json").read_text())["stages"]["teacher"]
    hidden = json.loads((corpus / "ab" / "hidden" / "results.json").read_text())["stages"]
    removal = json.loads((corpus / "ab" / "removal" / "results.json").read_text())["stages"]
    assert hidden["teacher"] == removal["teacher"] == teacher
    assert {"merged", "final"} <= set(hidden) and "removed" in removal and "final" not in removal
    written = json.loads((corpus / "ab" / "hidden" / "config.json").read_text())
    assert written["recover"]["hidden_weight"] == 0.1 and written["shear"]["hidden_weight"] == 0.0
    assert written["recover"]["train"]["seed"] == written["shear"]["train"]["seed"] == 3
    # the removal baseline recovers as the shipped config does; each idea alone turns the others off
    assert json.loads((corpus / "ab" / "removal.json").read_text()) == base
    assert merged(base, VARIANTS["seqkd"])["recover"]["hidden_weight"] == 0.0
    combo = merged(base, VARIANTS["hidden-both-best"])
    assert combo["shear"]["hidden_weight"] == combo["recover"]["hidden_weight"] == 0.1
    assert combo["shear"]["train"]["eval_every"] == 75 and combo["recover"]["seqkd_prob"] == 0.0
    assert merged(base, VARIANTS["removal-hidden"])["recover"] == merged(base, VARIANTS["hidden"])["recover"]
    assert STAGES["removal-hidden"] == STAGES["removal"] == "removed"
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in done.output.splitlines() if line.startswith("| ")}
    assert rows["hidden"][4] == f"{teacher['wer'] / hidden['final']['wer']:.3f}"
    assert rows["removal"][2] == f"{100 * removal['removed']['wer']:.2f} / {100 * removal['removed']['cer']:.2f}"
    assert rows["removal"][3] == "-" and rows["removal"][5] == f"{teacher['wer'] / removal['removed']['wer']:.3f}"

    trained = (corpus / "ab" / "hidden" / "merged" / "config.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output == done.output
    assert (corpus / "ab" / "hidden" / "merged" / "config.json").stat().st_mtime_ns == trained


def test_the_shipped_defaults_are_the_chosen_combination():
    """Issue 17: the shipped config ("chosen") trains as hidden-both-best, the combination
    that beat every idea off; the removal baseline so recovers with the same loss."""
    shipped = json.loads((Path(__file__).parents[1] / "benchmarks" / "hausa_recipe_longform.json").read_text())
    chosen = RecipeConfig.from_dict(merged(shipped, VARIANTS["chosen"]))
    assert chosen == RecipeConfig.from_dict(merged(shipped, VARIANTS["hidden-both-best"]))
    assert chosen.recover.hidden_weight == chosen.shear.hidden_weight == 0.1
    assert chosen.shear.train.eval_every == 75 and chosen.recover.seqkd_prob == chosen.recover.untuned_kl_weight == 0.0
    defaults = RecipeConfig()
    assert (defaults.recover.hidden_weight, defaults.shear.hidden_weight, defaults.shear.train.eval_every) == (0.1, 0.1, 75)
    assert RecipeConfig.from_dict(merged(shipped, VARIANTS["removal"])).recover == \
        RecipeConfig.from_dict(merged(shipped, VARIANTS["removal-hidden"])).recover
