"""llmlab.parallel.zero on 2 and 4 gloo processes: ZeRO stages 1, 2 and 3 take the steps of plain AdamW on one
process and one global batch, and each rank holds the bytes the ZeRO paper's accounting says.

The model is a tiny GPT-2 in float64 (n_embd 10, so the 610-element embedding does not split evenly in 4:
chunks of 153, the last rank owning 151). Every rank takes an equal slice of the global batch, so the mean of
the ranks' mean losses is the global mean. Each step clips the gradient norm at 0.4 (the raw norms are
0.34-0.72: clipped on two steps, not on the other two) and uses two parameter groups (weight decay on
matrices only), so the sharded clipping and the group options are checked too.

Tolerance: the ranks' gradients differ from the single-process one only by the order of float64 sums; after 4
AdamW steps (lr 1e-2) the weights agree to 9e-15 and the Adam moments to 3e-17 (measured, 4 ranks, stage 2),
so atol 1e-10 leaves four orders of margin, while the steps move every matrix by > 1e-3 (the guard test): a
chunk never stepped, or stepped at another rank's offset, fails. A missing average over ranks is caught by
the recorded global gradient norm (N times too large), which Adam's scale-invariant step would hide.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmlab.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow

CFG = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=10)
STEPS, BATCH, SEQ, LR, CLIP = 4, 8, 12, 1e-2, 0.4


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG)).double()


def _groups(model: GPT) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _loss(model: GPT, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])  # [b, T, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def _reference() -> tuple[dict[str, torch.Tensor], list[float], dict]:
    model = _model()
    opt = torch.optim.AdamW(_groups(model), lr=LR)
    norms = []
    for rows in _batches():
        opt.zero_grad()
        _loss(model, rows).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, opt.state_dict()


def _worker(rank: int, world: int, stage: int, accum: int, init: str, out: str) -> None:
    from llmlab.parallel.zero import ZeRO

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    zero = ZeRO(model, stage, _groups(model), torch.optim.AdamW, units=model.transformer.h, lr=LR)
    elem = 8  # float64
    numel = [s.numel for s in zero.sharded]
    owned = [s.owned for s in zero.sharded]
    report: dict = {"norms": [], "bytes": []}
    per = BATCH // world
    for rows in _batches():
        mine = rows[rank * per : (rank + 1) * per]  # [b, T+1] this rank's slice
        for micro in mine.chunk(accum):
            (_loss(model, micro) / accum).backward()
        after_backward = zero.state_bytes()
        report["norms"].append(zero.step(max_norm=CLIP))
        after_step = zero.state_bytes()
        zero.zero_grad()
        report["bytes"].append((after_backward, after_step))
    report["expected"] = {
        "grads": elem * (sum(numel) if stage == 1 else sum(owned)),
        "optimizer": elem * 2 * sum(owned),  # exp_avg and exp_avg_sq of the chunk
        "params": elem * (sum(owned) if stage == 3 else sum(numel)),
        "full": elem * sum(numel),
    }
    report["collectives"] = zero.collectives
    state = zero.full_state_dict()
    optim = zero.full_optimizer_state_dict()  # every rank takes part in the gathers
    if rank == 0:
        torch.save({"state": state, "optim": optim, "report": report}, out)
    else:
        torch.save({"report": report}, out + f".{rank}")
    dist.destroy_process_group()


def _run(tmp_path, world: int, stage: int, accum: int = 1) -> tuple[dict, dict, list[dict]]:
    out = str(tmp_path / f"zero{stage}-{world}.pt")
    init = f"file://{tmp_path}/store-{stage}-{world}-{accum}"
    mp.spawn(_worker, args=(world, stage, accum, init, out), nprocs=world, join=True)
    first = torch.load(out, weights_only=False)
    rest = [torch.load(out + f".{r}", weights_only=False)["report"] for r in range(1, world)]
    return first["state"], first["optim"], [first["report"], *rest]


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize(
    ("world", "stage", "accum"), [(2, 1, 1), (2, 2, 2), (2, 3, 1), (4, 1, 1), (4, 2, 1), (4, 3, 2)]
)
def test_zero_equals_single_process_adamw_and_holds_its_share(tmp_path, reference, world, stage, accum):
    want, norms, want_optim = reference
    got, optim, reports = _run(tmp_path, world, stage, accum)
    assert set(got) == set(want) | {"lm_head.weight"}  # the tied head under its own name too
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-10, msg=name)
    # The gathered optimizer state is plain AdamW's own state_dict: same indices, shapes and values.
    assert optim["state"].keys() == want_optim["state"].keys()
    for idx, entry in want_optim["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(
                optim["state"][idx][key], value, rtol=0, atol=1e-10, msg=f"{idx} {key}"
            )
    for rep in reports:
        assert rep["norms"] == pytest.approx(norms, rel=1e-12)  # the clipped global norm, every rank
        exp = rep["expected"]
        for after_backward, after_step in rep["bytes"]:
            assert after_backward.grads == exp["grads"]  # stage 1 full, 2-3 one chunk
            assert after_step.optimizer == exp["optimizer"]  # 1/N of Adam's two moments
            assert after_step.params == exp["params"]  # stage 3: only the chunk between steps
            if stage == 3:  # during backward the root is gathered, the blocks released again
                assert exp["params"] < after_backward.params < exp["full"] + exp["params"]
    full = reports[0]["expected"]["full"]
    assert sum(rep["expected"]["optimizer"] for rep in reports) == 2 * full  # every element owned once


def test_guard_the_comparison_can_fail(reference):
    """Guard: the steps move every weight matrix by far more than the tolerance (an optimizer that skipped
    the step, or stepped another rank's chunk, fails), and the clipping is active on some steps and not on
    others. A missing average over
    ranks (the sum of N gradients) would hardly move Adam's weights — m/√v does not see a constant scale —
    which is why each rank's recorded global norm is compared too: it would be N times too large."""
    want, norms, _ = reference
    start = dict(_model().named_parameters())
    moved = min((want[n] - p.detach()).abs().max().item() for n, p in start.items() if p.dim() >= 2)
    assert moved > 1e-3
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms)
    assert list(dict(_model().named_parameters())) == list(want)


def test_bad_stage_and_no_group_are_clear_errors():
    from llmlab.parallel.zero import ZeRO

    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        ZeRO(_model(), 4)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            ZeRO(_model(), 2)
