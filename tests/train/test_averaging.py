"""train.weight_average (llmlab/train/averaging.py): the run ends with an EMA or SWA of its weights.

The twin is `torch.optim.swa_utils.AveragedModel(use_buffers=True)`, fed by a callback with the model after
the optimizer steps the test lists by hand (not computed by the code under test): the Trainer's final model
must equal the twin's average. Both fold the same float32 tensors with the same `lerp`, so the comparison is
exact; a wrong step (one too early or late), a wrong weight (1/n instead of 1/(n+1)) or a skipped buffer moves
the average by far more than one float32 rounding. The model's validation metrics are then those of the
averaged weights, the test split is evaluated on them, a resumed run averages exactly as an uninterrupted one,
and under FSDP2 on 2 processes the average matches 1 process.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from llmlab.data.loader import TensorLoader
from llmlab.runner import run
from llmlab.train.averaging import WeightAverage, first_update_step
from llmlab.train.callbacks import Callback
from llmlab.train.checkpoint import CheckpointError, load_checkpoint, load_weights
from llmlab.train.config import OptimConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import ClassificationTask
from llmlab.train.trainer import evaluate
from tests.runs import gpt_smoke_one_and_fsdp2, relative_diff
from tests.train.noisy import noisy_classes, noisy_trainer


class Net(nn.Module):
    """A 2-layer MLP with dropout and a floating buffer that training updates (the running mean of its input,
    like a BatchNorm's statistics), so the average must cover buffers too."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(12, 16), nn.Linear(16, 3), nn.Dropout(dropout)
        self.register_buffer("input_mean", torch.zeros(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 12] → logits [B, 3]
        if self.training:
            with torch.no_grad():
                self.input_mean.lerp_(x.mean(0), 0.1)  # [12]
        return self.fc2(self.drop(torch.relu(self.fc1(x - self.input_mean))))


# Both averages are sums of the same float32 tensors (|w| < 3): the EMA uses the same lerp as torch's (exact);
# torch's CPU SWA computes a + (b - a) / (n + 1) where we lerp, a few float32 roundings (~2e-7 each) apart. A
# step too early or late, or 1/n for 1/(n + 1), moves the average by > 1e-3 here.
ATOL = 1e-6


class Twin(Callback):
    """AveragedModel updated with the Trainer's model after each listed step."""

    def __init__(self, model: nn.Module, kind: str, decay: float, steps: list[int]) -> None:
        multi = get_ema_multi_avg_fn(decay) if kind == "ema" else None  # None: equal weights (SWA)
        self.avg = AveragedModel(model, multi_avg_fn=multi, use_buffers=True)
        self.steps = set(steps)

    def on_step_end(self, trainer, loss) -> None:
        if trainer.step in self.steps:
            self.avg.update_parameters(trainer.raw_model)


def make_trainer(tmp_path=None, dropout=0.0, callbacks=(), model=None, **train):
    """32 steps of SGD at a high rate (4 epochs of 8 batches): the weights still move a lot between steps."""
    torch.manual_seed(0)
    model = model if model is not None else Net(dropout)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.3, momentum=0.9))
    defaults = dict(batch_size=16, max_epochs=4, log_every=4, precision="fp32", eval_every=8)
    cfg = TrainConfig(**{**defaults, "checkpoint_every": 4, "keep_checkpoints": 100, **train})
    return noisy_trainer(model, opt, cfg, tmp_path / "ckpt" if tmp_path else None, callbacks)


@pytest.mark.parametrize(
    ("kind", "decay", "start", "every", "steps"),
    [
        ("ema", 0.8, 0.3, 2, list(range(10, 33, 2))),  # ceil(0.3 · 32) = 10, then every 2nd step
        ("swa", 0.999, 0.5, 3, list(range(16, 33, 3))),  # 16, 19, ..., 31 (decay unused)
        ("ema", 0.9, 0.0, 1, list(range(1, 33))),  # from the first step
    ],
)
def test_the_final_model_is_the_average_of_torchs_averaged_model(tmp_path, kind, decay, start, every, steps):
    torch.manual_seed(0)
    model = Net()
    twin = Twin(model, kind, decay, steps)
    trainer = make_trainer(tmp_path, model=model, callbacks=[twin], weight_average=kind, ema_decay=decay,
                           average_start=start, average_every=every)  # fmt: skip
    metrics = trainer.fit()
    assert trainer.step == 32 and metrics["average/n"] == len(steps) == int(twin.avg.n_averaged)
    assert metrics["average/first_step"] == steps[0]
    final = trainer.raw_model.state_dict()
    expected = twin.avg.module.state_dict()
    assert final.keys() == expected.keys()
    for k in final:  # ema: the same lerp, bit for bit; swa on CPU: torch computes a + (b - a) / (n + 1)
        torch.testing.assert_close(final[k], expected[k], rtol=0, atol=ATOL, msg=k)
    # ... not the last step's weights, which the last checkpoint still holds (--resume has nothing to do)
    last, _ = load_checkpoint(tmp_path / "ckpt" / "step_00000032")
    assert relative_diff(last, final) > 1e-3
    # The validation and test metrics are the averaged model's.
    for split, seed in (("val", 1), ("test", 2)):
        loader = TensorLoader(noisy_classes(96, seed=seed), 32)
        ref = evaluate(trainer.raw_model, ClassificationTask(), loader, "cpu")
        assert metrics[f"{split}/accuracy"] == ref["accuracy"] and metrics[f"{split}/loss"] == ref["loss"]


