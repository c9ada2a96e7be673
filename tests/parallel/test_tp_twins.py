"""llmlab.parallel's tensor-parallel layers against their industrial twins, on 2 and 4 gloo processes: weights
scrambled then copied, each tolerance justified.

Twins, with the same full weights (drawn identically on every rank) sharded into both:

  megatron-core 0.16  tensor_parallel.ColumnParallelLinear, RowParallelLinear (skip_bias_add=False),
                      VocabParallelEmbedding and vocab_parallel_cross_entropy, built on CPU
                      (use_cpu_initialization, params_dtype float64) with an `init_method` that writes the
                      full weight into Megatron's master weight, so Megatron cuts its own shard; ours is built
                      with its default (random) initialisation, then `load_full`. Only gather_output=False and
                      input_is_parallel=True: Megatron's all-gather along the last dimension allocates on
                      torch.cuda.current_device(), so its other two modes need a GPU.
  torch DTensor       nn.Linear → GELU → nn.Linear under parallelize_module(ColwiseParallel, RowwiseParallel)
                      on a 1-D CPU DeviceMesh, against our ColumnParallelLinear → GELU → RowParallelLinear
                      built with `from_full`; a second plan (Colwise output_layouts=Replicate, Rowwise
                      input_layouts=Replicate) against our gather_output=True / input_is_parallel=False.
  F.cross_entropy     on the full logits, against our vocab_parallel_cross_entropy on each rank's slice:
                      plain logits, logits shifted by +1000 (exp overflows without the max shift) and
                      logits whose last rank's slice is all -inf (padding columns: losses finite, their
                      gradient exactly 0).

Every check compares the forward output, the input gradient (or the logits' gradient) and each rank's own
weight and bias gradient shards, after a backward of a random upstream gradient (the same on every rank where
the output is replicated; slice r of one full gradient where it is parallel). One spawn per world size runs
all the checks and saves (ours, twin) pairs; the tests compare them.

Tolerances. Float64 layers and the float64 cross-entropy: both sides compute the same sums of at most 32
O(1) products and may differ only in summation order (F.linear's fused addmm against matmul then + bias).
Measured max |ours - twin| on 2 and 4 ranks: Megatron 0 (bitwise, every output and gradient), DTensor 1.8e-15
on outputs of size ~25 and 0 on gradients, F.cross_entropy 8.9e-16 on losses and 2.2e-16 on gradients.
F64_TOL = 1e-12 leaves over two orders of margin, while the errors to catch are >= 1e-2, most of them O(1):
a wrong shard (another rank's rows or columns), a missing or doubled all-reduce (one rank's term alone, or p
times the sum), a bias added p times, an input gradient not summed over ranks, a target picked at the wrong
offset, an overflow. The guard test checks that every compared tensor has entries > GUARD = 1e-2 (no check
passes as 0 == 0) and that the ranks' shards differ (a rank holding another rank's shard fails). Megatron's
cross-entropy always computes in float32 (it casts the logits), so it is compared with ours in float32:
measured 0 (bitwise); a legitimately different float32 order (a run without the max shift on unshifted logits)
moves losses <= 10 by 4.8e-7 and gradients by 1.2e-7, so F32_TOL = 1e-5 tolerates reordering with twenty-fold
margin and is three orders below the errors to catch. The shards themselves (our `shard` against Megatron's
`_initialize_affine_weight_cpu` and DTensor's `distribute_tensor`) must agree exactly: tolerance 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

pytestmark = pytest.mark.slow

F64_TOL = 1e-12  # see module docstring: float64 summation-order differences measured <= 1.8e-15
F32_TOL = 1e-5  # see module docstring: Megatron's float32 cross-entropy; float32 reordering ~5e-7
GUARD = 1e-2  # every compared quantity has entries at least this large (the errors to catch are >= this)

S, B, D, H, V = 3, 2, 8, 32, 16  # sequence, batch, model width, MLP width (4D), vocabulary; all divide by 4
DT = torch.float64
TARGETS = [0, 5, 9, 14, 3, 12]  # the vocabulary slices of 2 and of 4 ranks each hold some target
MASKED_TARGETS = [0, 5, 3, 7, 1, 6]  # all below V/2: never in the last rank's slice, which is masked


def _randn(*shape: int, seed: int) -> Tensor:
    """Float32 normals widened to float64, the same on every rank: Megatron builds its master weight in
    float32 before casting to params_dtype, so only float32-representable weights pass through it exactly."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DT)


