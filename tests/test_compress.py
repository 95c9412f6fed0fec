"""BaldWhisper surgery on small fixtures: merging, removal, sheared embedding, quantization."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_baldwhisper import load_model
from mlx_baldwhisper.convert import convert
from mlx_baldwhisper.surgery import Surgery, apply_surgery
from mlx_baldwhisper.load import build_model
from mlx_baldwhisper.merge import make_plan, parse_groups, removal_plan
from mlx_baldwhisper.weights import read_checkpoint

FIXTURE = str(Path(__file__).parent / "fixtures" / "ct2")  # 4 decoder layers, width 24
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ckpt():
    return read_checkpoint(FIXTURE)


def logits(model, seed=0):
    mel = mx.array(np.random.default_rng(seed).standard_normal((1, 3000, 80)).astype(np.float32))
    return np.array(model(mel, mx.array([[50258, 50259, 50359, 50363, 400]])))


def test_alpha_zero_beta_one_gives_the_upper_layers(ckpt):
    merged = apply_surgery(ckpt, Surgery(merge=True, alpha=0.0, beta=1.0))
    assert merged.dims.n_text_layer == 2
    for new, upper in ((0, 1), (1, 3)):
        for key, w in ckpt.weights.items():
            if key.startswith(f"decoder.blocks.{upper}."):
                tail = key.split(".", 3)[3]
                np.testing.assert_array_equal(merged.weights[f"decoder.blocks.{new}.{tail}"], w)


def test_weighted_average_and_single_layer_identity(ckpt):
    merged = apply_surgery(ckpt, Surgery(merge_groups="0,1;3", alpha=1.0, beta=3.0))
    assert merged.dims.n_text_layer == 3  # [0,1], [2] untouched, [3]
    k = "mlp1.weight"
    want = (1 * ckpt.weights[f"decoder.blocks.0.{k}"].astype(np.float32)
            + 3 * ckpt.weights[f"decoder.blocks.1.{k}"].astype(np.float32)) / 4
    np.testing.assert_allclose(merged.weights[f"decoder.blocks.0.{k}"].astype(np.float32), want, atol=1e-3)
    for new, old in ((1, 2), (2, 3)):
        np.testing.assert_array_equal(merged.weights[f"decoder.blocks.{new}.{k}"],
                                      ckpt.weights[f"decoder.blocks.{old}.{k}"])


def f32(ckpt, name):
    return np.asarray(ckpt.weights[name], dtype=np.float32)


def test_groups_of_three_and_encoder_merging(ckpt):
    s = Surgery(merge_groups="0,1,2", encoder_merge_groups="0,1", alpha=0.5, beta=2.0)
    merged = apply_surgery(ckpt, s)
    assert merged.dims.n_text_layer == 2 and merged.dims.n_audio_layer == 1
    assert make_plan(4, parse_groups("0,1,2"), 0.1, 1.0).weights[0] == [0.1, 0.1, 1.0]
    k = "attn.query.weight"
    want = sum(w * f32(ckpt, f"decoder.blocks.{i}.{k}") for i, w in enumerate([0.5, 0.5, 2.0])) / 3
    np.testing.assert_allclose(f32(merged, f"decoder.blocks.0.{k}"), want, atol=1e-3)
    np.testing.assert_array_equal(merged.weights[f"decoder.blocks.1.{k}"], ckpt.weights[f"decoder.blocks.3.{k}"])
    want = (0.5 * f32(ckpt, f"encoder.blocks.0.{k}") + 2 * f32(ckpt, f"encoder.blocks.1.{k}")) / 2.5
    np.testing.assert_allclose(f32(merged, f"encoder.blocks.0.{k}"), want, atol=1e-3)
    assert merged.extra["surgery"]["encoder_merge"]["groups"] == [[0, 1]]
    assert all(l < 2 for l, _ in merged.alignment_heads)
    build_model(merged)  # the merged architecture loads


def test_per_group_weights(ckpt):
    by_weights = apply_surgery(ckpt, Surgery(merge_weights="1,3;0,1"))  # implies --merge
    by_alpha = apply_surgery(ckpt, Surgery(merge_groups="0,1", alpha=1, beta=3))
    upper = apply_surgery(ckpt, Surgery(merge=True, alpha=0, beta=1))
    for key, w in by_weights.weights.items():
        if key.startswith("decoder.blocks.0."):
            np.testing.assert_array_equal(w, by_alpha.weights[key])
        if key.startswith("decoder.blocks.1."):
            np.testing.assert_array_equal(w, upper.weights[key])
    assert by_weights.extra["surgery"]["decoder_merge"]["weights"] == [[1.0, 3.0], [0.0, 1.0]]


def test_removal_keeps_maximally_spaced_layers(ckpt):
    assert [g[0] for g in removal_plan(6, 3).groups] == [0, 2, 5]
    assert [g[0] for g in removal_plan(32, 2).groups] == [0, 31]
    dropped = apply_surgery(ckpt, Surgery(drop=2))
    np.testing.assert_array_equal(dropped.weights["decoder.blocks.1.mlp1.weight"],
                                  ckpt.weights["decoder.blocks.3.mlp1.weight"])


def test_removal_moves_heads_to_the_nearest_kept_layer(ckpt):
    dropped = apply_surgery(ckpt, Surgery(drop=2))  # keeps 0 and 3; heads (2,1) (3,0) (3,3)
    assert dropped.alignment_heads == [[1, 1], [1, 0], [1, 3]]
    assert dropped.extra["surgery"]["decoder_removal"] == {"kept": [0, 3], "source_layers": 4}


def test_alignment_heads_follow_their_layer(ckpt):
    merged = apply_surgery(ckpt, Surgery(merge=True))
    plan = make_plan(ckpt.dims.n_text_layer, None, 0.1, 1.0)
    for l, h in ckpt.alignment_heads:
        assert [next(i for i, g in enumerate(plan.groups) if l in g), h] in merged.alignment_heads
    assert all(l < merged.dims.n_text_layer for l, _ in merged.alignment_heads)


def test_full_rank_reproduces_logits_and_low_rank_is_close(ckpt):
    d = ckpt.dims.n_text_state
    ref = logits(build_model(ckpt))
    full = apply_surgery(ckpt, Surgery(rank=d))
    assert full.dims.embedding_rank == d
    np.testing.assert_allclose(logits(build_model(full)), ref, atol=1e-3)
    s = Surgery(rank=d // 2)
    low = apply_surgery(ckpt, s)
    assert 0 < s.report["relative_error"] < 1
    assert low.weights["decoder.token_embedding.A.weight"].shape == (ckpt.dims.n_vocab, d // 2)


def test_exact_rows_stay_whole_and_the_rest_is_factored(ckpt):
    d, v = ckpt.dims.n_text_state, ckpt.dims.n_vocab
    E = np.asarray(ckpt.weights["decoder.token_embedding.weight"])
    full = apply_surgery(ckpt, Surgery(rank=d, exact_rows=1608))
    np.testing.assert_allclose(logits(build_model(full)), logits(build_model(ckpt)), atol=1e-3)
    low = apply_surgery(ckpt, Surgery(rank=d // 4, exact_rows=1608))
    assert low.dims.embedding_exact_rows == 1608
    assert low.weights["decoder.token_embedding.A.weight"].shape == (v - 1608, d // 4)
    model = build_model(low)
    emb = model.decoder.token_embedding
    W = np.array(emb.weight)
    assert W.shape == (v, d) and np.array_equal(W[v - 1608:], E[v - 1608:])
    assert not np.allclose(W[:v - 1608], E[:v - 1608], atol=1e-3)  # the text rows are factored
    tokens = mx.array([[50258, 400, 51000, 7]])
    np.testing.assert_allclose(np.array(emb(tokens))[0], W[[50258, 400, 51000, 7]], atol=1e-5)
    x = mx.random.normal((1, 2, d))
    np.testing.assert_allclose(np.array(emb.as_linear(x)), np.array(x) @ W.T, atol=1e-3)
    with pytest.raises(ValueError, match="exact_rows must be between"):
        apply_surgery(ckpt, Surgery(rank=8, exact_rows=v))


@pytest.mark.parametrize("bad,match", [
    (Surgery(rank=0), "rank must be between"),
    (Surgery(rank=10_000), "rank must be between"),
    (Surgery(merge_groups="0,1;1,2"), "two merge groups"),
    (Surgery(merge_groups="0,2"), "adjacent"),
    (Surgery(merge_groups="7,8"), "does not exist"),
    (Surgery(merge_groups="a;b"), "must look like"),
    (Surgery(merge=True, alpha=-1), "non-negative"),
    (Surgery(merge=True, drop=2), "alternatives"),
    (Surgery(drop=0), "cannot keep"),
    (Surgery(drop=5), "cannot keep"),
    (Surgery(merge_groups="0,1,2;3", merge_weights="1,1"), "weight groups"),
    (Surgery(merge_weights="1,2,3;1,1"), "has 2 layers but 3 weights"),
    (Surgery(merge_weights="-1,1;0,1"), "non-negative"),
    (Surgery(merge_weights="0,0;0,1"), "positive sum"),
    (Surgery(merge=True, alpha=0, beta=0), "positive sum"),
    (Surgery(encoder_merge_groups="0,1,2"), "does not exist"),
    (Surgery(merge_groups="0,1,2"), None),  # 3 of 4 layers merged, layer 3 kept: fine
    (Surgery(quantize=True, q_bits=5), "--q-bits"),
    (Surgery(quantize=True, q_group_size=48), "--q-group-size"),
])
def test_refusals_write_nothing(bad, match, tmp_path):
    out = tmp_path / "out"
    if match is None:
        convert(FIXTURE, str(out), "float32", bad, log=lambda *_: None)
        assert load_model(str(out)).dims.n_text_layer == 2
        return
    with pytest.raises(ValueError, match=match):
        convert(FIXTURE, str(out), "float32", bad, log=lambda *_: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_odd_layer_count_needs_explicit_groups():
    with pytest.raises(ValueError, match="even count"):
        make_plan(3, None, 0.1, 1.0)


def test_existing_folder_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(FIXTURE, str(out), "float32", Surgery(merge=True), log=lambda *_: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        convert(FIXTURE, str(tmp_path / "file"), "float32", log=lambda *_: None)
    convert(FIXTURE, str(out), "float32", Surgery(merge=True), force=True, log=lambda *_: None)
    # --force writes our files into the folder; the user's file is never deleted (issue 11)
    assert (out / "keep.txt").read_text() == "mine" and load_model(str(out)).dims.n_text_layer == 2


def test_a_failed_write_leaves_no_half_folder(tmp_path, monkeypatch):
    from mlx_baldwhisper.weights import mlx_folder

    out = tmp_path / "out"
    convert(FIXTURE, str(out), "float32", log=lambda *_: None)
    before = sorted(p.name for p in out.iterdir())

    def broken(model, folder, *args):
        (folder / "weights.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mlx_folder, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(FIXTURE, str(out), "float32", Surgery(merge=True), force=True, log=lambda *_: None)
    with pytest.raises(OSError, match="disk full"):
        convert(FIXTURE, str(tmp_path / "new"), "float32", log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling, no "new"
    assert sorted(p.name for p in out.iterdir()) == before
    assert load_model(str(out)).dims.n_text_layer == 4  # the old folder is intact


def test_surgery_refuses_quantized_or_sheared_sources(tmp_path, wide_folder):
    q = tmp_path / "q"
    convert(wide_folder, str(q), "float32", Surgery(quantize=True, q_bits=8), log=lambda *_: None)
    with pytest.raises(ValueError, match="quantized"):
        convert(str(q), str(tmp_path / "x"), "float32", Surgery(merge=True), log=lambda *_: None)
    sheared = tmp_path / "s"
    convert(FIXTURE, str(sheared), "float32", Surgery(rank=8), log=lambda *_: None)
    with pytest.raises(ValueError, match="already factored"):
        convert(str(sheared), str(tmp_path / "y"), "float32", Surgery(rank=4), log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "s"]


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A random model 64 wide, so that MLX's 32/64 quantization groups apply."""
    from conftest import tiny_model
    from mlx_baldwhisper.weights import mlx_folder

    folder = tmp_path_factory.mktemp("wide")
    model = tiny_model(n_audio_state=64, n_text_state=64)
    mlx_folder.save(model, folder, model.tokenizer_dir, "test:wide")
    return str(folder)


