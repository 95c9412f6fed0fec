"""MLX affine quantization of a (possibly compressed) model.

Linear layers and the embedding (or the large low-rank factor A) are quantized;
convolutions, layer norms, positions and the small factor B stay in float. A layer
whose input width is not a multiple of the group size falls back to a group of 32.
The group size of every layer can be read back from its weight/scales shapes, so a
quantized folder reloads with no extra bookkeeping.
"""

from __future__ import annotations

import mlx.nn as nn

SUPPORTED_BITS = (2, 3, 4, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)


def check_quantization(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--q-bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"--q-group-size must be one of {SUPPORTED_GROUPS}, got {group_size}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64) -> dict:
    check_quantization(bits, group_size)

    def pick(path: str, m: nn.Module):
        if not isinstance(m, (nn.Linear, nn.Embedding)) or not hasattr(m, "to_quantized"):
            return False
        width = m.weight.shape[-1]
        for gs in (group_size, 32):
            if width % gs == 0:
                return {"group_size": gs, "bits": bits}
        return False

    candidates = [(path, m) for path, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Embedding))]
    skipped = sorted(path for path, m in candidates if not pick(path, m))
    if len(skipped) == len(candidates):
        raise ValueError("no layer of this model can be quantized: widths must be multiples of 32")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pick)
    info = {"bits": bits, "group_size": group_size}
    if skipped:  # widths that are not a multiple of 32 stay in float
        info["float_layers"] = skipped
    model.extra_config["quantization"] = info
    return info


def group_size_of(weights: dict, name: str, bits: int) -> int:
    """Infer a quantized layer's group size from its packed weight and scales shapes."""
    packed = weights[f"{name}.weight"].shape[-1]
    n_groups = weights[f"{name}.scales"].shape[-1]
    return packed * 32 // bits // n_groups
