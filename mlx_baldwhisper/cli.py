"""The ``mlx_baldwhisper`` command line.

Option names follow openai-whisper's ``whisper`` command. Errors a user can fix
(missing file, unknown language, bad model folder) print one line to stderr and
exit with status 1; set MLX_BALDWHISPER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click



def friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # one line, no traceback: the message names the problem
            if os.environ.get("MLX_BALDWHISPER_DEBUG"):
                raise
            name = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
            click.echo(f"error: {name}{e}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-baldwhisper")
def main() -> None:
    """Whisper in MLX: transcribe, compress (BaldWhisper) and fine-tune on a laptop."""


@main.command()
@click.argument("audio", nargs=-1, required=True)
@click.option("--model", default=None, help="Model folder, .pt file, hub id, or embedded name (default: base).")
@click.option("--output-dir", "-o", default=".", show_default=True, help="Directory for the outputs.")
@click.option("--output-format", "-f", default="all", show_default=True,
              type=click.Choice(["txt", "vtt", "srt", "tsv", "json", "all"]))
@click.option("--verbose/--no-verbose", default=False, help="Print segments as they are decoded.")
@click.option("--task", default="transcribe", type=click.Choice(["transcribe", "translate"]))
@click.option("--language", default=None, help="Language code or name; detected when omitted.")
@click.option("--temperature", default=0.0, type=float, show_default=True)
@click.option("--best-of", default=5, type=int, show_default=True, help="Candidates when sampling.")
@click.option("--beam-size", default=5, type=int, show_default=True, help="Beams at temperature 0 (1 = greedy).")
@click.option("--patience", default=None, type=float)
@click.option("--length-penalty", default=None, type=float)
@click.option("--suppress-tokens", default="-1", show_default=True)
@click.option("--initial-prompt", default=None)
@click.option("--condition-on-previous-text/--no-condition-on-previous-text", default=True)
@click.option("--temperature-increment-on-fallback", default=0.2, type=float, show_default=True)
@click.option("--compression-ratio-threshold", default=2.4, type=float, show_default=True)
@click.option("--logprob-threshold", default=-1.0, type=float, show_default=True)
@click.option("--no-speech-threshold", default=0.6, type=float, show_default=True)
@click.option("--word-timestamps/--no-word-timestamps", default=False)
@click.option("--without-timestamps/--with-timestamps", default=False)
@click.option("--highlight-words/--no-highlight-words", default=False)
@click.option("--max-line-width", default=None, type=int)
@click.option("--max-line-count", default=None, type=int)
@click.option("--max-words-per-line", default=None, type=int)
@click.option("--dtype", default="float32", type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--batch-size", default=4, type=int, show_default=True, help="Files decoded together.")
@friendly_errors
def transcribe(audio: tuple[str, ...], model: Optional[str], output_dir: str, output_format: str,
               verbose: bool, temperature: float, temperature_increment_on_fallback: float,
               best_of: int, beam_size: int, highlight_words: bool, max_line_width: Optional[int],
               max_line_count: Optional[int], max_words_per_line: Optional[int],
               batch_size: int, **options: Any) -> None:
    """Transcribe AUDIO files and write txt/vtt/srt/tsv/json next to each other."""
    from tqdm import tqdm

    from .audio import AudioError
    from .transcribe import transcribe as run
    from .writers import get_writer

    missing = [a for a in audio if not Path(a).exists()]
    if missing:
        raise AudioError(f"audio file not found: {missing[0]}")
    if temperature_increment_on_fallback:
        steps = int(round((1.0 - temperature) / temperature_increment_on_fallback))
        temps = tuple(round(temperature + i * temperature_increment_on_fallback, 3) for i in range(steps + 1))
    else:
        temps = (temperature,)
    if beam_size <= 1:
        beam_size = None
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    writer = get_writer(output_format, output_dir)
    writer_options = {"highlight_words": highlight_words, "max_line_width": max_line_width,
                      "max_line_count": max_line_count, "max_words_per_line": max_words_per_line}
    if (max_line_width or max_line_count or max_words_per_line or highlight_words) and not options["word_timestamps"]:
        raise click.UsageError("--highlight-words and --max-line-* need --word-timestamps")
    files = tqdm(total=len(audio), unit="file", disable=len(audio) < 2 or verbose)
    for start in range(0, len(audio), batch_size):
        chunk = list(audio[start:start + batch_size])
        results = run(chunk, path_or_hf_repo=model, verbose=verbose or False,
                      temperature=temps, best_of=best_of, beam_size=beam_size, **options)
        for path, result in zip(chunk, results):
            writer(result, path, writer_options)
        files.update(len(chunk))
    files.close()


from .training.commands import register_training_commands  # noqa: E402

register_training_commands(main, friendly_errors)


if __name__ == "__main__":
    main()