def _slice(t: Tensor, dim: int, rank: int, world: int) -> Tensor:
    return t.chunk(world, dim)[rank].clone()


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _megatron_checks(rank: int, world: int, tp) -> dict[str, tuple[Tensor, Tensor]]:
    """(ours, Megatron's) pairs for the linear layers, the embedding and the cross-entropy."""
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as mtp

    from llmlab.parallel.cross_entropy import vocab_parallel_cross_entropy
    from llmlab.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    ps.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    group = ps.get_tensor_model_parallel_group()
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=world,
        use_cpu_initialization=True,  # weights built on CPU from one full master weight
        perform_initialization=True,  # ... through our init_method, which writes the full weight
        params_dtype=DT,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,  # needs APEX's CUDA extension
    )

    def init(full: Tensor):
        return lambda master: master.copy_(full)  # Megatron then cuts this rank's shard

    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    w1, b1 = _randn(H, D, seed=1), _randn(H, seed=2)  # column layer D -> H
    w2, b2 = _randn(D, H, seed=3), _randn(D, seed=4)  # row layer H -> D
    x = _randn(S, B, D, seed=5)  # Megatron's [s, b, h] layout, replicated
    xh = _randn(S, B, H, seed=6)  # the row layer's full input
    g_h, g_d = _randn(S, B, H, seed=7), _randn(S, B, D, seed=8)  # upstream gradients

    # Only the modes that run on CPU: Megatron's all-gather along the last dimension allocates its buffer on
    # torch.cuda.current_device(), so gather_output=True (forward) and input_is_parallel=False (backward)
    # need a GPU. The DTensor twin below covers those two modes.
    ours = ColumnParallelLinear(D, H, tp).to(DT)  # random init: scrambled
    ours.load_full(w1, b1)
    theirs = mtp.ColumnParallelLinear(D, H, config=cfg, init_method=init(w1), bias=True, tp_group=group)
    with torch.no_grad():
        theirs.bias.copy_(_slice(b1, 0, rank, world))  # Megatron always zeroes the bias
    pairs["col.shard"] = (ours.weight.detach(), theirs.weight.detach())
    x_ours, x_theirs = _leaf(x), _leaf(x)
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)[0]  # Megatron returns (output, bias=None)
    g = _slice(g_h, -1, rank, world)  # the output is this rank's slice: its slice of the full gradient
    y_ours.backward(g)
    y_theirs.backward(g)
    pairs["col.out"] = (y_ours.detach(), y_theirs.detach())
    pairs["col.dx"] = (x_ours.grad, x_theirs.grad)
    pairs["col.dw"] = (ours.weight.grad, theirs.weight.grad)
    pairs["col.db"] = (ours.bias.grad, theirs.bias.grad)

    ours = RowParallelLinear(H, D, tp).to(DT)
    ours.load_full(w2, b2)
    theirs = mtp.RowParallelLinear(
        H,
        D,
        config=cfg,
        init_method=init(w2),
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=group,
    )
    with torch.no_grad():
        theirs.bias.copy_(b2)  # replicated
    pairs["row.shard"] = (ours.weight.detach(), theirs.weight.detach())
    x_ours, x_theirs = _leaf(_slice(xh, -1, rank, world)), _leaf(_slice(xh, -1, rank, world))
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)[0]
    y_ours.backward(g_d)  # the output is replicated: the same gradient on every rank
    y_theirs.backward(g_d)
    pairs["row.out"] = (y_ours.detach(), y_theirs.detach())
    pairs["row.dx"] = (x_ours.grad, x_theirs.grad)
    pairs["row.dw"] = (ours.weight.grad, theirs.weight.grad)
    pairs["row.db"] = (ours.bias.grad, theirs.bias.grad)

    table = _randn(V, D, seed=9)
    ours = VocabParallelEmbedding(V, D, tp).to(DT)
    ours.load_full(table)
    theirs = mtp.VocabParallelEmbedding(V, D, init_method=init(table), config=cfg, tp_group=group)
    pairs["emb.shard"] = (ours.weight.detach(), theirs.weight.detach())
    ids = torch.tensor([[0, 15, 4], [7, 8, 4], [12, 3, 4]])  # [s, b] every slice, 4 three times (grad sums)
    y_ours, y_theirs = ours(ids), theirs(ids)
    g = _randn(*ids.shape, D, seed=10)
    y_ours.backward(g)
    y_theirs.backward(g)
    pairs["emb.out"] = (y_ours.detach(), y_theirs.detach())
    pairs["emb.dw"] = (ours.weight.grad, theirs.weight.grad)

    # Megatron's cross-entropy casts to float32 and subtracts the max in place: it gets its own copy.
    for name, logits, targets in _ce_cases(world):
        local = _slice(logits, -1, rank, world).float()
        t = torch.tensor(targets)
        weights = _randn(len(targets), seed=11).float()  # upstream gradient of the per-row losses
        l_ours, l_theirs = _leaf(local), _leaf(local)
        loss_ours = vocab_parallel_cross_entropy(l_ours, t, tp)
        loss_theirs = mtp.vocab_parallel_cross_entropy(l_theirs.clone(), t)
        loss_ours.backward(weights)
        loss_theirs.backward(weights)
        pairs[f"ce_{name}.loss"] = (loss_ours.detach(), loss_theirs.detach())
        pairs[f"ce_{name}.dlogits"] = (l_ours.grad, l_theirs.grad)

    ps.destroy_model_parallel()
    return pairs