@pytest.mark.parametrize("bits,exact", [(8, 0), (4, 0), (4, 1608)])
def test_quantized_compressed_folder_round_trips(bits, exact, tmp_path, wide_folder):
    from mlx.utils import tree_flatten

    out = tmp_path / f"q{bits}"
    surgery = Surgery(merge=True, rank=32, quantize=True, q_bits=bits, q_group_size=64, exact_rows=exact)
    model = convert(wide_folder, str(out), "float32", surgery, log=lambda *_: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    assert cfg["surgery"]["decoder_merge"]["groups"] == [[0, 1], [2, 3]]
    assert cfg["surgery"]["embedding"]["rank"] == 32 and cfg["embedding_rank"] == 32
    assert cfg["n_text_layer"] == 2
    reloaded = load_model(str(out), dequantize=False)
    np.testing.assert_allclose(logits(reloaded), logits(model), atol=1e-4)
    # unpacked at load (the Linux CPU default): float weights, same logits
    unpacked = load_model(str(out), dequantize=True)
    np.testing.assert_allclose(logits(unpacked), logits(reloaded), atol=1e-4)
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(unpacked.parameters()))
    assert unpacked.extra_config["dequantized_from"]["bits"] == bits
    assert "quantization" not in unpacked.extra_config
    names = dict(tree_flatten(reloaded.parameters()))
    # rank 32 is not a multiple of 64: factor A falls back to groups of 32 but is quantized
    assert "decoder.token_embedding.A.scales" in names
    assert "decoder.blocks.0.mlp1.scales" in names
    assert ("decoder.token_embedding.exact" in names) == bool(exact)  # kept in float
    assert "decoder.token_embedding.exact.scales" not in names
    float_logits = logits(load_model(wide_folder))
    assert np.isfinite(logits(reloaded)).all() and float_logits.shape == logits(reloaded).shape


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_cli_reports_sizes(tmp_path):
    out = tmp_path / "m"
    p = cli("--torch-name-or-path", FIXTURE, "--merge", "--rank", "8", "--mlx-path", out)
    assert p.returncode == 0, p.stderr
    assert "| embedding |" in p.stdout and "relative reconstruction error" in p.stdout
    assert "encoder sinusoidal positions" in p.stdout and "total, conventional count" in p.stdout
    bad = cli("--torch-name-or-path", FIXTURE, "--rank", "999", "--mlx-path", tmp_path / "bad")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --rank") and not (tmp_path / "bad").exists()
    again = cli("--torch-name-or-path", FIXTURE, "--merge", "--mlx-path", out)
    assert again.returncode == 1 and "--force" in again.stderr


