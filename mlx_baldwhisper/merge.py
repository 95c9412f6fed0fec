"""BaldWhisper stage 1: layer merging (and the layer-removal baseline).

A merged layer is a weighted average of a group of adjacent layers, every
parameter alike (self-attention, cross-attention, MLP, layer norms)::

    W = (α·W_lower + β·W_upper) / (α + β)

For groups of more than two layers, every member but the uppermost weighs α and the
uppermost weighs β; explicit per-member weights may be given instead. Layers in no
group are kept unchanged, so a one-layer group is the identity.

Alignment heads (for word timestamps) move with their layer: head (l, h) becomes
(index of the merged layer containing l, h). For removal, a head on a removed layer
moves to the nearest kept layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .weights.checkpoint import Checkpoint


@dataclass
class MergePlan:
    groups: list[list[int]]  # member layer indices, in output order
    weights: list[list[float]]  # one weight per member

    def to_dict(self) -> dict:
        return {"groups": self.groups, "weights": self.weights}


def parse_groups(spec: str) -> list[list[int]]:
    """``"0,1;2,3;4,5"`` -> [[0, 1], [2, 3], [4, 5]]."""
    try:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in spec.split(";") if g.strip()]
    except ValueError:
        raise ValueError(f"merge groups must look like '0,1;2,3;4,5', got {spec!r}") from None
    if not groups or any(not g for g in groups):
        raise ValueError(f"merge groups must look like '0,1;2,3;4,5', got {spec!r}")
    return groups


def parse_weights(spec: str) -> list[list[float]]:
    """``"0.1,1;0.1,1;0.1,1"`` -> per-group member weights."""
    try:
        return [[float(x) for x in g.split(",")] for g in spec.split(";") if g.strip()]
    except ValueError:
        raise ValueError(f"merge weights must look like '0.1,1;0.1,1', got {spec!r}") from None


def adjacent_pairs(n_layers: int) -> list[list[int]]:
    if n_layers % 2:
        raise ValueError(f"default merging pairs adjacent layers and needs an even count, got "
                         f"{n_layers}; pass explicit groups")
    return [[i, i + 1] for i in range(0, n_layers, 2)]


def make_plan(n_layers: int, groups: Optional[list[list[int]]], alpha: float, beta: float,
              weights: Optional[list[list[float]]] = None) -> MergePlan:
    groups = groups or adjacent_pairs(n_layers)
    seen: set[int] = set()
    for g in groups:
        for layer in g:
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} does not exist: the stack has {n_layers} layers (0-{n_layers - 1})")
            if layer in seen:
                raise ValueError(f"layer {layer} appears in two merge groups")
            seen.add(layer)
        if sorted(g) != list(range(min(g), max(g) + 1)):
            raise ValueError(f"merge group {g} is not a run of adjacent layers")
    full = [sorted(g) for g in groups] + [[i] for i in range(n_layers) if i not in seen]
    full.sort(key=min)
    if weights is not None:
        if len(weights) != len(groups):
            raise ValueError(f"{len(weights)} weight groups for {len(groups)} merge groups")
        by_first = {min(g): w for g, w in zip(groups, weights)}
        for g, w in zip(groups, weights):
            if len(w) != len(g):
                raise ValueError(f"group {g} has {len(g)} layers but {len(w)} weights")
        member_w = [by_first.get(g[0], [1.0] * len(g)) for g in full]
    else:
        if alpha < 0 or beta < 0 or alpha + beta <= 0:
            raise ValueError(f"alpha and beta must be non-negative with a positive sum, got {alpha}, {beta}")
        member_w = [[alpha] * (len(g) - 1) + [beta] if len(g) > 1 else [1.0] for g in full]
    for w in member_w:
        if sum(w) <= 0 or min(w) < 0:
            raise ValueError(f"merge weights must be non-negative with a positive sum, got {w}")
    return MergePlan(full, member_w)


def removal_plan(n_layers: int, keep: int) -> MergePlan:
    """Distil-Whisper's layer removal: keep ``keep`` maximally spaced layers (first and last included)."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"cannot keep {keep} of {n_layers} layers")
    kept = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, keep)})
    return MergePlan([[k] for k in kept], [[1.0] for _ in kept])


_LAYER = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")


def apply_plan(ckpt: Checkpoint, plan: MergePlan, stack: str = "decoder") -> Checkpoint:
    """A new checkpoint whose ``stack`` layers are the plan's weighted averages."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    rest: dict[str, np.ndarray] = {}
    for name, w in ckpt.weights.items():
        m = _LAYER.match(name)
        if m and m.group(1) == stack:
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = w
        else:
            rest[name] = w
    out = dict(rest)
    for new_i, (group, ws) in enumerate(zip(plan.groups, plan.weights)):
        total = float(sum(ws))
        for key in layers[group[0]]:
            acc = sum(np.asarray(layers[l][key], dtype=np.float32) * (w / total) for l, w in zip(group, ws))
            out[f"{stack}.blocks.{new_i}.{key}"] = acc.astype(np.asarray(layers[group[0]][key]).dtype)
    dims = ckpt.dims.__class__(**ckpt.dims.to_dict())
    setattr(dims, "n_text_layer" if stack == "decoder" else "n_audio_layer", len(plan.groups))
    heads = ckpt.alignment_heads
    if stack == "decoder":
        heads = map_alignment_heads(heads, plan, ckpt.dims.n_text_layer, ckpt.dims.n_text_head)
    return Checkpoint(dims, out, ckpt.source, heads, ckpt.tokenizer_dir, dict(ckpt.extra))


def map_alignment_heads(heads: Optional[Sequence[Sequence[int]]], plan: MergePlan,
                        n_layers: int, n_heads: int) -> list[list[int]]:
    if heads is None:  # the model default: every head of the upper half
        heads = [[l, h] for l in range(n_layers // 2, n_layers) for h in range(n_heads)]
    where = {l: i for i, g in enumerate(plan.groups) for l in g}
    firsts = [g[0] for g in plan.groups]
    mapped = []
    for l, h in heads:
        i = where.get(l)
        if i is None:  # removed layer: nearest kept layer
            i = int(np.argmin([abs(f - l) for f in firsts]))
        if [i, h] not in mapped:
            mapped.append([i, h])
    return mapped