def _dtensor_checks(rank: int, world: int, tp) -> dict[str, tuple[Tensor, Tensor]]:
    """(ours, DTensor's) pairs for a column → GELU → row MLP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from llmlab.parallel.layers import ColumnParallelLinear, RowParallelLinear

    w1, b1 = _randn(H, D, seed=21), _randn(H, seed=22)
    w2, b2 = _randn(D, H, seed=23), _randn(D, seed=24)
    x = _randn(S, B, D, seed=25)
    g = _randn(S, B, D, seed=26)  # the output is replicated: the same gradient on every rank
    mesh = init_device_mesh("cpu", (world,))
    pairs = {}
    for gathered in (False, True):  # the hidden layer kept in slices, or gathered then split again
        name = "mlp_gathered" if gathered else "mlp"
        mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)).to(DT)  # default init: scrambled
        mlp.load_state_dict({"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2})
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        if gathered:
            plan = {
                "0": ColwiseParallel(output_layouts=Replicate()),
                "2": RowwiseParallel(input_layouts=Replicate()),
            }
        parallelize_module(mlp, mesh, plan)
        col = ColumnParallelLinear.from_full(w1, b1, tp, gather_output=gathered)
        row = RowParallelLinear.from_full(w2, b2, tp, input_is_parallel=not gathered)
        x_ours, x_theirs = _leaf(x), _leaf(x)
        y_ours = row(F.gelu(col(x_ours)))
        y_theirs = mlp(x_theirs)  # a plain tensor: RowwiseParallel's use_local_output
        y_ours.backward(g)
        y_theirs.backward(g)
        pairs[f"{name}.out"] = (y_ours.detach(), y_theirs.detach())
        pairs[f"{name}.dx"] = (x_ours.grad, x_theirs.grad)
        pairs[f"{name}.dw1"] = (col.weight.grad, mlp[0].weight.grad.to_local())  # Shard(0): [H/p, D]
        pairs[f"{name}.db1"] = (col.bias.grad, mlp[0].bias.grad.to_local())  # Shard(0): [H/p]
        pairs[f"{name}.dw2"] = (row.weight.grad, mlp[2].weight.grad.to_local())  # Shard(1): [D, H/p]
        pairs[f"{name}.db2"] = (row.bias.grad, mlp[2].bias.grad.to_local())  # Replicate: [D]
        pairs[f"{name}.shard1"] = (col.weight.detach(), mlp[0].weight.to_local().detach())
        pairs[f"{name}.shard2"] = (row.weight.detach(), mlp[2].weight.to_local().detach())
    return pairs


def _ce_cases(world: int) -> list[tuple[str, Tensor, list[int]]]:
    """(name, full logits [N, V] float64, targets): plain, shifted by +1000, last rank's slice all -inf."""
    logits = 3 * _randn(len(TARGETS), V, seed=31)
    masked = logits.clone()
    masked[:, V - V // world :] = float("-inf")  # the padding columns: one whole rank's slice
    return [
        ("plain", logits, TARGETS),
        ("shifted", logits + 1000, TARGETS),
        ("masked", masked, MASKED_TARGETS),
    ]


def _cross_entropy_checks(rank: int, world: int, tp) -> dict[str, tuple[Tensor, Tensor]]:
    """(ours, F.cross_entropy's) pairs in float64: per-row losses and this rank's slice of dL/dlogits."""
    from llmlab.parallel.cross_entropy import vocab_parallel_cross_entropy

    pairs = {}
    for name, logits, targets in _ce_cases(world):
        t = torch.tensor(targets)
        weights = _randn(len(targets), seed=32)
        local, full = _leaf(_slice(logits, -1, rank, world)), _leaf(logits)
        loss_ours = vocab_parallel_cross_entropy(local, t, tp)
        loss_ref = F.cross_entropy(full, t, reduction="none")
        loss_ours.backward(weights)
        loss_ref.backward(weights)
        pairs[f"{name}.loss"] = (loss_ours.detach(), loss_ref.detach())
        pairs[f"{name}.dlogits"] = (local.grad, _slice(full.grad, -1, rank, world))
    return pairs


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from llmlab.parallel.collectives import TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tp = TPGroup(dist.new_group(list(range(world))), rank, world)  # our own group, apart from the twins'
    results = {
        "megatron": _megatron_checks(rank, world, tp),
        "dtensor": _dtensor_checks(rank, world, tp),
        "torch_ce": _cross_entropy_checks(rank, world, tp),
    }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict]:
    """One spawn per world size: each rank's {twin: {check: (ours, twin's)}}."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"tp{world}")
    out = str(tmp / "pairs")
    mp.spawn(_worker, args=(world, f"file://{tmp}/store-{world}", out), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _compare(ranks: list[dict], twin: str, tol_for) -> None:
    for rank, results in enumerate(ranks):
        for name, (ours, theirs) in results[twin].items():
            assert ours is not None and theirs is not None, f"rank {rank} {name}: no gradient"
            assert ours.dtype == theirs.dtype, f"rank {rank} {name}: {ours.dtype} vs {theirs.dtype}"
            tol = tol_for(name)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tol, msg=f"rank {rank} {name}")


def test_megatron_core_twin(ranks):
    """ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding (float64) and
    vocab_parallel_cross_entropy (float32, as Megatron computes it): the shards Megatron cuts from the same
    full weights, outputs, input gradients and each rank's weight and bias gradient shards."""

    def tol(name: str) -> float:
        if name.endswith(".shard"):
            return 0.0  # the same slice of the same numbers: bit for bit
        return F32_TOL if name.startswith("ce_") else F64_TOL

    _compare(ranks, "megatron", tol)
    for results in ranks:  # the layers ran in float64, not silently in float32
        assert results["megatron"]["col.out"][1].dtype == DT and results["megatron"]["emb.dw"][1].dtype == DT


