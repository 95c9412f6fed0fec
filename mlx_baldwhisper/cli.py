"""The ``mlx_baldwhisper`` command line.

Option names follow openai-whisper's ``whisper`` command. Errors a user can fix
(missing file, unknown language, bad model folder) print one line to stderr and
exit with status 1; set MLX_BALDWHISPER_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import click


def _end_progress_bars() -> None:
    """Close every tqdm bar still drawn (the bar ends its line), so that a message that
    follows starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    classes = [tqdm.tqdm] if tqdm is not None else []
    for cls in classes:  # tqdm.auto and friends keep their own instance sets
        classes.extend(cls.__subclasses__())
    for bar in {bar for cls in classes for bar in list(getattr(cls, "_instances", ()))}:
        with contextlib.suppress(Exception):  # e.g. its stream is already closed
            bar.close()


def friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            _end_progress_bars()
            raise
        except KeyboardInterrupt:
            _end_progress_bars()
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # one line, no traceback: the message names the problem
            _end_progress_bars()
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


BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class WhisperStyleCommand(click.Command):
    """Also takes openai-whisper's spellings: ``--beam_size`` for ``--beam-size``, and
    ``--word_timestamps True`` / ``--fp16 False`` for the ``--flag`` / ``--no-flag`` pairs."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._normalise(ctx, list(args)))

    def _normalise(self, ctx: click.Context, args: list[str]) -> list[str]:
        options = {name: p for p in self.get_params(ctx) if isinstance(p, click.Option)
                   for name in p.opts + p.secondary_opts}
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                return out + args[i - 1:]
            spelled, eq, value = arg.partition("=")
            name = spelled.replace("_", "-")
            opt = options.get(name) if arg.startswith("--") else None
            if opt is None:
                out.append(arg)
            elif not (opt.is_flag and opt.secondary_opts):
                out.append(name + eq + value)
                if not eq and not opt.is_flag and i < len(args):
                    out.append(args[i])  # its value, untouched (it may start with --)
                    i += 1
            else:
                if not eq and i < len(args) and _looks_like_bool(args[i]):
                    eq, value = "=", args[i]
                    i += 1
                keep = not eq or _bool(ctx, spelled, value)
                out.append(name if keep else (opt.secondary_opts if name in opt.opts else opt.opts)[0])
        return out


def _looks_like_bool(arg: str) -> bool:
    """A word after a flag is its True/False value; a file name is the next argument."""
    return arg.lower() in BOOL_WORDS or (arg.isalnum() and not os.path.exists(arg))


def _bool(ctx: click.Context, name: str, value: str) -> bool:
    if value.lower() not in BOOL_WORDS:
        raise click.UsageError(f"{name} expects True or False, got {value!r}", ctx)
    return BOOL_WORDS[value.lower()]


class OrNone(click.ParamType):
    """openai-whisper's optional numbers: ``None`` switches the feature off."""

    def __init__(self, inner: click.ParamType):
        self.inner, self.name = inner, inner.name

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        return self.inner.convert(value, param, ctx)


