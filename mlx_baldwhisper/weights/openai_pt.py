"""Reader for PyTorch checkpoints (OpenAI Whisper ``.pt``, HF ``pytorch_model.bin``) without torch.

A torch file is a pickle whose tensors point at raw "storages". The current format
is a zip (``<top>/data.pkl`` plus one ``<top>/data/<key>`` file per storage); the
legacy format is a stream of pickles followed by the storages' bytes. Pickles can run
any code, so :class:`SafeUnpickler` resolves only the handful of globals a tensor
checkpoint needs, to our own harmless stand-ins, and refuses every other one before
anything is called.
"""

from __future__ import annotations

import base64
import gzip
import io
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence, Union

import numpy as np

from ..dims import ModelDimensions
from . import embedded
from .checkpoint import Checkpoint, ModelLoadError, conv_to_mlx

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype ("bfloat16" is widened to float32 on read).
STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}

AlignmentHeads = Union[Sequence[Sequence[int]], str, bytes, None]


class _StorageType:
    """Stands in for ``torch.HalfStorage`` etc.: only names a dtype."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    @property
    def itemsize(self) -> int:
        return 2 if self.name == "BFloat16Storage" else np.dtype(STORAGE_DTYPES[self.name]).itemsize


class _Storage:
    """One raw storage; its bytes arrive after unpickling (from the zip or the legacy stream)."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype, self.key, self.numel = stype, key, numel
        self.raw: Optional[bytes] = None
        self._array: Optional[np.ndarray] = None

    def array(self, big_endian: bool) -> np.ndarray:
        if self._array is None:
            if self.raw is None or len(self.raw) < self.numel * self.stype.itemsize:
                raise ModelLoadError(f"storage {self.key} is missing or shorter than its "
                                     f"{self.numel} elements: the file is truncated or corrupt")
            raw = self.raw[: self.numel * self.stype.itemsize]
            dtype = STORAGE_DTYPES[self.stype.name]
            if dtype == "bfloat16":  # bfloat16 is the top half of a float32
                bits = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
                self._array = (bits << 16).view(np.float32)
            else:
                dt = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
                self._array = np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype), copy=False)
        return self._array


class _StorageView:
    """A storage as the pickle refers to it: a root storage and an element offset (legacy views)."""

    __slots__ = ("root", "offset")

    def __init__(self, root: _Storage, offset: int = 0):
        self.root, self.offset = root, offset


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: where a tensor's elements lie, read later."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self, big_endian: bool) -> np.ndarray:
        ok = (isinstance(self.storage, _StorageView) and type(self.offset) is int
              and isinstance(self.size, tuple) and isinstance(self.stride, tuple)
              and len(self.size) == len(self.stride)
              and all(type(n) is int and n >= 0 for n in self.size + self.stride)
              and self.offset >= 0)
        if not ok:
            raise ModelLoadError("malformed tensor record in the checkpoint")
        base = self.storage.root.array(big_endian)
        start = self.storage.offset + self.offset
        if 0 in self.size:
            return np.zeros(self.size, dtype=base.dtype)
        last = start + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= base.size:
            raise ModelLoadError(f"a tensor reaches element {last} of storage "
                                 f"{self.storage.root.key}, which holds {base.size}")
        view = np.lib.stride_tricks.as_strided(
            base[start:], shape=self.size, strides=[s * base.itemsize for s in self.stride])
        return np.array(view, order="C")  # a C-ordered copy, detached from the storage


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles tensor checkpoints only: every other global is refused, never imported."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ModelLoadError(f"refusing to unpickle {module}.{name}: not a tensor checkpoint")

    def persistent_load(self, pid: Any) -> _StorageView:
        """Zip: ('storage', type, key, location, numel); legacy adds a view (key, offset, size)."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise ModelLoadError(f"refusing persistent id {pid!r:.80}: not a tensor checkpoint")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise ModelLoadError("malformed storage record in the checkpoint")
        root = self.storages.setdefault(key, _Storage(stype, key, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageView(root)
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int):
            raise ModelLoadError("malformed storage view in the checkpoint")
        return _StorageView(root, view[1])


def _resolve(obj: Any, big_endian: bool) -> Any:
    """Replace every tensor record in the unpickled containers with a numpy array."""
    if isinstance(obj, _TensorRef):
        return obj.materialize(big_endian)
    if isinstance(obj, dict):
        return {k: _resolve(v, big_endian) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, big_endian) for v in obj)
    return obj


def _load_zip(zf: zipfile.ZipFile) -> Any:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        raise ModelLoadError("the zip holds no <name>/data.pkl: not a PyTorch checkpoint")
    top = pkls[0][: -len("/data.pkl")]
    if f"{top}/constants.pkl" in zf.namelist():
        raise ModelLoadError("this is a TorchScript archive, not a checkpoint of weights")
    up = SafeUnpickler(io.BytesIO(zf.read(pkls[0])))
    obj = up.load()
    for key, storage in up.storages.items():
        try:
            storage.raw = zf.read(f"{top}/data/{key}")
        except KeyError:
            raise ModelLoadError(f"the checkpoint lacks the storage file data/{key}") from None
    names = set(zf.namelist())
    big = f"{top}/byteorder" in names and zf.read(f"{top}/byteorder").strip() == b"big"
    return _resolve(obj, big)


def _load_legacy(f: BinaryIO) -> Any:
    """torch < 1.6: magic, protocol, sys info and the object as pickles, then the storages,
    each as int64 element count and bytes, always little-endian."""
    if SafeUnpickler(f).load() != LEGACY_MAGIC:
        raise ModelLoadError("not a PyTorch checkpoint (no zip archive and no legacy magic number)")
    if SafeUnpickler(f).load() != LEGACY_PROTOCOL:
        raise ModelLoadError("unsupported legacy PyTorch protocol version")
    SafeUnpickler(f).load()  # sys info: type sizes of the saving machine, unused
    up = SafeUnpickler(f)
    obj = up.load()
    keys = SafeUnpickler(f).load()
    if not isinstance(keys, list):
        raise ModelLoadError("malformed legacy storage list")
    for key in map(str, keys):
        if key not in up.storages:
            raise ModelLoadError(f"legacy checkpoint lists an unknown storage {key}")
        storage = up.storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel < 0:
            raise ModelLoadError(f"legacy storage {key} has a negative size")
        storage.raw = f.read(numel * storage.stype.itemsize)
        storage.numel = numel
    return _resolve(obj, big_endian=False)


def load_state(path: Path) -> Any:
    """Unpickle a torch file safely; tensors come back as numpy arrays (bfloat16 as float32)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(zf)
        if tarfile.is_tarfile(path):
            raise ModelLoadError(f"{path} uses the pre-2018 tar format of torch.save, which this "
                                 "loader does not read; re-save it with a recent torch")
        with open(path, "rb") as f:
            return _load_legacy(f)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path} is corrupt or not a PyTorch checkpoint: "
                             f"{type(e).__name__}: {e}") from None


