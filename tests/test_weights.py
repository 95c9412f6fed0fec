"""Every checkpoint format loads to the same model; hostile or broken files fail clearly.

The fixtures (tests/fixtures/make_fixtures.py) hold one seeded random Whisper in each
format; the reference is that model built straight from the seeded arrays.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_baldwhisper import ModelLoadError
from mlx_baldwhisper.load import build_model, load_model
from mlx_baldwhisper.dims import ModelDimensions
from mlx_baldwhisper.weights import Checkpoint, embedded, openai_pt, read_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

PROMPT = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
STALE = "fixtures differ from make_fixtures.py: run python tests/fixtures/make_fixtures.py"


def logits(model) -> np.ndarray:
    mel = np.random.default_rng(0).standard_normal((1, 3000, 80)).astype(np.float32)
    return np.array(model(mx.array(mel), mx.array([PROMPT])))


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return mf.reference_weights()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """The checked-in fixtures, or fresh ones when they have not been generated."""
    paths = mf.fixture_paths(FIXTURES)
    if all(p.exists() for p in paths.values()):
        return paths
    return mf.write_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def reference(weights) -> np.ndarray:
    w = {k: v.astype(np.float32) for k, v in weights.items()}
    return logits(build_model(Checkpoint(ModelDimensions(**mf.DIMS), w, source="reference")))


def assert_reference(model, reference: np.ndarray) -> None:
    assert model.dims == ModelDimensions(**mf.DIMS), STALE
    assert np.abs(logits(model) - reference).max() < 1e-4, STALE


@pytest.mark.parametrize("fmt", ["ct2", "openai_pt", "hf"])
def test_every_format_gives_the_reference_logits(fixtures, reference, fmt):
    model = load_model(fixtures[fmt])
    assert_reference(model, reference)
    if fmt == "openai_pt":  # a .pt has no alignment heads: the model default applies
        assert model.alignment_heads == [[l, h] for l in (2, 3) for h in range(4)]
    else:
        assert model.alignment_heads == mf.ALIGNMENT_HEADS


@pytest.mark.parametrize("variant", [dict(weights="bin"), dict(shards=3)], ids=["pytorch_bin", "sharded"])
def test_hf_variants(tmp_path, weights, reference, variant):
    folder = mf.write_hf(tmp_path / "hf", weights, **variant)
    assert_reference(load_model(folder), reference)


def test_legacy_torch_format(tmp_path, weights, reference):
    obj, storages = mf.openai_state(weights)
    path = mf.write_torch_legacy(tmp_path / "legacy.pt", obj, storages)
    assert_reference(load_model(path), reference)


def test_torch_views_and_dtypes(tmp_path):
    """Offsets into a shared storage, transposed strides, bfloat16 widened by bit shifting."""
    st = mf.Storages()
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    shared = st.add(base)
    top = np.array([1.0, -2.5, 0.15625, 3e38], dtype=np.float32).view(np.uint32) >> 16
    bf = st.add(top.astype(np.uint16), kind="BFloat16Storage")
    bf16 = (top << 16).view(np.float32)  # the values bfloat16 holds
    obj = {"rows": mf.Tensor(shared, 6, (2, 6), (6, 1)), "cols": mf.Tensor(shared, 1, (5, 2), (1, 6)),
           "bf16": mf.Tensor(bf, 1, (3,), (1,)), "ids": st.tensor(np.arange(3, dtype=np.int64))}
    state = openai_pt.load_state(mf.write_torch_zip(tmp_path / "t.pt", obj, st))
    np.testing.assert_array_equal(state["rows"], base[1:3])
    np.testing.assert_array_equal(state["cols"], base[:2, 1:].T)
    assert state["bf16"].dtype == np.float32
    np.testing.assert_array_equal(state["bf16"], bf16[1:])
    np.testing.assert_array_equal(state["ids"], [0, 1, 2])


def test_openai_pt_alignment_heads_and_tokenizer(fixtures):
    assert openai_pt.read(fixtures["openai_pt"]).tokenizer_dir == embedded.folder("base")[0]
    pairs = openai_pt.read(fixtures["openai_pt"], alignment_heads=[[3, 1], [2, 0]])
    assert pairs.alignment_heads == [[3, 1], [2, 0]]
    mask = np.zeros((mf.DIMS["n_text_layer"], mf.DIMS["n_text_head"]), dtype=bool)
    mask[2, 1] = mask[3, 3] = True  # openai's encoding: base85 of gzip of the boolean mask
    packed = base64.b85encode(gzip.compress(mask.tobytes()))
    assert openai_pt.read(fixtures["openai_pt"], packed).alignment_heads == [[2, 1], [3, 3]]


def _malicious(kind: str, tmp_path: Path, fixtures) -> Path:
    if kind == "zip":
        return fixtures["malicious_pt"]
    evil = mf.Reduce(mf.Global("posix", "system"), (f"touch {mf.MARKER}",))
    if kind == "legacy":
        return mf.write_torch_legacy(tmp_path / "evil.pt", {"model_state_dict": evil}, mf.Storages())
    folder = tmp_path / "hf"  # a transformers folder whose pytorch_model.bin is hostile
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(mf.hf_config()))
    mf.write_torch_zip(folder / "pytorch_model.bin", {"x": evil}, mf.Storages())
    return folder


@pytest.mark.parametrize("kind", ["zip", "legacy", "hf_bin"])
def test_malicious_pickle_is_refused_not_run(tmp_path, monkeypatch, fixtures, kind):
    path = _malicious(kind, tmp_path, fixtures)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"refusing to unpickle posix\.system: not a tensor checkpoint"):
        load_model(path)
    assert not (tmp_path / mf.MARKER).exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("torch", "load"), ("numpy", "load")])
def test_only_tensor_globals_are_allowed(tmp_path, module, name):
    path = mf.write_torch_zip(tmp_path / "g.pt", {"x": mf.Reduce(mf.Global(module, name), ("1",))},
                              mf.Storages())
    with pytest.raises(ModelLoadError, match=f"refusing to unpickle {module}.{name}"):
        openai_pt.load_state(path)


def _copy(src: Path, dst: Path) -> Path:
    return shutil.copytree(src, dst) if src.is_dir() else Path(shutil.copy(src, dst))


def test_truncated_or_corrupt_model_bin(tmp_path, fixtures):
    folder = _copy(fixtures["ct2"], tmp_path / "ct2")
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(folder)
    (folder / "model.bin").write_bytes(data[:4] + b"\x0c\x00EncoderSpec\x00" + data[18:])
    with pytest.raises(ModelLoadError, match="not a Whisper model"):
        load_model(folder)


def test_truncated_pt(tmp_path, fixtures):
    data = fixtures["openai_pt"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "cut.pt")


def test_folder_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(mf.hf_config()))
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        load_model(tmp_path)


def test_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = "mlx-baldwhisper-tests/no-such-model"
    with pytest.raises(ModelLoadError, match=f"cannot download {repo} from the Hugging Face Hub "
                                             r"\(offline\?\); pass a local path"):
        read_checkpoint(repo)