def _clip_timestamps(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from .transcribe import parse_clip_timestamps

    try:
        parse_clip_timestamps(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


def _suppress_tokens(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated token ids expected, got {value!r}", ctx, param) from None
    return value


def _temperatures(temperature: float, increment: Optional[float]) -> tuple[float, ...]:
    """The fallback ladder: ``temperature``, then hotter by ``increment`` up to 1."""
    if not increment:
        return (temperature,)
    steps = int(round((1.0 - temperature) / increment))
    return tuple(round(temperature + i * increment, 3) for i in range(steps + 1))


def _dtype(fp16: Optional[bool], dtype: Optional[str]) -> str:
    """--fp16 as openai-whisper: half precision where it is fast; Linux's CPU is not (13-30x slower)."""
    if fp16 is None:
        return dtype or "float32"
    if dtype is not None:
        if fp16 != (dtype != "float32"):
            raise click.UsageError(f"--fp16 {fp16} contradicts --dtype {dtype}")
        return dtype
    import mlx.core as mx

    if fp16 and sys.platform.startswith("linux") and mx.default_device() == mx.cpu:
        warnings.warn("FP16 is much slower than FP32 on this CPU; using FP32 instead")
        return "float32"
    return "float16" if fp16 else "float32"


def _say(message: str) -> None:
    """A line on stderr that leaves any progress bar intact."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _reason(path: str, error: Exception) -> str:
    """The error's message; the line already starts with the path, so it says the name only."""
    return str(error).replace(path, os.path.basename(path)) or type(error).__name__


def _audio_context(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    if value is None:
        return None
    from .audio_context import AudioContext, AudioContextError

    try:
        AudioContext.parse(value)
    except AudioContextError as e:
        raise click.BadParameter(str(e)) from None
    return value


OPTIONAL_INT = OrNone(click.IntRange(min=1))
PUNCTUATION_HELP = "; words are timed together with them (with --word_timestamps)."


@main.command(cls=WhisperStyleCommand)
@click.argument("audio", nargs=-1, required=True)
@click.option("--model", default=None,
              help="Model folder, .pt file, hub id, or embedded name (default: base).")
@click.option("--output-dir", "-o", default=".", show_default=True, help="Directory for the outputs.")
@click.option("--output-format", "-f", default="all", show_default=True,
              type=click.Choice(["txt", "vtt", "srt", "tsv", "json", "all"]),
              help="Format of the output files; all writes every format.")
@click.option("--verbose/--no-verbose", default=True, show_default=True,
              help="Print each segment as it is decoded; False shows a progress bar instead.")
@click.option("--task", default="transcribe", type=click.Choice(["transcribe", "translate"]),
              show_default=True, help="Transcribe in the spoken language, or translate to English.")
@click.option("--language", default=None, help="Language code or name; detected when omitted.")
@click.option("--temperature", default=0.0, type=click.FloatRange(0, 1), show_default=True,
              help="Sampling temperature of the first attempt at each window.")
@click.option("--best-of", default=5, type=click.IntRange(min=1), show_default=True,
              help="Candidates when sampling at a temperature above 0.")
@click.option("--beam-size", default=5, type=click.IntRange(min=1), show_default=True,
              help="Beams at temperature 0 (1 = greedy).")
@click.option("--patience", default=None, type=OrNone(click.FloatRange(min=0, min_open=True)),
              help="Beam search patience factor (default 1.0: stop after beam-size finished candidates).")
@click.option("--length-penalty", default=None, type=OrNone(click.FloatRange(min=0)),
              help="Length penalty alpha, as in Wu et al. 2016 (default: divide by the length).")
@click.option("--suppress-tokens", default="-1", show_default=True, callback=_suppress_tokens,
              help="Comma-separated token ids never to sample; -1 means the non-speech symbols.")
@click.option("--initial-prompt", default=None, help="Text given as previous context to the first window.")
@click.option("--condition-on-previous-text/--no-condition-on-previous-text", default=None,
              help="Give each window the previous text as a prompt (False: less prone to "
              "repetition loops, less consistent). Default: the model's config.json (off in "
              "models fine-tuned here), else on.")
@click.option("--fp16/--no-fp16", default=None,
              help="Half precision (True) or float32 (False); on Linux's CPU float16 is much "
              "slower, so True falls back to float32 with a warning. Default: --dtype.")
@click.option("--temperature-increment-on-fallback", default=0.2, show_default=True,
              type=OrNone(click.FloatRange(min=0)),
              help="Re-decode failing windows this much hotter, up to 1 (0 or None: no fallback).")
@click.option("--compression-ratio-threshold", default=2.4, show_default=True,
              type=OrNone(click.FloatRange(min=0)),
              help="A window whose text gzip-compresses better than this is a failure (repetitive).")
@click.option("--logprob-threshold", default=-1.0, show_default=True, type=OrNone(click.FLOAT),
              help="A window whose average log probability is lower is a failure.")
@click.option("--no-speech-threshold", default=0.6, show_default=True,
              type=OrNone(click.FloatRange(0, 1)),
              help="A window is silent if its no-speech probability is higher and it also failed "
              "--logprob_threshold.")
@click.option("--word-timestamps/--no-word-timestamps", default=False, show_default=True,
              help="Time each word (cross-attention alignment); needed by the --max_line_* options.")
@click.option("--prepend-punctuations", default="\"'“¿([{-", show_default=True,
              help="Punctuation that belongs to the next word" + PUNCTUATION_HELP)
@click.option("--append-punctuations", default="\"'.。,，!！?？:：”)]}、", show_default=True,
              help="Punctuation that belongs to the previous word" + PUNCTUATION_HELP)
@click.option("--without-timestamps/--with-timestamps", default=False, show_default=True,
              help="Decode text only, without timestamp tokens (segments then span whole windows).")
@click.option("--highlight-words/--no-highlight-words", default=False, show_default=True,
              help="Underline each word as it is spoken in srt/vtt (needs --word_timestamps).")
@click.option("--max-line-width", default=None, type=OPTIONAL_INT,
              help="Characters per subtitle line (needs --word_timestamps).")
@click.option("--max-line-count", default=None, type=OPTIONAL_INT,
              help="Lines per subtitle (needs --word_timestamps).")
@click.option("--max-words-per-line", default=None, type=OPTIONAL_INT,
              help="Words per subtitle (needs --word_timestamps).")
@click.option("--threads", default=0, type=click.IntRange(min=0), show_default=True,
              help="CPU threads for the encoder's BLAS and numpy kernels (0: "
              "MLX_BALDWHISPER_ENCODER_THREADS, else up to 2). Decoding steps use one.")
@click.option("--clip-timestamps", default="0", show_default=True, callback=_clip_timestamps,
              help="Only these parts: start,end,start,end,... in seconds; the last end may be "
              "left out (to the end of the file).")
@click.option("--hallucination-silence-threshold", default=None, type=OrNone(click.FloatRange(min=0)),
              help="With --word_timestamps: skip silences longer than this many seconds around "
              "a segment that looks hallucinated.")
@click.option("--audio-context", default=None, callback=_audio_context,
              help="Encoder positions per 30-s window: full (Whisper's 1500), dynamic (the "
              "speech plus a margin; dynamic:MARGIN sets it) or a number. Default: the "
              "model's config.json, else full. Only a model trained for it (the "
              "audio-context stage) keeps its accuracy when shorter.")
@click.option("--resume-early-end/--no-resume-early-end", default=None,
              help="When a window's text ends 1 s or more before the window and the energy VAD "
              "hears speech after it, go on from where the text ended (openai-whisper skips "
              "the rest of the window). Default: the model's config.json, else off.")
@click.option("--chunking", default="sequential", show_default=True,
              type=click.Choice(["sequential", "vad"]),
              help="How a long file is cut into 30-s windows: sequential (Whisper's, by the "
              "timestamps it predicts) or vad (at silences found by an energy VAD; the chunks "
              "are decoded in batches without timestamps, one segment each: for models "
              "that lost their timestamps).")
@click.option("--vad-max-chunk", default=None, type=click.FloatRange(min=1), metavar="SECONDS",
              help="With --chunking vad: the longest chunk in seconds (default 30). A model "
              "fine-tuned on short clips may do better on chunks nearer their length.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Precision of the weights and activations (default float32).")
@click.option("--batch-size", default=4, type=click.IntRange(min=1), show_default=True,
              help="Files decoded together.")
@friendly_errors
def transcribe(audio: tuple[str, ...], model: Optional[str], output_dir: str, output_format: str,
               verbose: bool, temperature: float, temperature_increment_on_fallback: Optional[float],
               best_of: int, beam_size: int, highlight_words: bool, max_line_width: Optional[int],
               max_line_count: Optional[int], max_words_per_line: Optional[int], threads: int,
               fp16: Optional[bool], dtype: Optional[str], batch_size: int, **options: Any) -> None:
    """Transcribe AUDIO files and write txt/vtt/srt/tsv/json next to each other.

    Options follow openai-whisper's whisper command (--beam_size, --word_timestamps True, ...).
    A file that cannot be read is reported and skipped; the exit status is then 1.
    """
    from tqdm import tqdm

    from . import _blas
    from .transcribe import transcribe as run
    from .writers import get_writer

    writer_options = {"highlight_words": highlight_words, "max_line_width": max_line_width,
                      "max_line_count": max_line_count, "max_words_per_line": max_words_per_line}
    if not options["word_timestamps"]:
        if max_line_width or max_line_count or max_words_per_line or highlight_words:
            raise click.UsageError("--highlight_words and --max_line_* need --word_timestamps True")
        if options["hallucination_silence_threshold"] is not None:
            raise click.UsageError("--hallucination_silence_threshold needs --word_timestamps True")
    if options["chunking"] == "vad" and (options["word_timestamps"] or options["clip_timestamps"] != "0"):
        raise click.UsageError("--chunking vad decodes without timestamps: it cannot take "
                               "--word_timestamps or --clip_timestamps")
    if options["vad_max_chunk"] is not None and options["chunking"] != "vad":
        raise click.UsageError("--vad-max-chunk needs --chunking vad")
    max_chunk = options.pop("vad_max_chunk")
    options["vad_parameters"] = None if max_chunk is None else {"max_chunk_seconds": max_chunk}
    precision = _dtype(fp16, dtype)
    temps = _temperatures(temperature, temperature_increment_on_fallback)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    writer = get_writer(output_format, output_dir)
    failures: list[str] = []

    def failed(path: str, error: Exception) -> None:
        failures.append(path)
        _say(f"error: {path}: {_reason(path, error)}")

    files = tqdm(total=len(audio), unit="file", disable=len(audio) < 2 or verbose)
    with _blas.cpu_threads(threads):
        for start in range(0, len(audio), batch_size):
            chunk = list(audio[start:start + batch_size])
            results = run(chunk, path_or_hf_repo=model, verbose=verbose, temperature=temps,
                          best_of=best_of, beam_size=None if beam_size == 1 else beam_size,
                          dtype=precision, on_audio_error=failed, **options)
            for path, result in zip(chunk, results):
                if result is not None:
                    try:
                        writer(result, path, writer_options)
                    except OSError as e:
                        failed(path, e)
            files.update(len(chunk))
    files.close()
    if failures:
        if len(audio) > 1:
            _say(f"{len(failures)} of {len(audio)} files failed")
        sys.exit(1)


from .training.commands import register_training_commands  # noqa: E402

register_training_commands(main, friendly_errors)


if __name__ == "__main__":
    main()