def _float(w: Any, name: str) -> np.ndarray:
    if not isinstance(w, np.ndarray):
        raise ModelLoadError(f"{name} is a {type(w).__name__}, not a tensor")
    return w.astype(np.float32) if w.dtype == np.float64 else w


def convert_openai(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """openai/whisper names -> ours: ``mlp.0``/``mlp.2`` -> ``mlp1``/``mlp2``, conv -> MLX layout."""
    out: dict[str, np.ndarray] = {}
    for name, w in state.items():
        if name in ("encoder.positional_embedding", "decoder.mask", "alignment_heads"):
            continue  # fixed sinusoids / causal mask: the model computes them
        ours = name.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2.")
        w = _float(w, name)
        out[ours] = conv_to_mlx(w) if ours.endswith(("conv1.weight", "conv2.weight")) else w
    return out


def parse_alignment_heads(heads: AlignmentHeads, dims: ModelDimensions) -> Optional[list[list[int]]]:
    """[[layer, head], ...] as given, or openai's base85+gzip boolean mask (``_ALIGNMENT_HEADS``)."""
    if heads is None:
        return None
    if isinstance(heads, (str, bytes)):
        try:
            mask = np.frombuffer(gzip.decompress(base64.b85decode(heads)), dtype=bool)
            mask = mask.reshape(dims.n_text_layer, dims.n_text_head)
        except (ValueError, OSError) as e:
            raise ModelLoadError(f"alignment heads are not an openai mask for this model: {e}") from None
        return [[int(l), int(h)] for l, h in np.argwhere(mask)]
    return [[int(l), int(h)] for l, h in heads]


def read(path: Path, alignment_heads: AlignmentHeads = None) -> Checkpoint:
    """Read an OpenAI Whisper ``.pt`` ({"dims": ..., "model_state_dict": ...})."""
    path = Path(path)
    obj = load_state(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("dims"), dict)
            and isinstance(obj.get("model_state_dict"), dict)):
        raise ModelLoadError(f"{path} is a torch file but not an OpenAI Whisper checkpoint "
                             "(expected 'dims' and 'model_state_dict')")
    dims = ModelDimensions.from_dict(obj["dims"])
    weights = convert_openai(obj["model_state_dict"])
    return Checkpoint(dims, weights, source=f"openai:{path}",
                      alignment_heads=parse_alignment_heads(alignment_heads, dims),
                      tokenizer_dir=embedded.default_tokenizer_dir(dims.n_vocab))
