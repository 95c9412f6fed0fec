"""The whole training recipe end to end on a tiny random model and a few synthetic clips."""

import json

import pytest

from mlx_baldwhisper.training.recipe import Recipe, RecipeConfig, load_config

TINY_TRAIN = {"max_steps": 2, "warmup_steps": 1, "lr": 1e-3, "plot": False, "progress": False,
              "log_every": 1}


def tiny_config(start: str) -> dict:
    small = {"train": TINY_TRAIN, "batch_size": 2, "eval_limit": 2}
    return {"model": start, "language": "ha", "finetune": small, "recover": small,
            "shear": {**small, "rank": 8},
            "search": {"ratios": [0.0, 0.5], "dev_limit": 2, "train_fraction": 0.5,
                       "recover": {"train": TINY_TRAIN, "batch_size": 2}}}


def test_recipe_writes_every_model_and_results(corpus):
    cfg_path = corpus / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_config(str(corpus / "start"))))
    cfg = load_config(str(cfg_path))
    out = corpus / "run"
    results = Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(out), cfg).run()
    for name in ("teacher", "merged", "removed", "final"):
        assert (out / name / "config.json").exists(), name
        assert name in results["stages"]
    assert set(results["stages"]) >= {"untuned", "teacher", "merged", "removed", "final"}
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["embedding_rank"] == 8 and final["n_text_layer"] == 2
    assert [t["stage"] for t in final["training"]][-1] == "shear"
    # successive halving over 2 ratios x 2 merge groups: 4 candidates at 2 steps, the best 2 at 6
    trials = [json.loads(t) for t in (out / "search" / "trials.jsonl").read_text().splitlines()]
    assert [t["steps"] for t in trials] == [2, 2, 2, 2, 6, 6]
    assert results["search"]["trial_steps"] == 20 and results["search"]["ratios"] in [t["ratios"] for t in trials[4:]]
    assert "| final |" in (out / "results.md").read_text()
    for name in ("untuned", "teacher", "final"):  # long-form scores beside the clip scores
        assert results["stages"][name]["long_form_n"] == 1, name
        assert (out / "hypotheses" / f"{name}.long.tsv").exists()
    assert "long-form WER %" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["shear"]["rank"] == 8
    # a second run finds every stage done and does not train again
    again = Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(out), cfg).run()
    assert again["stages"]["final"] == results["stages"]["final"]


def test_unknown_config_key_is_refused(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"finetune": {"bogus": 1}}))
    with pytest.raises(ValueError, match="unknown FinetuneConfig settings: bogus"):
        load_config(str(p))


def test_language_without_token_maps_to_an_existing_one(corpus):
    cfg = RecipeConfig.from_dict(tiny_config(str(corpus / "start")))
    cfg.language, cfg.language_token, cfg.search = "bm", "ha", None
    out = corpus / "bm"
    for tsv in ("train.tsv", "dev.tsv"):
        text = (corpus / tsv).read_text()
        (corpus / f"bm_{tsv}").write_text(text)
    results = Recipe(str(corpus / "bm_train.tsv"), str(corpus / "bm_dev.tsv"), str(out), cfg).run()
    assert "final" in results["stages"]
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["language_tokens"] == {"bm": "ha"}


