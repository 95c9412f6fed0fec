"""Reader for Hugging Face transformers Whisper folders and hub ids.

A folder holds ``config.json`` (``d_model``, ``encoder_layers`` ...), weights in
``model.safetensors`` or ``pytorch_model.bin`` (either possibly sharded with an
``*.index.json``), optionally ``generation_config.json`` with the alignment heads, and
tokenizer files. Weight names are transformers' (``model.encoder.layers.0.self_attn.q_proj``);
the output projection ``proj_out`` is tied to the token embedding.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..dims import ModelDimensions
from .checkpoint import Checkpoint, ModelLoadError, conv_to_mlx

# Inside one layer: transformers module name -> ours.
_LAYER_MODULES = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp1", "fc2": "mlp2", "final_layer_norm": "mlp_ln",
}
_TOP = {
    "encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
    "encoder.layer_norm": "encoder.ln_post", "decoder.layer_norm": "decoder.ln",
    "decoder.embed_tokens": "decoder.token_embedding",
}
_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)")

# What to fetch from the hub: every folder format read_folder knows, never optimizer states.
HUB_FILES = [
    "config.json", "generation_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
    "added_tokens.json", "special_tokens_map.json", "vocabulary.txt", "vocabulary.json",
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "model.bin", "weights.safetensors", "weights.npz",
]
HUB_TORCH_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def _our_name(name: str) -> Optional[str]:
    """transformers name -> ours; None for weights the model recomputes or ties."""
    name = name.removeprefix("model.")
    if name in ("encoder.embed_positions.weight", "proj_out.weight"):
        return None  # fixed sinusoids; output projection tied to the embedding
    if name == "decoder.embed_positions.weight":
        return "decoder.positional_embedding"
    m = _LAYER.fullmatch(name)
    if m:
        side, i, module, kind = m.groups()
        if module not in _LAYER_MODULES:
            raise ModelLoadError(f"unexpected weight {name!r}: not a Whisper layer")
        if module.endswith("k_proj") and kind == "bias":
            return None  # a key bias shifts every score of a query equally: softmax ignores it
        return f"{side}.blocks.{i}.{_LAYER_MODULES[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    if module not in _TOP:
        raise ModelLoadError(f"unexpected weight {name!r}: not a Whisper model")
    return f"{_TOP[module]}.{kind}"


def convert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, w in state.items():
        ours = _our_name(name)
        if ours is None:
            continue
        w = w.astype(np.float32) if w.dtype == np.float64 else w
        out[ours] = conv_to_mlx(w) if ours.endswith(("conv1.weight", "conv2.weight")) else w
    proj = state.get("proj_out.weight")
    emb = out.get("decoder.token_embedding.weight")
    if proj is not None and emb is not None and not np.array_equal(proj, emb):
        raise ModelLoadError("proj_out is not tied to the token embedding: this model cannot hold it")
    return out


def _shards(path: Path, index: str, single: str) -> Optional[list[Path]]:
    if (path / index).exists():
        try:
            weight_map = json.loads((path / index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path / index} is not a valid shard index: {e}") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    return [path / single] if (path / single).exists() else None


def _load_safetensors(f: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx  # reads bfloat16, which numpy cannot

    try:
        arrays = mx.load(str(f))
    except Exception as e:  # mx.load raises bare RuntimeError/ValueError on corrupt files
        raise ModelLoadError(f"{f} is corrupt or unreadable: {e}") from None
    out = {}
    for k, a in arrays.items():
        if a.dtype not in (mx.float16, mx.float32) and mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(mx.float32)  # bfloat16, which numpy lacks; other dtypes are refused later
        out[k] = np.array(a)
    return out


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a transformers folder, safetensors preferred over pickled torch."""
    files = _shards(path, "model.safetensors.index.json", "model.safetensors")
    if files is not None:
        load = _load_safetensors
    else:
        files = _shards(path, "pytorch_model.bin.index.json", "pytorch_model.bin")
        if files is None:
            raise ModelLoadError(f"{path} has a config.json but no model.safetensors "
                                 "or pytorch_model.bin")
        from .openai_pt import load_state as load
    state: dict[str, np.ndarray] = {}
    for f in files:
        if not f.exists():
            raise ModelLoadError(f"{path}: the shard {f.name} is missing")
        part = load(f)
        if not isinstance(part, dict):
            raise ModelLoadError(f"{f} does not hold a dictionary of tensors")
        state.update(part)
    return state


def dims_from_config(cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> ModelDimensions:
    """Vocabulary and text context come from the arrays, which cannot disagree with the weights."""
    try:
        emb = weights["decoder.token_embedding.weight"]
        return ModelDimensions(
            n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"],
            n_audio_state=cfg["d_model"], n_audio_head=cfg["encoder_attention_heads"],
            n_audio_layer=cfg["encoder_layers"], n_vocab=emb.shape[0],
            n_text_ctx=weights["decoder.positional_embedding"].shape[0],
            n_text_state=cfg["d_model"], n_text_head=cfg["decoder_attention_heads"],
            n_text_layer=cfg["decoder_layers"],
        )
    except KeyError as e:
        raise ModelLoadError(f"a transformers Whisper model lacks {e.args[0]!r}") from None


def read_folder(path: Path, cfg: dict[str, Any]) -> Checkpoint:
    from .embedded import default_tokenizer_dir

    weights = convert(load_weights(path))
    dims = dims_from_config(cfg, weights)
    heads = None
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            heads = json.loads(gen.read_text()).get("alignment_heads")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{gen} is not valid JSON: {e}") from None
    tok = path if (path / "tokenizer.json").exists() else default_tokenizer_dir(dims.n_vocab)
    return Checkpoint(dims, weights, source=f"hf:{path}", alignment_heads=heads, tokenizer_dir=tok)


def _has_weights(folder: Path) -> bool:
    return any((folder / n).exists() for n in (
        "model.safetensors", "model.safetensors.index.json", "model.bin",
        "weights.safetensors", "weights.npz"))


def download(repo_id: str) -> Path:
    """Download (or reuse the cached) config, weights and tokenizer; the local folder."""
    offline_msg = (f"cannot download {repo_id} from the Hugging Face Hub (offline?); "
                   "pass a local path or use the embedded default model")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise ModelLoadError(f"{repo_id} looks like a hub id, but huggingface-hub is not "
                             "installed: pip install huggingface-hub") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
        if not _has_weights(folder):  # older repos ship pickled torch weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_TORCH_FILES + HUB_FILES,
                                            local_files_only=offline))
    except HFValidationError:
        raise ModelLoadError(f"{repo_id!r} is neither an existing path nor a valid hub id") from None
    except RepositoryNotFoundError:  # also gated/private repos
        raise ModelLoadError(f"{repo_id} is not a model on the Hugging Face Hub "
                             "(or it is private or gated)") from None
    except Exception:  # network, timeout, not cached while offline
        raise ModelLoadError(offline_msg) from None
    return folder