def test_integer_buffers_take_the_last_value_and_floats_stay_float32():
    avg = WeightAverage("swa", 0.0, start_step=1, every=1)
    for i in range(3):
        avg.update({"w": torch.full((2,), float(i), dtype=torch.bfloat16), "count": torch.tensor(i)})
    assert avg.weights["w"].dtype == torch.float32 and torch.equal(avg.weights["w"], torch.ones(2))
    assert avg.weights["count"].item() == 2 and avg.n == 3
    assert [first_update_step(start, 32) for start in (0.0, 0.3, 0.5)] == [1, 10, 16]


def test_a_resumed_run_averages_as_an_uninterrupted_one(tmp_path):
    train = dict(dropout=0.2, weight_average="ema", ema_decay=0.7, average_start=0.25, checkpoint_every=3)
    straight = make_trainer(tmp_path / "a", **train)
    expected = straight.fit()

    class StopAt(Callback):
        def on_step_end(self, trainer, loss):
            if trainer.step == 20:  # after the checkpoint of step 18, inside the averaged stretch (8 → 32)
                raise KeyboardInterrupt

    first = make_trainer(tmp_path / "b", callbacks=[StopAt()], **train)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    torch.manual_seed(1234)  # the resumed process's RNG: the checkpoint restores it
    resumed = make_trainer(tmp_path / "b", **train)
    assert resumed.fit(resume=True) == expected
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_other_settings_is_a_clear_error(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, trainer, loss):
            if trainer.step == 13:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, callbacks=[StopAt()], weight_average="ema", ema_decay=0.9).fit()
    with pytest.raises(CheckpointError, match=r"average was made with .*'ema', 0.9, 1, 1.*resume with"):
        make_trainer(tmp_path, weight_average="ema", ema_decay=0.99).fit(resume=True)
    # A checkpoint without an average, from a step past where this run starts averaging: cannot be rebuilt.
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "plain", callbacks=[StopAt()]).fit()
    with pytest.raises(CheckpointError, match=r"step 12\) was written without train.weight_average"):
        make_trainer(tmp_path / "plain", weight_average="swa", average_start=0.25).fit(resume=True)
    # ... but from before that step, the average simply starts later, as it would have.
    make_trainer(tmp_path / "plain", weight_average="swa", average_start=0.5).fit(resume=True)


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"weight_average": "polyak"}, "none, ema or swa"),
        ({"weight_average": "ema", "ema_decay": 1.0}, r"ema_decay=1.0: must be in \(0, 1\)"),
        ({"average_start": 1.0}, r"average_start=1.0: a fraction"),
        ({"average_every": 0}, "average_every=0: must be >= 1"),
        ({"weight_average": "swa", "best_metric": "val/accuracy"}, "choose one way to pick the final"),
    ],
)
def test_bad_settings_are_refused_by_the_config(train, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**train)


def test_a_recipe_run_saves_and_reports_the_averaged_model(tmp_path):
    """Through `llmlab run`: the saved model is the average; result.json and the report say so."""
    out = tmp_path / "run"
    args = ["train.weight_average=swa", "train.average_start=0.5", "baseline=false"]
    result = run("imdb-lstm", "smoke", args, out=out, device="cpu")
    steps = result["steps"]
    first = first_update_step(0.5, steps)
    assert result["metrics"]["average/n"] == steps - first + 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    averaged = [r for r in rows if r.get("weights") == "swa average"]
    assert [r["split"] for r in averaged] == ["val"] and averaged[0]["step"] == steps
    assert result["metrics"]["val/accuracy"] == averaged[0]["accuracy"]
    saved = load_weights(out / "model.safetensors")
    last, _ = load_checkpoint(out / "checkpoints" / f"step_{steps:08d}")
    assert relative_diff(last, saved) > 1e-4  # the last step's weights are in the checkpoint, not the model
    report = (out / "report.md").read_text()
    n = steps - first + 1
    assert f"The final model is the mean of the weights of {n} steps from step {first} on" in report


@pytest.mark.slow
def test_fsdp2_on_two_processes_averages_as_one_process(tmp_path):
    """The averages are built from the gathered full weights and put back into the shards: the 2-process FSDP2
    run ends with the same model as the 1-process run (float32 sums in another order: 1e-5 as in
    test_strategies.py)."""
    args = ["train.max_steps=12", "train.eval_every=6", "train.log_every=4", "optim.lr=1e-3"]
    args += ["train.weight_average=ema", "train.ema_decay=0.5", "train.average_start=0.5"]
    one, two, a, b, last = gpt_smoke_one_and_fsdp2(tmp_path, args)
    assert one["metrics"]["average/n"] == two["metrics"]["average/n"] == 7  # steps 6 to 12
    assert relative_diff(a, b) < 1e-5
    assert relative_diff(last, b) > 1e-4  # the last weights are not what was saved