def test_stages_run_as_separate_processes_share_one_result(corpus):
    """``--stages`` splits the recipe (e.g. the removal baseline on the other core); the
    pieces land in one results.json, and a stage whose input is missing says which."""
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    config = {**tiny_config(str(corpus / "start")), "search": None, "merge_groups": "0;1,2,3"}
    (corpus / "split.json").write_text(json.dumps(config))  # the tiny decoder: 4 layers -> 2
    cfg = RecipeConfig.from_dict(config)
    train, dev, out = str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(corpus / "split")
    with pytest.raises(ValueError, match="stage 'teacher' is needed"):
        Recipe(train, dev, out, cfg, stages=("removed",)).run()
    Recipe(train, dev, out, cfg, stages=("untuned", "teacher")).run()
    done = CliRunner().invoke(main, ["recipe", "--train", train, "--dev", dev, "--language", "ha",
                                     "--out", out, "--config", str(corpus / "split.json"),
                                     "--stages", "removed"])
    assert done.exit_code == 0, done.output
    assert done.output.rstrip().endswith(f"model: {corpus / 'split' / 'removed'}")  # not the teacher
    results = Recipe(train, dev, out, cfg, stages=("merged", "final")).run()
    assert set(results["stages"]) == {"untuned", "teacher", "merged", "removed", "final"}
    for name in ("merged", "removed"):
        assert json.loads((corpus / "split" / name / "config.json").read_text())["n_text_layer"] == 2
    assert "| removed |" in (corpus / "split" / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown stage"):
        Recipe(train, dev, out, cfg, stages=("bogus",))


def test_a_partial_train_block_keeps_the_stages_own_defaults(tmp_path):
    """{"audio_context": {"train": {"max_steps": 150}}} changes the steps only: the stage's
    learning rate and warm-up stay its own, not TrainConfig's generic ones."""
    defaults = RecipeConfig()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"audio_context": {"train": {"max_steps": 150}},
                                "recover": {"train": {"seed": 3}}}))
    cfg = load_config(str(path))
    assert cfg.audio_context.train.max_steps == 150
    assert cfg.audio_context.train.lr == defaults.audio_context.train.lr
    assert cfg.audio_context.train.warmup_steps == defaults.audio_context.train.warmup_steps
    assert cfg.recover.train.seed == 3 and cfg.recover.train.lr == defaults.recover.train.lr
    assert cfg.recover.train.max_steps == defaults.recover.train.max_steps


def _weights(folder) -> dict:
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v) for k, v in mx.load(str(folder / "weights.safetensors")).items()}


def test_the_same_seed_gives_the_same_weights_twice(corpus):
    """Reproducibility (issue 17): two runs of the recipe with one seed, each with its own
    feature cache, end with bit-identical teacher, merged and final weights; another seed
    gives other weights."""
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    config = tiny_config(str(corpus / "start"))
    config.update(search=None, audio_context=None, long_form_seconds=0, merge_groups="0;1,2,3")
    for stage in ("finetune", "recover", "shear"):
        config[stage]["train"] = {**TINY_TRAIN, "max_steps": 3}
    (corpus / "cfg.json").write_text(json.dumps(config))

    def run(name: str, seed: int) -> dict:
        args = ["recipe", "--train", str(corpus / "train.tsv"), "--dev", str(corpus / "dev.tsv"),
                "--language", "ha", "--out", str(corpus / name), "--config", str(corpus / "cfg.json"),
                "--cache-dir", str(corpus / f"cache-{name}"), "--seed", str(seed),
                "--stages", "teacher,merged,final"]
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 0, done.output
        assert json.loads((corpus / name / "config.json").read_text())["shear"]["train"]["seed"] == seed
        return {stage: _weights(corpus / name / stage) for stage in ("teacher", "merged", "final")}

    first, second, other = run("a", 7), run("b", 7), run("c", 8)
    for stage in first:
        assert first[stage].keys() == second[stage].keys()
        assert all((first[stage][k] == second[stage][k]).all() for k in first[stage]), stage
    assert any(not (first["final"][k] == other["final"][k]).all() for k in first["final"])


def test_the_untuned_model_stays_untuned_when_the_teacher_trains_in_the_same_run(corpus):
    """The teacher stage trains a copy: recover.untuned_kl_weight then pulls towards the
    starting weights, not the fine-tuned ones."""
    config = tiny_config(str(corpus / "start"))
    config.update(search=None, audio_context=None, long_form_seconds=0, merge_groups="0;1,2,3")
    config["recover"] = {**config["recover"], "untuned_kl_weight": 0.5}
    cfg = RecipeConfig.from_dict(config)
    recipe = Recipe(str(corpus / "train.tsv"), str(corpus / "dev.tsv"), str(corpus / "u"), cfg,
                    stages=("teacher", "merged"))
    recipe.run()
    start, base = _weights(corpus / "start"), recipe.inputs.models["base"].parameters()
    from mlx.utils import tree_flatten
    import numpy as np

    flat = {k: np.array(v) for k, v in tree_flatten(base)}
    assert all((flat[k] == start[k]).all() for k in start)
    teacher = _weights(corpus / "u" / "teacher")
    assert any(not (teacher[k] == start[k]).all() for k in start)
    assert json.loads((corpus / "u" / "merged" / "config.json").read_text())["training"][-1]["untuned_kl_weight"] == 0.5
