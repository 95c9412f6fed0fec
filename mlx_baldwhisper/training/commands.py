"""``mlx_baldwhisper`` subcommands for the training side: one per stage, and the recipe.

Every stage takes the same data, output and training options; a JSON ``--config`` (the
format ``recipe --print-config`` prints) sets everything else, and the options override it.
A stage ends by printing its best dev WER/CER and the folder it wrote; an interrupted
one exits with status 130 and resumes when the same command is run again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click

POSITIVE = click.IntRange(min=1)


@dataclass
class StageOptions:
    """What every stage command shares, gathered from its options."""

    train: str
    dev: str
    language: str
    out: str
    config_path: Optional[str]
    resume: bool
    force: bool
    language_token: Optional[str]
    cache_dir: Optional[str]
    clear_cache: bool
    max_steps: Optional[int]
    batch_size: Optional[int]
    lr: Optional[float]
    eval_limit: Optional[int]
    save_every: Optional[int]
    seed: Optional[int]

    def config(self):
        """The JSON config (or the defaults) with this command's overrides applied."""
        from .recipe import load_config

        cfg = load_config(self.config_path)
        cfg.language = self.language
        cfg.language_token = self.language_token or cfg.language_token
        for stage in (cfg.finetune, cfg.recover, cfg.shear, cfg.audio_context):
            if stage is not None:
                self.override(stage)
        if self.seed is not None and cfg.search is not None:
            cfg.search.recover.train.seed = self.seed
        return cfg

    def override(self, stage: Any) -> None:
        """Apply the command-line training settings to one stage's config."""
        train = stage.train
        train.max_steps = self.max_steps or train.max_steps
        train.lr = self.lr or train.lr
        train.save_every = train.save_every if self.save_every is None else self.save_every
        train.seed = train.seed if self.seed is None else self.seed
        stage.batch_size = self.batch_size or stage.batch_size
        stage.eval_limit = self.eval_limit or stage.eval_limit

    def check_outputs(self, recipe: bool = False) -> None:
        """Refuse someone else's folder, or one another process is writing (its lock is
        held until the command ends), before any slow work starts."""
        from ..folders import check_output, claim_run_folder, run_folder
        from .distributed import is_main

        if is_main():  # rank 0 alone writes
            _lock_until_done(Path(self.out))
        if recipe:
            claim_run_folder(Path(self.out), self.force)
            return
        check_output(Path(self.out), self.force)
        claim_run_folder(run_folder(Path(self.out)), self.force, option="run folder")

    def data(self, model, freeze_encoder: bool = True):
        from .common import load_data

        return load_data(model, self.train, self.dev, self.language, self.cache_folder(),
                         cache_features=freeze_encoder, clear_cache=self.clear_cache,
                         silence_share=self.config().silence_share)

    def cache_folder(self) -> str:
        """Encoder features are cached beside the output, so stages of one run share them."""
        return self.cache_dir or str(Path(os.path.abspath(self.out)).parent / "cache")

    def with_language_token(self, model, token: Optional[str]):
        """Decode a language Whisper lacks with an existing token (recorded in the model)."""
        if token:
            model.extra_config["language_tokens"] = {
                **model.extra_config.get("language_tokens", {}), self.language: token}
        return model


def _lock_until_done(out: Path) -> None:
    """Lock ``out`` for this process until the running command ends."""
    from .. import locks

    locks.acquire(out)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: locks.release(out))


