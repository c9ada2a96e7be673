"""train.best_metric (llmlab/train/best.py): the run ends with the weights of its best evaluation.

The invariant: the final model *is* the checkpoint written at the step whose logged validation value is the
best (bit for bit, so a model from a neighbouring step or a half-restored one fails), its reported validation
metrics are that step's logged ones exactly, and the test split is evaluated on it. Every test picks a case
where the best evaluation is not the last one, so a Trainer that ignored the setting would fail. A resumed run
selects exactly as an uninterrupted one; under FSDP2 on 2 processes the selection matches 1 process.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.config import ConfigError
from llmlab.data.loader import TensorLoader
from llmlab.models.mlp import MLPConfig, build_mlp
from llmlab.runner import run
from llmlab.train.best import BestWeights, metric_mode
from llmlab.train.callbacks import Callback
from llmlab.train.checkpoint import CheckpointError, load_checkpoint, load_weights
from llmlab.train.config import OptimConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import ClassificationTask
from llmlab.train.trainer import evaluate
from tests.runs import gpt_smoke_one_and_fsdp2, relative_diff
from tests.train.noisy import noisy_classes, noisy_trainer


class Evaluations(Callback):
    """The validation values the Trainer logged, by step."""

    def __init__(self) -> None:
        self.val: dict[int, dict] = {}

    def on_log(self, trainer, record) -> None:
        if record["split"] == "val":
            self.val[record["step"]] = record


def make_trainer(tmp_path=None, dropout=0.0, callbacks=(), **train):
    """An MLP on 3 noisy classes, SGD at a high rate: the validation metrics go up and down between the
    evaluations every 2 steps, so the best one falls in the middle of the run."""
    torch.manual_seed(0)
    model = build_mlp(MLPConfig(in_features=12, hidden=16, depth=2, num_classes=3, dropout=dropout))
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.5, momentum=0.9))
    defaults = dict(batch_size=16, max_epochs=4, log_every=4, precision="fp32", eval_every=2)
    cfg = TrainConfig(**{**defaults, "checkpoint_every": 2, "keep_checkpoints": 100, **train})
    return noisy_trainer(model, opt, cfg, tmp_path / "ckpt" if tmp_path else None, callbacks)


def _expected_best(evals: Evaluations, name: str, mode: str) -> int:
    """The first step with the best logged value (a tie keeps the earlier weights)."""
    steps = sorted(evals.val)
    sign = 1 if mode == "max" else -1
    return max(steps, key=lambda s: (sign * evals.val[s][name], -s))


@pytest.mark.parametrize("metric", ["val/accuracy", "val/loss"])
def test_the_final_model_is_the_checkpoint_of_the_best_evaluation(tmp_path, metric):
    evals = Evaluations()
    trainer = make_trainer(tmp_path, callbacks=[evals], best_metric=metric)
    metrics = trainer.fit()
    name, mode = metric.split("/")[1], metric_mode(metric)
    best = _expected_best(evals, name, mode)
    assert best != trainer.step == trainer.total_steps  # the case this test is about: the last is not best
    assert metrics["best/step"] == best and metrics["best/epoch"] == evals.val[best]["epoch"]
    for key in ("loss", "accuracy"):  # the selected step's logged evaluation, not the last one's
        assert metrics[f"val/{key}"] == evals.val[best][key]
    chosen, _ = load_checkpoint(tmp_path / "ckpt" / f"step_{best:08d}")
    final = trainer.raw_model.state_dict()
    assert all(torch.equal(final[k], chosen[k]) for k in chosen)
    kept = load_weights(tmp_path / "ckpt" / "best.safetensors")
    assert all(torch.equal(final[k], v) for k, v in kept.items())
    # the test split was evaluated on the selected weights
    test_loader = TensorLoader(noisy_classes(96, seed=2), 32)
    test = evaluate(trainer.raw_model, ClassificationTask(), test_loader, trainer.device)
    assert metrics["test/accuracy"] == test["accuracy"] and metrics["test/loss"] == test["loss"]
    # the last step's state is still the latest checkpoint: --resume of the finished run has nothing to do
    last, _ = load_checkpoint(tmp_path / "ckpt" / f"step_{trainer.step:08d}")
    assert any(not torch.equal(last[k], chosen[k]) for k in chosen)


def test_without_a_directory_the_best_weights_are_kept_in_memory():
    evals = Evaluations()
    trainer = make_trainer(callbacks=[evals], best_metric="val/accuracy")
    metrics = trainer.fit()
    again = make_trainer(tmp_path=None, max_steps=int(metrics["best/step"]))  # the same run, stopped there
    again.fit()
    final, expected = trainer.raw_model.state_dict(), again.raw_model.state_dict()
    assert metrics["best/step"] != trainer.step
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_a_resumed_run_selects_as_an_uninterrupted_one(tmp_path):
    straight = make_trainer(tmp_path / "a", dropout=0.2, best_metric="val/accuracy", checkpoint_every=3)
    expected = straight.fit()

    class StopAt(Callback):
        def on_step_end(self, trainer, loss):
            if trainer.step == 19:  # after the checkpoint of step 18 and the evaluations up to it
                raise KeyboardInterrupt

    first = make_trainer(tmp_path / "b", dropout=0.2, best_metric="val/accuracy", checkpoint_every=3,
                         callbacks=[StopAt()])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    torch.manual_seed(1234)  # the resumed process's RNG: the checkpoint restores it
    resumed = make_trainer(tmp_path / "b", dropout=0.2, best_metric="val/accuracy", checkpoint_every=3)
    metrics = resumed.fit(resume=True)
    assert metrics == expected
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_best_record_newer_than_the_checkpoint_is_dropped(tmp_path):
    best = BestWeights("val/accuracy", "auto", tmp_path)
    weights = {"w": torch.arange(4.0)}
    best.record(6, 1.5, 0.75, {"val/accuracy": 0.75, "val/loss": 0.5}, weights, write=True)
    best.resume(step=4)  # a checkpoint of step 4: steps 5 and 6 are trained again
    assert best.value is None and best.step is None and best.improves(0.1)
    best.resume(step=6)
    assert (best.step, best.epoch, best.value) == (6, 1.5, 0.75)
    assert best.metrics == {"val/accuracy": 0.75, "val/loss": 0.5} and not best.improves(0.75)
    assert torch.equal(best.weights()["w"], weights["w"])
    other = BestWeights("val/loss", "auto", tmp_path)  # the file selected on another metric is not taken up
    other.resume(step=6)
    assert other.value is None


def test_a_corrupt_best_file_is_a_clear_error_on_resume(tmp_path):
    best = BestWeights("val/accuracy", "auto", tmp_path)
    best.record(2, 0.5, 0.5, {"val/accuracy": 0.5}, {"w": torch.ones(1000)}, write=True)
    data = (tmp_path / "best.safetensors").read_bytes()
    (tmp_path / "best.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="best.safetensors is corrupt or truncated.*delete it"):
        best.resume(step=4)


def test_direction_of_each_metric():
    for name in ("val/loss", "val/ppl", "val/loss_per_char", "dev/nll_loss"):
        assert metric_mode(name) == "min", name
    for name in ("val/accuracy", "val/token_accuracy", "val/bleu"):
        assert metric_mode(name) == "max", name
    assert metric_mode("val/loss", "max") == "max" and metric_mode("val/accuracy", "min") == "min"
    best = BestWeights("val/loss", "auto", None)
    assert best.improves(2.0) and not best.improves(float("nan"))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("test/accuracy", "validation split .* the test split is evaluated once"),
        ("train/loss", "validation split .* training metrics are not evaluations"),
        ("accuracy", "split/name"),
        ("val/", "split/name"),
    ],
)
def test_bad_metric_names_are_refused_by_the_config(value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(best_metric=value)
    with pytest.raises(ValueError, match="auto, max or min"):
        TrainConfig(best_mode="highest")


def test_a_split_or_metric_the_run_does_not_evaluate_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="val2/accuracy: this run evaluates val during training"):
        make_trainer(tmp_path, best_metric="val2/accuracy")
    trainer = make_trainer(tmp_path, best_metric="val/acc")
    with pytest.raises(ConfigError, match="val/acc: the val evaluation reports val/accuracy, val/loss"):
        trainer.fit()
    assert trainer.step == 0 and not (tmp_path / "ckpt").exists()  # nothing trained, nothing written


def test_a_recipe_run_saves_and_reports_the_selected_model(tmp_path):
    """Through `llmlab run`: the saved model.safetensors is best.safetensors; result.json says where it is."""
    out = tmp_path / "run"
    args = ["train.best_metric=val/loss", "train.best_mode=max", "train.eval_every=4", "baseline=false"]
    result = run("imdb-lstm", "smoke", args, out=out, device="cpu")
    # the *largest* validation loss: the first evaluation, so the selected model is not the last one
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}
    worst = max(sorted(val), key=lambda s: (val[s], -s))
    assert result["metrics"]["best/step"] == worst != result["steps"]
    assert result["metrics"]["val/loss"] == val[worst]
    saved = load_weights(out / "model.safetensors")
    best = load_weights(out / "checkpoints" / "best.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    report = (out / "report.md").read_text()
    assert f"The final model is that of step {worst} " in report and "the best `val/loss`" in report


@pytest.mark.slow
def test_fsdp2_on_two_processes_selects_as_one_process(tmp_path):
    """The best weights are gathered from the shards and put back into them: the 2-process FSDP2 run ends with
    the same model as the 1-process run (float32 sums in another order: 1e-5 as in test_strategies.py)."""
    args = ["train.max_steps=12", "train.eval_every=4", "train.log_every=4", "optim.lr=1e-3"]
    args += ["train.best_metric=val/loss", "train.best_mode=max"]  # picks step 4 of 12
    one, two, a, b, last = gpt_smoke_one_and_fsdp2(tmp_path, args)
    assert one["metrics"]["best/step"] == two["metrics"]["best/step"] == 4
    assert relative_diff(a, b) < 1e-5
    assert relative_diff(last, b) > 1e-3  # the last weights are not what was saved