def test_dtensor_twin(ranks):
    """Linear → GELU → Linear under ColwiseParallel / RowwiseParallel against ColumnParallelLinear → GELU →
    RowParallelLinear, with the hidden layer in slices and gathered (gather_output / input_is_parallel=False):
    the shards, output, input gradient, every local weight and bias gradient."""
    _compare(ranks, "dtensor", lambda name: 0.0 if "shard" in name else F64_TOL)


def test_vocab_parallel_cross_entropy_equals_torch(ranks):
    """Per-row losses and each rank's slice of the logits' gradient equal F.cross_entropy on the full logits,
    also with logits at +1000 and with the last rank's whole slice masked to -inf (losses finite, its gradient
    exactly 0)."""
    _compare(ranks, "torch_ce", lambda name: F64_TOL)
    world = len(ranks)
    for results in ranks:
        for name, (ours, _) in results["torch_ce"].items():
            assert torch.isfinite(ours).all(), name
    masked_rank = ranks[world - 1]["torch_ce"]["masked.dlogits"][0]
    assert torch.equal(masked_rank, torch.zeros_like(masked_rank))  # padding columns get no gradient


def test_guard_the_comparisons_can_fail(ranks):
    """Guard: every compared quantity (over all ranks) has entries > GUARD, far above the tolerances, so no
    check passes as 0 == 0; the ranks' shards differ by more than GUARD, so a layer holding another rank's
    shard fails; and the logits shifted by +1000 overflow exp without the max shift."""
    for twin in ("megatron", "dtensor", "torch_ce"):
        for name in ranks[0][twin]:
            biggest = max(results[twin][name][1].abs().max().item() for results in ranks)
            assert biggest > GUARD, f"{twin} {name}: {biggest}"
            if "shard" in name:
                first, second = ranks[0][twin][name][1], ranks[1][twin][name][1]
                assert (first - second).abs().max().item() > GUARD, f"{twin} {name}: ranks 0, 1 alike"
    assert not torch.isfinite(torch.exp(torch.tensor(1000.0, dtype=DT)))