def _print_config(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .recipe import RecipeConfig

    click.echo(json.dumps(RecipeConfig().to_dict(), indent=2))
    ctx.exit()


STAGE_OPTIONS = [
    click.option("--train", required=True,
                 help="Training manifest: TSV/CSV/JSONL (audio path + transcript) or Common Voice tsv."),
    click.option("--dev", required=True, help="Dev manifest, for evaluation and model selection."),
    click.option("--language", required=True, help="Language code, e.g. ha."),
    click.option("--out", required=True,
                 help="Output model folder (checkpoints go to OUT.run). Refused if it holds "
                      "files we did not write, unless --force."),
    click.option("--config", "config_path", default=None,
                 help="JSON config; see `mlx_baldwhisper recipe --print-config` for every key."),
    click.option("--resume/--no-resume", default=True, show_default=True,
                 help="Continue from the last checkpoint in OUT.run (--no-resume starts over)."),
    click.option("--force", is_flag=True,
                 help="Write into an existing folder we did not create (nothing in it is deleted)."),
    click.option("--language-token", default=None,
                 help="For a language Whisper lacks: the existing language token to use (e.g. ha)."),
    click.option("--cache-dir", default=None,
                 help="Folder for cached encoder features (default: 'cache' beside --out). "
                      "About n_audio_ctx x n_audio_state x 2 bytes per clip: 1.5 MB for base."),
    click.option("--clear-cache", is_flag=True,
                 help="Empty the feature cache folder first (only the cache's own files are "
                      "deleted). Its size is reported after encoding either way."),
    click.option("--max-steps", type=POSITIVE, default=None, help="Optimizer steps (overrides the config)."),
    click.option("--batch-size", type=POSITIVE, default=None, help="Clips per batch (overrides the config)."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Peak learning rate (overrides the config)."),
    click.option("--eval-limit", type=POSITIVE, default=None,
                 help="Dev clips scored during training (overrides the config)."),
    click.option("--save-every", type=click.IntRange(min=0), default=None,
                 help="Checkpoint every N steps; 0 = at the end and on interrupt only."),
    click.option("--seed", type=click.IntRange(min=0), default=None,
                 help="Seed of every stage's data order, packing and initialisation (overrides "
                      "the config): one seed, one machine and thread count give the same weights."),
    click.option("--print-config", is_flag=True, expose_value=False, is_eager=True,
                 callback=_print_config, help="Print the default JSON config and exit."),
]


def stage_command(f: Callable) -> Callable:
    """Add the shared options; the command receives them as one ``StageOptions``."""
    names = [p for p in StageOptions.__dataclass_fields__]

    def wrapper(**kwargs: Any) -> Any:
        opts = StageOptions(**{n: kwargs.pop(n) for n in names})
        return f(opts, **kwargs)

    wrapper.__name__, wrapper.__doc__ = f.__name__, f.__doc__
    for opt in reversed(STAGE_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


def finish(result, out: str) -> None:
    """The closing lines: best dev scores and the model folder, or how to resume (rank 0)."""
    from ..folders import run_folder
    from .distributed import is_main

    if result.status == "interrupted":
        if not is_main():
            raise SystemExit(130)
        click.echo(f"interrupted at step {result.step}: rerun the same command to resume", err=True)
        raise SystemExit(130)
    if not is_main():
        return
    best_file = run_folder(Path(out)) / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else {}
    scores = (f"best dev WER {100 * best['wer']:.2f}%  CER {100 * best['cer']:.2f}% (step {best['step']})"
              if "wer" in best else "no dev evaluation")
    click.echo(f"{result.status} after {result.step} steps; {scores}; model: {out}")


def stage_subcommand(main: click.Group, friendly: Callable, stage) -> None:
    """One subcommand per Stage: its model options, its own options, the shared ones."""
    roles = {i.option.lstrip("-").replace("-", "_"): i for i in stage.inputs}

    def run(opts: StageOptions, **values: Any) -> None:
        from ..load import load_model
        from .stage import StageInputs

        given = {name: values.pop(name) for name in roles}
        cfg = opts.config()
        stage.configure(cfg, **values)
        opts.check_outputs()
        models = _LoadOnUse({i.role: functools.partial(load_model, given[name] or cfg.model)
                             for name, i in roles.items() if given[name] or i.role == "base"},
                            lambda m: opts.with_language_token(m, cfg.language_token))
        data = opts.data(models[next(iter(models))], freeze_encoder=not values.get("full", False))
        inputs = StageInputs(models, data, cfg, cfg.merge_choice, opts.resume, opts.force)
        finish(stage.train(stage.student(inputs), inputs, Path(opts.out)), opts.out)

    run.__name__, run.__doc__ = f"{stage.command}_cmd", stage.summary
    command = stage_command(friendly(run))
    for opt in reversed(stage.options):
        command = opt(command)
    for name, i in reversed(list(roles.items())):
        command = click.option(i.option, name, required=i.required, default=None, help=i.help)(command)
    main.command(stage.command)(command)


class _LoadOnUse(Mapping[str, Any]):
    """Models by role, each loaded the first time a stage asks for it (an optional one,
    like recover's untuned model, costs nothing when unused)."""

    def __init__(self, loaders: dict[str, Callable[[], Any]], prepare: Callable[[Any], Any]):
        self.loaders, self.prepare, self.loaded = loaders, prepare, {}

    def __getitem__(self, role: str) -> Any:
        if role not in self.loaded:
            self.loaded[role] = self.prepare(self.loaders[role]())
        return self.loaded[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)


def _vad(max_chunk: Optional[float]) -> Optional[dict[str, float]]:
    return None if max_chunk is None else {"max_chunk_seconds": max_chunk}


def _long_form_path(output: str) -> str:
    """hyps.tsv -> hyps.long.tsv; hyps -> hyps.long (both formats)."""
    p = Path(output)
    return str(p.with_name(f"{p.stem}.long{p.suffix}")) if p.suffix in (".tsv", ".json") else f"{p}.long"


def register_training_commands(main: click.Group, friendly: Callable) -> None:
    from .recipe import STEPS
    from .stages import STAGES

    for stage in STAGES:
        if stage.command:
            stage_subcommand(main, friendly, stage)

    @main.command("merge-search")
    @click.option("--teacher", required=True, help="The fine-tuned model folder.")
    @stage_command
    @friendly
    def merge_search_cmd(opts: StageOptions, teacher):
        """Choose α/β by brief recovery trials; trials are logged to OUT/trials.jsonl."""
        from ..load import load_model
        from .merge_search import MergeSearchConfig, merge_search

        recipe = opts.config()
        search = recipe.search or MergeSearchConfig()
        opts.override(search.recover)
        search.dev_limit = opts.eval_limit or search.dev_limit
        opts.check_outputs(recipe=True)
        t = opts.with_language_token(load_model(teacher), recipe.language_token)
        found = merge_search(t, opts.data(t), search, Path(opts.out), recipe.merge_groups, opts.resume)
        best = max((t for t in found["trials"] if t["ratios"] == found["ratios"]), key=lambda t: t["steps"])
        chosen = found["merge_weights"] or f"alpha={found['alpha']:g} beta={found['beta']:g}"
        click.echo(f"best {chosen} (ratios {found['ratios']}): dev WER "
                   f"{100 * best['wer']:.2f}%  CER {100 * best['cer']:.2f}%; "
                   f"{len(found['trials'])} trials, {found['trial_seconds']:.0f} s; trials: "
                   f"{Path(opts.out) / 'trials.jsonl'}")

    @main.command("evaluate")
    @click.option("--model", default=None, help="Model folder, .pt file or embedded name (default: base).")
    @click.option("--data", "manifest", required=True, help="Manifest to score.")
    @click.option("--language", default=None, help="Language code (default: each row's, else detected).")
    @click.option("--limit", default=None, type=POSITIVE, help="Score only the first N utterances.")
    @click.option("--batch-size", default=16, show_default=True, type=POSITIVE, help="Clips decoded together.")
    @click.option("--output", default=None, help="Write per-utterance hypotheses (.tsv/.json).")
    @click.option("--sample-len", default=None, type=POSITIVE,
                  help="Cap on generated tokens per clip (default: Whisper's 224), as the recipe's "
                       "eval_sample_len.")
    @click.option("--long-form", "long_form", default=None, metavar="SECONDS",
                  type=click.FloatRange(min=0, min_open=True),
                  help="Also join consecutive clips into recordings of about SECONDS and score "
                       "transcribe() on them (timestamps, temperature fallback, conditioning).")
    @click.option("--long-form-gap", default=0.5, show_default=True, type=click.FloatRange(min=0),
                  help="Seconds of silence between the joined clips.")
    @click.option("--audio-context", default=None,
                  help="Encoder positions per window: full, dynamic, dynamic:MARGIN or a number "
                       "(default: the model's config.json, else full).")
    @click.option("--chunking", default="sequential", show_default=True,
                  type=click.Choice(["sequential", "vad"]),
                  help="How --long-form recordings are transcribed: sequential 30-s seeking on "
                       "timestamps, or cut at silences by the VAD (transcribe's chunking).")
    @click.option("--vad-max-chunk", default=None, type=click.FloatRange(min=1),
                  metavar="SECONDS", help="With --chunking vad: the longest chunk (default 30).")
    @click.option("--no-clips", is_flag=True,
                  help="With --long-form, score only the long recordings, not each clip.")
    @click.option("--condition-on-previous-text/--no-condition-on-previous-text", default=None,
                  help="With --long-form: prompt each window with the text before it (default: "
                       "the model's config.json, else on, as transcribe()).")
    @click.option("--resume-early-end/--no-resume-early-end", default=None,
                  help="With --long-form: go on from where a window's text ended early when "
                       "speech follows (transcribe's resume_early_end; default: the model's).")
    @friendly
    def evaluate_cmd(model, manifest, language, limit, batch_size, output, sample_len, long_form,
                     long_form_gap, audio_context, chunking, vad_max_chunk, no_clips,
                     condition_on_previous_text, resume_early_end):
        """WER and CER (normalised text, see evaluate.py) with greedy decoding; with
        --long-form, also on long recordings made of the clips."""
        from ..decoding import DecodingOptions
        from ..evaluate import evaluate_long_form, save_hypotheses
        from ..load import load_model
        from ..dataset import read_manifest

        if vad_max_chunk is not None and chunking != "vad":
            raise click.UsageError("--vad-max-chunk needs --chunking vad")
        if no_clips and not long_form:
            raise click.UsageError("--no-clips needs --long-form: there would be nothing to score")
        options = DecodingOptions(without_timestamps=True, temperature=0.0, sample_len=sample_len)
        whisper, examples = load_model(model), read_manifest(manifest, language=language)
        if not no_clips:
            _score_clips(whisper, examples, manifest, language, batch_size, limit, options,
                         audio_context, output)
        if long_form:
            lf = evaluate_long_form(whisper, examples, long_form, language=language, gap=long_form_gap,
                                    batch_size=batch_size, limit=limit, audio_context=audio_context,
                                    chunking=chunking, vad_parameters=_vad(vad_max_chunk),
                                    condition_on_previous_text=condition_on_previous_text,
                                    resume_early_end=resume_early_end)
            click.echo(f"long-form WER {100 * lf['wer']:.2f}%  CER {100 * lf['cer']:.2f}%  "
                       f"({lf['n']} recordings of {lf['clips']} clips, {lf['audio_seconds']:.0f} s of "
                       f"audio, {lf['seconds']:.0f} s, chunking {chunking}"
                       f"{'' if vad_max_chunk is None else f' at most {vad_max_chunk:g} s'}"
                       f"{'' if condition_on_previous_text is None else f', condition_on_previous_text {condition_on_previous_text}'}"
                       f"{'' if resume_early_end is None else f', resume_early_end {resume_early_end}'})")
            if output:
                save_hypotheses(lf, _long_form_path(output))

    def _score_clips(whisper, examples, manifest, language, batch_size, limit, options,
                     audio_context, output) -> None:
        from ..evaluate import evaluate, save_hypotheses

        r = evaluate(whisper, examples, language=language, batch_size=batch_size, limit=limit,
                     options=options, audio_context=audio_context)
        if r["n"] == 0:
            reasons = "; ".join(f"{name}: {why}" for name, why in r["skipped"][:3])
            raise ValueError(f"no usable utterances in {manifest} ({len(r['skipped'])} skipped"
                             + (f": {reasons}" if reasons else "") + ")")
        click.echo(f"WER {100 * r['wer']:.2f}%  CER {100 * r['cer']:.2f}%  ({r['n']} utterances, "
                   f"{len(r['skipped'])} skipped, {r['seconds']:.0f} s)")
        if output:
            save_hypotheses(r, output)

    @main.command("recipe")
    @click.option("--stages", default=None,
                  help=f"Comma-separated subset of {','.join(STEPS)} (default: all). Needed earlier "
                       f"stages are loaded from --out, so independent stages can run in parallel "
                       f"processes.")
    @stage_command
    @friendly
    def recipe_cmd(opts: StageOptions, stages):
        """Fine-tune → merge-search → recover → removed baseline → shear → evaluate, into OUT."""
        from .recipe import Recipe

        cfg = opts.config()
        chosen = tuple(x.strip() for x in stages.split(",") if x.strip()) if stages else None
        recipe = Recipe(opts.train, opts.dev, opts.out, cfg, resume=opts.resume, stages=chosen,
                        force=opts.force, cache_dir=opts.cache_dir, clear_cache=opts.clear_cache)
        try:
            recipe.run()
        except KeyboardInterrupt as e:
            click.echo(f"interrupted{': ' + str(e) if str(e) else ''}; rerun the same command to resume",
                       err=True)
            raise SystemExit(130) from None
        from .distributed import is_main

        if not is_main():  # rank 0 writes the results, and may still be scoring when this rank ends
            return
        click.echo((Path(opts.out) / "results.md").read_text())
        # the last model this run's stages wrote (the removal baseline when only it ran)
        done = [n for n in reversed(chosen or STEPS) if (Path(opts.out) / n / "config.json").exists()]
        if done:
            click.echo(f"model: {Path(opts.out) / done[0]}")
