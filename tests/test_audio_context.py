"""The variable audio context: shorter encoder input, padded batches, and the policy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model
from mlx_baldwhisper import backends
from mlx_baldwhisper.audio_context import AudioContext, AudioContextError, of_model
from mlx_baldwhisper.decoding import DecodingOptions, LogitRules, decode_features, tokenizer_for
from mlx_baldwhisper.model import padding_mask


def _mel(frames: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((1, frames, 80)).astype(np.float32))


def test_policy_formula_and_caps():
    dyn = AudioContext(mode="dynamic", margin=64, block=16)
    assert dyn.positions_for(480, 1500) == 304  # 240 + 64 = 304, a multiple of 16
    assert dyn.positions_for(481, 1500) == 320  # 240.5 + 64 rounds up to the next block
    assert dyn.positions_for(3000, 1500) == 1500  # capped
    assert dyn.positions_for(0, 1500) == 64
    assert AudioContext().positions_for(10, 1500) == 1500
    fixed = AudioContext.parse(400)
    assert (fixed.mode, fixed.positions_for(10, 1500), fixed.window_frames(1500)) == ("fixed", 400, 800)
    assert AudioContext.parse("dynamic:32").margin == 32
    saved = AudioContext(mode="dynamic", margin=96, block=32)
    assert AudioContext.parse("dynamic", default=saved) == saved
    assert AudioContext.parse(None, default=saved) == saved
    assert AudioContext.parse({"mode": "dynamic", "margin": 16}).margin == 16
    for bad in ("half", "dynamic:x", -5, 0, {"mode": "dynamic", "width": 3}, True):
        with pytest.raises(AudioContextError):
            AudioContext.parse(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 100, 333, 1500])
def test_encoder_output_for_first_n_positions(n):
    model = tiny_model()
    out = model.embed_audio(_mel(2 * n))
    assert out.shape == (1, n, model.dims.n_audio_state)
    assert np.isfinite(np.array(out)).all()


def test_padded_batch_encodes_each_window_as_alone():
    model = tiny_model()
    lengths = [40, 100, 64]
    alone = [model.embed_audio(_mel(2 * n, seed=i)) for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = mx.concatenate([mx.pad(_mel(2 * n, seed=i), [(0, 0), (0, 2 * (width - n)), (0, 0)],
                                   constant_values=3.0)  # padding content must not matter
                            for i, n in enumerate(lengths)])
    for kernels in (True, False):  # the numpy encoder kernels, and plain MLX
        out = (model.embed_audio(batch, mx.array(lengths)) if kernels
               else model.encoder(batch, mx.array(lengths)))
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(np.array(out[i, :n]), np.array(alone[i][0]), atol=2e-5)


def test_padded_cross_attention_matches_alone_on_both_decoding_paths():
    model = tiny_model()
    lengths = [30, 80]
    feats = [model.embed_audio(_mel(2 * n, seed=i)) for i, n in enumerate(lengths)]
    batch = mx.concatenate([mx.pad(f, [(0, 0), (0, 80 - f.shape[1]), (0, 0)]) for f in feats])
    tokens = mx.array([[50258, 50259, 50359]] * 2)
    pad = padding_mask(mx.array(lengths), 80)
    alone = [np.array(model.decoder(tokens[:1], f)[0]) for f in feats]
    with backends.decoding(model, 2, pad) as inference:  # numpy on Linux CPU
        fast = np.array(inference.logits(tokens, batch))
    plain = np.array(model.decoder(tokens, batch, audio_padding=pad)[0])
    for i in range(2):
        np.testing.assert_allclose(fast[i], alone[i][0], atol=1e-3)
        np.testing.assert_allclose(plain[i], alone[i][0], atol=1e-3)


def test_batched_decode_of_different_lengths_matches_alone():
    model = tiny_model()
    lengths = [48, 96]
    feats = [model.embed_audio(_mel(2 * n, seed=i)) for i, n in enumerate(lengths)]
    batch = mx.concatenate([mx.pad(f, [(0, 0), (0, 96 - f.shape[1]), (0, 0)]) for f in feats])
    opts = DecodingOptions(language="en", sample_len=12)
    together = decode_features(model, batch, opts, audio_lengths=lengths)
    for i, f in enumerate(feats):
        alone = decode_features(model, f, opts, audio_lengths=[lengths[i]])[0]
        assert together[i].tokens == alone.tokens


def test_no_timestamp_past_the_encoded_audio():
    model = tiny_model()
    tk = tokenizer_for(model, "en")
    rules = LogitRules(tk, DecodingOptions(), 3, model.dims.n_vocab, None)
    rules.last_ts_index = np.array([100, 1500])
    logits = np.zeros((2, model.dims.n_vocab), np.float32)
    rules.apply(logits, [[1, 2, 3], [1, 2, 3]])
    tb = tk.timestamp_begin
    assert np.isfinite(logits[0, tb + 100]) and np.isneginf(logits[0, tb + 101:]).all()
    assert np.isfinite(logits[1, tb:tb + 1501]).all()


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def _transcribe(model, audio, **kw):
    from mlx_baldwhisper.transcribe import transcribe

    return transcribe(audio, path_or_hf_repo=model, language="en", temperature=0.0,
                      verbose=None, sample_len=16, **kw)


def _record_positions(model, monkeypatch) -> list[int]:
    seen: list[int] = []
    original = type(model).embed_audio

    def recording(self, mel, lengths=None):
        seen.append(mel.shape[1] // 2)
        return original(self, mel, lengths)

    monkeypatch.setattr(type(model), "embed_audio", recording)
    return seen


def test_full_context_is_todays_transcription(monkeypatch):
    model = tiny_model()
    audio = [_clip(4.0, 1), _clip(37.0, 2)]
    today = _transcribe(model, audio)
    seen = _record_positions(model, monkeypatch)
    full = _transcribe(model, audio, audio_context="full")
    assert [r["segments"] for r in full] == [r["segments"] for r in today]
    assert set(seen) == {1500}


def test_dynamic_context_shrinks_only_partial_windows(monkeypatch):
    model = tiny_model()
    seen = _record_positions(model, monkeypatch)
    result = _transcribe(model, _clip(4.0, 3), audio_context="dynamic")
    assert seen == [AudioContext(mode="dynamic").positions_for(400, 1500)] == [272]
    assert result["text"] is not None
    seen.clear()
    _transcribe(model, _clip(45.0, 4), audio_context="dynamic", condition_on_previous_text=False)
    assert seen[0] == 1500 and all(n <= 1500 for n in seen)


def test_batch_of_different_lengths_matches_each_alone():
    model = tiny_model()
    audio = [_clip(3.0, 5), _clip(9.0, 6)]
    together = _transcribe(model, audio, audio_context="dynamic")

    def tokens(result):  # scores agree to float precision, tokens and times exactly
        return [(s["start"], s["end"], s["tokens"]) for s in result["segments"]]

    for a, r in zip(audio, together):
        assert tokens(_transcribe(model, a, audio_context="dynamic")) == tokens(r)


def test_policy_is_saved_with_the_model_and_absent_means_full(tmp_path):
    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.weights import mlx_folder

    model = tiny_model()
    mlx_folder.save(model, tmp_path / "plain", model.tokenizer_dir, "test:tiny")
    assert of_model(load_model(str(tmp_path / "plain"))).is_full
    model.extra_config["audio_context"] = AudioContext(mode="dynamic", margin=32).to_dict()
    mlx_folder.save(model, tmp_path / "short", model.tokenizer_dir, "test:tiny")
    loaded = load_model(str(tmp_path / "short"))
    assert of_model(loaded) == AudioContext(mode="dynamic", margin=32)
    assert of_model(loaded, "full").is_full and of_model(loaded, 200).positions == 200


def test_cli_rejects_a_bad_audio_context(tmp_path):
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    result = CliRunner().invoke(main, ["transcribe", "x.wav", "--audio-context", "half"])
    assert result.exit_code == 2 and "audio context mode must be one of" in result.output


# ---- the audio-context stage ----------------------------------------------------------------

def test_hidden_state_mse_matches_hand_computed_values():
    from mlx_baldwhisper.training.losses import hidden_state_mse

    s = [mx.array([[[1.0, 2.0], [3.0, 4.0]]]), mx.array([[[0.0, 0.0], [2.0, 2.0]]])]
    t = [mx.array([[[1.0, 0.0], [3.0, 0.0]]]), mx.array([[[1.0, 1.0], [0.0, 0.0]]])]
    mask = mx.array([[1.0, 0.0]])  # only the first token counts
    # layer 0, token 0: ((0)² + (2)²) / 2 = 2; layer 1, token 0: (1 + 1) / 2 = 1; mean 1.5
    assert float(hidden_state_mse(s, t, mask)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="layer by layer"):
        hidden_state_mse(s, t[:1], mask)


def test_margins_spread_around_the_inference_margin():
    from mlx_baldwhisper.training.audio_context import AudioContextConfig

    assert AudioContextConfig(margin=64, jitter=64, variants=3).margins() == [0, 64, 128]
    assert AudioContextConfig(margin=16, jitter=64, variants=5).margins() == [0, 16, 48, 80]
    assert AudioContextConfig(margin=32, variants=1).margins() == [32]


def _teach(corpus, tmp_path, name: str, train_encoder: bool, lr: float, steps: int):
    """The stage on the tiny corpus model (margin 16 ± 16, batch 4); its training records."""
    import json

    from mlx_baldwhisper import load_model
    from mlx_baldwhisper.training.audio_context import (AudioContextConfig, frozen_copy,
                                                        teach_audio_context)
    from mlx_baldwhisper.training.common import load_data
    from mlx_baldwhisper.training.trainer import TrainConfig

    model = load_model(str(corpus / "start"))
    data = load_data(model, str(corpus / "train.tsv"), str(corpus / "dev.tsv"), "ha",
                     str(tmp_path / "cache"))
    cfg = AudioContextConfig(margin=16, jitter=16, batch_size=4, eval_limit=2,
                             train_encoder=train_encoder,
                             train=TrainConfig(lr=lr, warmup_steps=0, max_steps=steps, log_every=1,
                                               progress=False, plot=False))
    result = teach_audio_context(model, frozen_copy(model), data, cfg, tmp_path / name)
    assert result.status == "completed"
    rows = map(json.loads, (tmp_path / f"{name}.run" / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("train_encoder", [False, True])
def test_stage_loss_falls_and_the_model_keeps_its_policy(corpus, tmp_path, train_encoder):
    import json

    from mlx_baldwhisper import load_model

    losses = [r["loss"] for r in _teach(corpus, tmp_path, "short", train_encoder, 3e-3, 12)]
    assert losses[-1] < 0.5 * np.mean(losses[:3])  # batches differ: the first three's mean
    saved = json.loads((tmp_path / "short" / "config.json").read_text())
    assert saved["audio_context"] == {"mode": "dynamic", "margin": 16, "block": 16}
    assert saved["training"][-1]["stage"] == "audio-context"
    assert of_model(load_model(str(tmp_path / "short"))).mode == "dynamic"


def test_both_forms_start_from_the_same_loss(corpus, tmp_path):
    """The encoder-training form cuts each clip's mel to its context itself; the cheap form
    reads features the cache encoded over that context. Before any update the two see the
    same student input, so their first losses agree (the cache holds float16)."""
    first = {e: _teach(corpus, tmp_path, f"short-{e}", e, 1e-6, 1)[0] for e in (False, True)}
    for key in ("loss", "kl", "hidden"):
        assert first[True][key] == pytest.approx(first[False][key], rel=2e-2, abs=1e-4), key


def test_stage_command_runs_and_resumes_refusing_changed_settings(corpus):
    from click.testing import CliRunner

    from mlx_baldwhisper.cli import main

    args = ["audio-context", "--model", str(corpus / "start"), "--train", str(corpus / "train.tsv"),
            "--dev", str(corpus / "dev.tsv"), "--language", "ha", "--out", str(corpus / "ctx"),
            "--batch-size", "2", "--eval-limit", "2", "--max-steps", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "model: " in r.output and (corpus / "ctx" / "config.json").exists()
    cfg = corpus / "cfg.json"
    cfg.write_text('{"audio_context": {"margin": 32}}')
    r = CliRunner().invoke(main, args + ["--config", str(cfg), "--max-steps", "3"])
    assert r.exit_code != 0 and "margin: 16" not in r.output and "margin" in r.output


def test_vad_chunks_follow_the_audio_context(monkeypatch):
    model = tiny_model()
    t = np.arange(16000 * 3) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    audio = np.concatenate([tone, np.zeros(16000 * 2, np.float32), tone[:16000 * 2]])
    full = _transcribe(model, audio, chunking="vad")
    seen = _record_positions(model, monkeypatch)
    short = _transcribe(model, audio, chunking="vad", audio_context="dynamic")
    assert seen and max(seen) < 1500
    assert [(s["start"], s["end"]) for s in short["segments"]] == \
        [(s["start"], s["end"]) for s in full["segments"]]


def test_evaluate_encodes_manifest_clips_over_the_short_context(corpus, monkeypatch):
    from mlx_baldwhisper.dataset import read_manifest
    from mlx_baldwhisper.evaluate import evaluate

    model = tiny_model()
    items = read_manifest(str(corpus / "dev.tsv"))  # no durations in the manifest
    seen = _record_positions(model, monkeypatch)
    evaluate(model, items, language="ha", audio_context="dynamic", progress=False,
             options=DecodingOptions(without_timestamps=True, sample_len=4))
    assert seen and max(seen) == AudioContext(mode="dynamic").positions_for(50, 1500) == 96


def test_evaluate_finds_duration_less_clips_in_a_short_context_cache(corpus, monkeypatch, tmp_path):
    from mlx_baldwhisper.dataset import read_manifest
    from mlx_baldwhisper.evaluate import evaluate
    from mlx_baldwhisper.features import FeatureCache, encoder_fingerprint

    model = tiny_model()
    items = read_manifest(str(corpus / "dev.tsv"))  # no durations: the key needs the audio's
    cache = FeatureCache(encoder_fingerprint(model), tmp_path / "cache", context=AudioContext(mode="dynamic"))
    opts = DecodingOptions(without_timestamps=True, sample_len=4)
    first = evaluate(model, items, language="ha", features=cache, progress=False, options=opts)
    seen = _record_positions(model, monkeypatch)
    again = evaluate(model, items, language="ha", features=cache, progress=False, options=opts)
    assert not seen  # every clip came from the cache, none was encoded again
    assert [r["hypothesis"] for r in again["rows"]] == [r["hypothesis"] for r in first["rows"]]


def test_training_batch_of_short_contexts_is_masked_like_each_clip_alone():
    """A training batch carries its clips' positions as a numpy array (Batcher); the loss
    on the padded batch equals the token-weighted loss of each clip on its own features."""
    from mlx_baldwhisper.features import pad_stack
    from mlx_baldwhisper.training.common import ce_loss

    model = tiny_model()
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 32)).astype(np.float32) for n in (48, 96)]
    tokens = rng.integers(0, 50000, size=(2, 6)).astype(np.int32)
    mask = np.ones((2, 5), np.float32)
    stacked, lengths = pad_stack(feats)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "features": stacked,
             "audio_lengths": np.array(lengths, np.int32)}
    together = ce_loss(model, batch)[0].item()
    alone = [ce_loss(model, {"inputs": tokens[i:i + 1, :-1], "targets": tokens[i:i + 1, 1:],
                             "mask": mask[i:i + 1], "features": feats[i][None]})[0].item()
             for i in range(2)]
    assert together == pytest.approx(sum(alone) / 2, rel=1e-4)
