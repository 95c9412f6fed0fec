"""The training loop on a tiny random Whisper decoder fed random audio features."""

import mlx_baldwhisper  # noqa: F401  (first: it loads a fast BLAS before mlx.core)
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_baldwhisper.dims import ModelDimensions
from mlx_baldwhisper.model import Whisper
from mlx_baldwhisper.training.checkpoint import latest_checkpoint, load_checkpoint
from mlx_baldwhisper.training.losses import (LearnableTemperature, cross_entropy,
                                             distillation_loss)
from mlx_baldwhisper.training.trainer import (NonFiniteLossError, TrainConfig, Trainer,
                                              build_schedule, plot_metrics)

DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                       n_audio_layer=1, n_vocab=51865, n_text_ctx=448, n_text_state=32,
                       n_text_head=2, n_text_layer=2)
FRAMES = 50  # the decoder accepts any number of audio frames; fewer keeps the test fast


def tiny(seed: int) -> Whisper:
    mx.random.seed(seed)
    m = Whisper(DIMS)
    mx.eval(m.parameters())
    return m


def make_batches(n: int, seed: int = 0, b: int = 2, t: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = rng.integers(0, 1000, size=(b, t + 1))
        mask = np.ones((b, t), np.float32)
        mask[0, -2:] = 0
        out.append({"audio_features": mx.array(rng.normal(size=(b, FRAMES, 32)).astype(np.float32)),
                    "tokens": mx.array(toks[:, :-1]), "targets": mx.array(toks[:, 1:]),
                    "mask": mx.array(mask), "scale": mx.array(1.0)})
    return out


class ListBatcher:
    """Cycles over fixed batches; adds numpy-RNG noise so RNG restore is exercised."""

    def __init__(self, batches, raise_at=None):
        self.batches, self.pos, self.epoch, self.served = batches, 0, 0, 0
        self.raise_at = raise_at

    def __iter__(self):
        while self.pos < len(self.batches):
            if self.served == self.raise_at:
                raise KeyboardInterrupt
            b = dict(self.batches[self.pos])
            noise = np.random.normal(size=b["audio_features"].shape).astype(np.float32)
            b["audio_features"] = b["audio_features"] + 0.1 * mx.array(noise)
            self.pos += 1
            self.served += 1
            yield b
        self.pos, self.epoch = 0, self.epoch + 1

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s):
        self.pos, self.epoch = s["pos"], s["epoch"]


def ce_loss(model, batch):
    logits = model.decoder(batch["tokens"], batch["audio_features"])[0]
    ce = cross_entropy(logits, batch["targets"], batch["mask"]) * batch["scale"]
    return ce, {"ce": ce}


def cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=10, log_every=1, progress=False, plot=False,
                grad_clip=1.0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def weights(m) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(m.parameters())}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def records(path, kind="train"):
    return [json.loads(l) for l in open(path) if json.loads(l)["kind"] == kind]


def test_schedule_warmup_then_decay():
    s = build_schedule(TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="linear"))
    got = [s(mx.array(i)).item() for i in range(15)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4] == pytest.approx(1.0) and got[9] == pytest.approx(0.5) and got[14] == 0
    c = build_schedule(TrainConfig(lr=1.0, max_steps=10, schedule="cosine"))
    assert c(mx.array(0)).item() == 1.0 and c(mx.array(5)).item() == pytest.approx(0.5)


def test_loss_falls_when_overfitting(tmp_path):
    model = tiny(0)
    res = Trainer(model, ce_loss, cfg(max_steps=25, warmup_steps=0), tmp_path).train(
        ListBatcher(make_batches(2)))
    losses = [r["loss"] for r in records(tmp_path / "metrics.jsonl")]
    assert res.status == "completed" and res.step == 25 and len(losses) == 25
    assert losses[-1] < 0.5 * losses[0]
    rec = records(tmp_path / "metrics.jsonl")[-1]
    assert rec["tokens_per_s"] > 0 and rec["items_per_s"] > 0 and "lr" in rec


