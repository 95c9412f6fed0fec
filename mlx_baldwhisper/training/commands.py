"""``mlx_baldwhisper`` subcommands for the training side: one per stage, and the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import click


def _config(path: Optional[str]):
    from .recipe import load_config

    return load_config(path)


def _data(model, train: str, dev: str, language: str, out: str, freeze_encoder: bool = True):
    from .common import load_data

    return load_data(model, train, dev, language, str(Path(out).parent / "cache"),
                     cache_features=freeze_encoder)


def register_training_commands(main: click.Group, friendly: Callable) -> None:
    common = [
        click.option("--train", "train", required=True, help="Training manifest (TSV/CSV/JSONL or Common Voice tsv)."),
        click.option("--dev", "dev", required=True, help="Dev manifest, for evaluation and model selection."),
        click.option("--language", required=True, help="Language code, e.g. ha."),
        click.option("--out", required=True, help="Output model folder."),
        click.option("--config", "config_path", default=None, help="JSON config (see RecipeConfig)."),
        click.option("--resume/--no-resume", default=True, help="Continue from the last checkpoint."),
    ]

    def with_common(f):
        for opt in reversed(common):
            f = opt(f)
        return f

    @main.command("finetune")
    @click.option("--model", default=None, help="Starting model (default: embedded base).")
    @click.option("--full", is_flag=True, help="Train the encoder too (slow; no feature cache).")
    @with_common
    @friendly
    def finetune_cmd(model, full, train, dev, language, out, config_path, resume):
        """Fine-tune on a language (the teacher)."""
        from ..load import load_model
        from .finetune import finetune

        cfg = _config(config_path).finetune
        cfg.freeze_encoder = not full
        m = load_model(model)
        finetune(m, _data(m, train, dev, language, out, not full), cfg, Path(out), resume=resume)

    @main.command("merge-search")
    @click.option("--teacher", required=True, help="The fine-tuned model folder.")
    @with_common
    @friendly
    def merge_search_cmd(teacher, train, dev, language, out, config_path, resume):
        """Choose α/β by brief recovery trials; trials are logged to OUT/trials.jsonl."""
        from ..load import load_model
        from .merge_search import MergeSearchConfig, merge_search

        recipe = _config(config_path)
        t = load_model(teacher)
        found = merge_search(t, _data(t, train, dev, language, out), recipe.search or MergeSearchConfig(),
                             Path(out), recipe.merge_groups)
        click.echo(f"best alpha={found['alpha']:g} beta={found['beta']:g}")

    @main.command("recover")
    @click.option("--teacher", required=True)
    @click.option("--student", default=None, help="A merged folder (default: merge the teacher).")
    @click.option("--alpha", default=0.1, show_default=True, type=float)
    @click.option("--beta", default=1.0, show_default=True, type=float)
    @click.option("--merge-groups", default=None,
                  help="Decoder layers to merge, e.g. '0;1,2,3;4,5' (default: adjacent pairs).")
    @with_common
    @friendly
    def recover_cmd(teacher, student, alpha, beta, merge_groups, train, dev, language, out,
                    config_path, resume):
        """Distil the frozen teacher into a merged decoder: λ·CE + γ·KL, learnable temperature."""
        from ..load import load_model
        from .merge_search import merged_student
        from .recover import recover

        t = load_model(teacher)
        s = load_model(student) if student else merged_student(t, alpha, beta, merge_groups)
        recover(s, t, _data(t, train, dev, language, out), _config(config_path).recover, Path(out),
                resume=resume)

    @main.command("shear")
    @click.option("--teacher", required=True)
    @click.option("--student", required=True, help="The recovered merged model folder.")
    @click.option("--rank", default=None, type=int, help="Embedding rank (default: from config, 96).")
    @with_common
    @friendly
    def shear_cmd(teacher, student, rank, train, dev, language, out, config_path, resume):
        """Low-rank embedding by (frequency-weighted) SVD, then feature distillation against the teacher."""
        from ..load import load_model
        from .shear import shear, sheared_student

        cfg = _config(config_path).shear
        cfg.rank = rank or cfg.rank
        t, merged = load_model(teacher), load_model(student)
        data = _data(t, train, dev, language, out)
        shear(sheared_student(merged, data, cfg), t, data, cfg, Path(out), resume=resume)

    @main.command("evaluate")
    @click.option("--model", default=None)
    @click.option("--data", "manifest", required=True, help="Manifest to score.")
    @click.option("--language", default=None)
    @click.option("--limit", default=None, type=int)
    @click.option("--batch-size", default=16, show_default=True)
    @click.option("--output", default=None, help="Write per-utterance hypotheses (.tsv/.json).")
    @click.option("--sample-len", default=None, type=int,
                  help="Cap on generated tokens per clip (default: Whisper's 224), as the recipe's "
                       "eval_sample_len.")
    @friendly
    def evaluate_cmd(model, manifest, language, limit, batch_size, output, sample_len):
        """WER and CER (normalised text, see evaluate.py) with greedy decoding."""
        from ..decoding import DecodingOptions
        from ..evaluate import evaluate, save_hypotheses
        from ..load import load_model
        from .data import read_manifest

        options = DecodingOptions(without_timestamps=True, temperature=0.0, sample_len=sample_len)
        r = evaluate(load_model(model), read_manifest(manifest, language=language), language=language,
                     batch_size=batch_size, limit=limit, options=options)
        click.echo(f"WER {100 * r['wer']:.2f}%  CER {100 * r['cer']:.2f}%  ({r['n']} utterances, "
                   f"{len(r['skipped'])} skipped, {r['seconds']:.0f} s)")
        if output:
            save_hypotheses(r, output)

    @main.command("recipe")
    @click.option("--train", required=True)
    @click.option("--dev", required=True)
    @click.option("--language", required=True)
    @click.option("--out", required=True, help="Output folder for every stage and the results.")
    @click.option("--config", "config_path", default=None, help="JSON config (see RecipeConfig).")
    @click.option("--language-token", default=None,
                  help="For a language Whisper lacks: the existing language token to use (e.g. ha).")
    @click.option("--stages", default=None,
                  help="Comma-separated subset of untuned,teacher,search,merged,removed,final "
                       "(default: all). Needed earlier stages are loaded from --out, so "
                       "independent stages can run in parallel processes.")
    @friendly
    def recipe_cmd(train, dev, language, out, config_path, language_token, stages):
        """Fine-tune → merge-search → recover → removed baseline → shear → evaluate."""
        from .recipe import Recipe

        cfg = _config(config_path)
        cfg.language = language
        cfg.language_token = language_token or cfg.language_token
        chosen = tuple(x.strip() for x in stages.split(",") if x.strip()) if stages else None
        results = Recipe(train, dev, out, cfg, stages=chosen).run()
        click.echo((Path(out) / "results.md").read_text())
        return results
