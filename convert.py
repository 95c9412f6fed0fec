#!/usr/bin/env python
"""Convert Whisper weights to an MLX folder, optionally compressed the BaldWhisper way.

    python convert.py --merge --rank 128 --mlx-path mlx_models/base-bald

SRC (``--torch-name-or-path``) may be an OpenAI ``.pt``, a Hugging Face folder or hub
id, a CTranslate2 folder, one of our MLX folders, or an embedded name (default: the
whisper-base that ships with the package).
"""

import click

from mlx_baldwhisper.cli import friendly_errors
from mlx_baldwhisper.convert import convert
from mlx_baldwhisper.surgery import DEFAULT_ALPHA, DEFAULT_BETA, Surgery


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--torch-name-or-path", "source", default=None, help="Source checkpoint (default: embedded whisper-base).")
@click.option("--mlx-path", default="mlx_models", show_default=True, help="Output folder.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32", "bfloat16"]))
@click.option("--merge", is_flag=True, help="Merge adjacent decoder layer pairs (1,2), (3,4), ...")
@click.option("--merge-groups", default=None, help="Decoder groups, e.g. '0,1;2,3;4,5' or '0,1,2;3,4,5'.")
@click.option("--encoder-merge-groups", default=None, help="Encoder groups, same syntax.")
@click.option("--alpha", default=DEFAULT_ALPHA, show_default=True, type=float, help="Weight of the lower layers.")
@click.option("--beta", default=DEFAULT_BETA, show_default=True, type=float, help="Weight of the upper layer.")
@click.option("--merge-weights", default=None, help="Per-group member weights, e.g. '0.1,1;0.2,1;0,1'.")
@click.option("--drop", default=None, type=int, help="Baseline: keep this many maximally spaced decoder layers.")
@click.option("--rank", default=None, type=int, help="Factor the tied embedding at this rank (sheared embedding).")
@click.option("-q", "--quantize", is_flag=True, help="MLX affine quantization after surgery.")
@click.option("--q-bits", default=4, show_default=True, type=int)
@click.option("--q-group-size", default=64, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@friendly_errors
def main(source, mlx_path, dtype, force, **surgery):
    """Convert SRC to an MLX model folder at --mlx-path."""
    convert(source, mlx_path, dtype, Surgery(**surgery), force=force)


if __name__ == "__main__":
    main()