def _distill_run(out, model, batcher, resume=False, **kw):
    teacher = tiny(99)
    teacher.freeze()
    temp = LearnableTemperature(init=2.0)

    def loss_fn(m, batch):
        s = m.decoder(batch["tokens"], batch["audio_features"])[0]
        t = teacher.decoder(batch["tokens"], batch["audio_features"])[0]
        return distillation_loss(s, t, batch["targets"], batch["mask"], temp(), 1.0, 0.5)

    tr = Trainer(model, loss_fn, cfg(grad_accum=2, **kw), out,
                 trainable_filter=["decoder."], extra_modules={"temperature": temp})
    return tr.train(batcher, resume=resume), temp


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    ref_model = tiny(0)
    ref, ref_temp = _distill_run(tmp_path / "a", ref_model, ListBatcher(make_batches(3)))
    assert ref.status == "completed"

    # interrupted in the middle of step 6 (one of its two micro-batches already drawn)
    first, _ = _distill_run(tmp_path / "b", tiny(0), ListBatcher(make_batches(3), raise_at=11))
    assert first.status == "interrupted" and first.step == 5

    fresh = tiny(1)  # different init: everything must come from the checkpoint
    np.random.seed(123)  # and so must the RNG state
    res, temp = _distill_run(tmp_path / "b", fresh, ListBatcher(make_batches(3)), resume=True)
    assert res.status == "completed" and res.step == 10
    assert same(weights(fresh), weights(ref_model))
    assert temp.log_temperature.item() == ref_temp.log_temperature.item() != np.log(2.0)
    # the frozen encoder is the checkpointed initial one, untouched by training
    assert same({k: v for k, v in weights(fresh).items() if k.startswith("encoder")},
                {k: v for k, v in weights(tiny(0)).items() if k.startswith("encoder")})
    steps = [r["step"] for r in records(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 11))


def test_keyboard_interrupt_leaves_loadable_checkpoint(tmp_path):
    model = tiny(0)
    res = Trainer(model, ce_loss, cfg(save_every=2, keep_checkpoints=2), tmp_path).train(
        ListBatcher(make_batches(4), raise_at=3))
    assert res.status == "interrupted" and res.step == 3
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-00000002", "step-00000003"]
    other = tiny(5)
    tr = Trainer(other, ce_loss, cfg(), tmp_path / "unused")
    extra = load_checkpoint(tmp_path, other, tr.optimizer)
    assert extra["step"] == 3 and extra["data"] == {"pos": 3, "epoch": 0}
    assert same(weights(other), weights(model))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    batches = make_batches(8)
    batches[4]["scale"] = mx.array(float("nan"))  # step 5
    model = tiny(0)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5.*step-00000004"):
        Trainer(model, ce_loss, cfg(save_every=2), tmp_path).train(ListBatcher(batches))
    assert all(np.isfinite(v).all() for v in weights(model).values())
    other = tiny(5)
    tr = Trainer(other, ce_loss, cfg(), tmp_path / "unused")
    assert load_checkpoint(tmp_path, other, tr.optimizer)["step"] == 4
    assert same(weights(other), weights(model))  # the bad update was never applied


def test_eval_best_and_early_stop(tmp_path):
    scores = iter([0.5, 0.4, 0.45, 0.41, 0.3])
    res = Trainer(tiny(0), ce_loss, cfg(eval_every=2, patience=2), tmp_path,
                  evaluate_fn=lambda m: {"wer": next(scores)}).train(ListBatcher(make_batches(2)))
    assert res.status == "early_stopped" and res.step == 8 and res.best_metric == 0.4
    assert (tmp_path / "best" / "weights.safetensors").exists()
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 4
    assert [r["eval_wer"] for r in records(tmp_path / "metrics.jsonl", "eval")] == \
        [0.5, 0.4, 0.45, 0.41]


def test_compiled_step_matches_eager(tmp_path):
    a, b = tiny(0), tiny(0)
    Trainer(a, ce_loss, cfg(max_steps=4), tmp_path / "a").train(ListBatcher(make_batches(2)))
    Trainer(b, ce_loss, cfg(max_steps=4, compile=True), tmp_path / "b").train(
        ListBatcher(make_batches(2)))
    wa, wb = weights(a), weights(b)
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_plot_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    Trainer(tiny(0), ce_loss, cfg(max_steps=3, eval_every=1), tmp_path,
            evaluate_fn=lambda m: {"wer": 0.5}).train(ListBatcher(make_batches(2)))
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_finishes_the_step_then_saves(tmp_path):
    """A real SIGINT is deferred to the end of the step, then checkpointed."""
    import os
    import signal

    class SigintBatcher(ListBatcher):
        def __iter__(self):
            for b in super().__iter__():
                if self.served == 4:  # first micro-batch of step 2 (grad_accum=3)
                    os.kill(os.getpid(), signal.SIGINT)
                yield b

    model = tiny(0)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background (CI)
    res = Trainer(model, ce_loss, cfg(grad_accum=3), tmp_path).train(SigintBatcher(make_batches(4)))
    assert res.status == "interrupted" and res.step == 2
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["step"] == 2 and state["extra_state"]["data"] == {"pos": 2, "epoch": 1}
    assert signal.getsignal(signal.SIGINT) == before  # the previous handler is restored