def test_convert_cli_passes_every_option(tmp_path, wide_folder):
    out = tmp_path / "groups"
    p = cli("--torch-name-or-path", FIXTURE, "--merge-groups", "0,1,2", "--merge-weights", "0.1,0.1,1",
            "--encoder-merge-groups", "0,1", "--alpha", "0.3", "--beta", "2", "--dtype", "float32",
            "--mlx-path", out)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["surgery"]["decoder_merge"]["weights"] == [[0.1, 0.1, 1.0], [1.0]]
    assert cfg["surgery"]["encoder_merge"]["weights"] == [[0.3, 2.0]]
    assert cfg["dtype"] == "float32" and cfg["n_text_layer"] == 2 and cfg["n_audio_layer"] == 1
    out = tmp_path / "drop-q8"
    p = cli("--torch-name-or-path", wide_folder, "--drop", "2", "-q", "--q-bits", "8",
            "--q-group-size", "32", "--mlx-path", out)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["surgery"]["decoder_removal"]["kept"] == [0, 3]
    assert cfg["quantization"] == {"bits": 8, "group_size": 32}
    bad = cli("--torch-name-or-path", wide_folder, "-q", "--q-bits", "3", "--q-group-size", "100",
              "--mlx-path", tmp_path / "bad")
    assert bad.returncode == 1 and "--q-group-size" in bad.stderr and not (tmp_path / "bad").exists()


def test_frequency_weighted_factorisation_keeps_the_used_rows():
    """Weighting the SVD by token frequency trades error on unused rows for the used ones."""
    from mlx_baldwhisper.lowrank import factorize

    rng = np.random.default_rng(3)
    E = rng.normal(size=(400, 32)).astype(np.float32)
    used = rng.choice(400, 12, replace=False)
    w = np.full(400, 1e-4)
    w[used] = 1.0

    def err(A, B, rows):
        return np.linalg.norm(E[rows] - (A @ B)[rows]) / np.linalg.norm(E[rows])

    plain, weighted = factorize(E, 12), factorize(E, 12, w)
    assert err(*weighted[:2], used) < 0.05 < err(*plain[:2], used)
    assert weighted[2] > plain[2]  # the overall error is the plain SVD's optimum
    with pytest.raises(ValueError, match="token_weights"):
        factorize(E, 12, np.zeros(400))
