"""llmlab.parallel's tensor parallelism on 2 and 4 gloo processes, against the single-device model.

Each worker builds the same float64 GPT (seeded alike), turns its copy into its tensor-parallel part
(`parallelize_gpt`), and checks, on its rank:

- the four collectives do what their names say, forward and backward (rank-dependent inputs and upstream
  gradients, so a swapped pair or a missing reduction gives a wrong number, not a lucky one);
- every sharded parameter is the slice of the whole one; `gather_state_dict` gives back the whole state dict
  bit for bit, and `load_full_state_dict` of scrambled weights gathers back to them;
- the logits of all ranks' vocabulary slices, concatenated, are the single-device logits (the padding columns
  −inf), the vocabulary-parallel loss is the whole cross-entropy, and every parameter's gradient, gathered,
  is the single-device gradient.

The vocabulary (61) is padded to 128: under 2 ranks rank 1 holds only ids 64-127, padding; under 4, ranks 2
and 3 hold nothing but padding and rank 1 a mix — the cases where −inf · 0 would turn the loss into NaN.

Tolerance: in float64 the TP model differs from the single-device one only by the order of the partial sums
that the all-reduces add (each row-parallel product is split into p partial dot products); measured
max errors are <= 1e-16 on logits and gradients (2 and 4 ranks), so atol 1e-12 leaves four orders of
margin, while a missing f in backward (the sum over ranks of dL/dx) or a missing g in forward changes
results by the size of the values themselves (> 1e-3 here).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from llmlab.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow

CFG = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=16)
PAD = 128
ATOL = 1e-12


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).double()
    with torch.no_grad():  # LayerNorm scales and biases away from 1 and 0, so their gradients are general
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, CFG["vocab_size"], (3, 11), generator=g)
    return rows[:, :-1], rows[:, 1:]


def _collectives(tp) -> dict[str, float]:
    """Max error of each collective against what it should compute on this rank."""
    from llmlab.parallel.collectives import (
        copy_to_tp_region,
        gather_from_tp_region,
        reduce_from_tp_region,
        scatter_to_tp_region,
    )

    r, p = tp.rank, tp.size
    errs = {}
    w = [torch.arange(8, dtype=torch.float64) + 10 * k for k in range(p)]  # rank k's upstream gradient
    x = torch.linspace(-1, 1, 8, dtype=torch.float64, requires_grad=True)
    y = copy_to_tp_region(x, tp)  # f: identity forward, sum of the ranks' gradients backward
    y.backward(w[r])
    errs["f_forward"] = (y - x).abs().max().item()
    errs["f_backward"] = (x.grad - sum(w)).abs().max().item()

    xr = (torch.arange(8, dtype=torch.float64) * (r + 1)).requires_grad_()  # rank-dependent partial sums
    y = reduce_from_tp_region(xr, tp)  # g: sum forward, identity backward
    y.backward(w[r])
    errs["g_forward"] = (
        (y - sum(torch.arange(8.0, dtype=torch.float64) * (k + 1) for k in range(p))).abs().max().item()
    )
    errs["g_backward"] = (xr.grad - w[r]).abs().max().item()

    x = torch.arange(4.0 * p, dtype=torch.float64).reshape(1, 4 * p).requires_grad_()
    y = scatter_to_tp_region(x, tp)  # this rank's slice; backward gathers the slices' gradients
    y.backward(torch.full_like(y, float(r + 1)))
    errs["split_forward"] = (y - x[:, 4 * r : 4 * r + 4]).abs().max().item()
    want = torch.cat([torch.full((1, 4), float(k + 1), dtype=torch.float64) for k in range(p)], dim=1)
    errs["split_backward"] = (x.grad - want).abs().max().item()

    xr = torch.full((2, 3), float(r), dtype=torch.float64, requires_grad=True)
    y = gather_from_tp_region(xr, tp)  # all slices; backward keeps this rank's slice of the gradient
    up = torch.arange(6.0 * p, dtype=torch.float64).reshape(2, 3 * p)
    y.backward(up)
    want = torch.cat([torch.full((2, 3), float(k), dtype=torch.float64) for k in range(p)], dim=1)
    errs["gather_forward"] = (y - want).abs().max().item()
    errs["gather_backward"] = (xr.grad - up[:, 3 * r : 3 * r + 3]).abs().max().item()
    return errs


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from llmlab.parallel.collectives import TPGroup
    from llmlab.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
    from llmlab.parallel.tp_gpt import canonical, gather_state_dict, load_full_state_dict, parallelize_gpt

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    tp = TPGroup(dist.group.WORLD, rank, world)
    report: dict = {"collectives": _collectives(tp)}

    full = _model()
    part = parallelize_gpt(copy.deepcopy(full), tp, pad_vocab_multiple=PAD)
    params = dict(part.named_parameters(remove_duplicate=False))
    # shards are slices of the whole weights (the vocabulary padded with zero rows)
    slices = {}
    for name, p in params.items():
        whole = full.state_dict()[name]
        if name.endswith("wte.weight") or name == "lm_head.weight":
            whole = torch.cat([whole, whole.new_zeros(PAD - CFG["vocab_size"], CFG["n_embd"])])
        dim = getattr(p, "partition_dim", None)
        want = whole if dim is None else whole.chunk(world, dim=dim)[rank]
        slices[name] = (tuple(p.shape), bool(torch.equal(p.detach(), want)))
    report["slices"] = slices
    gathered = gather_state_dict(part)
    report["gather_exact"] = {k: bool(torch.equal(v, full.state_dict()[k])) for k, v in gathered.items()}

    x, y = _batch()
    logits = part(x)  # [B, T, V_pad/p]
    pieces = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(pieces, logits.detach().contiguous())
    whole_logits = torch.cat(pieces, dim=-1)  # [B, T, V_pad]
    ref_logits = full(x)  # [B, T, V]
    report["logits_err"] = (whole_logits[..., : CFG["vocab_size"]] - ref_logits).abs().max().item()
    report["padding_is_neg_inf"] = bool(torch.isneginf(whole_logits[..., CFG["vocab_size"] :]).all())
    loss = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), tp).mean()
    ref = F.cross_entropy(ref_logits.reshape(-1, CFG["vocab_size"]), y.reshape(-1))
    report["loss"] = (loss.item(), ref.item())
    report["argmax_equal"] = bool(torch.equal(vocab_parallel_argmax(logits, tp), ref_logits.argmax(-1)))
    loss.backward()
    ref.backward()
    ref_grads = {n: p.grad for n, p in full.named_parameters(remove_duplicate=False)}
    report["grad_err"] = {
        n: (canonical(p.grad, p, tp) - ref_grads[n]).abs().max().item()
        for n, p in params.items()
        if n != "lm_head.weight"  # the same tensor as wte
    }
    report["grad_norm"] = {n: g.abs().max().item() for n, g in ref_grads.items()}

    # re-shard scrambled whole weights, gather them back
    g = torch.Generator().manual_seed(7)
    scrambled = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in full.state_dict().items()}
    scrambled["lm_head.weight"] = scrambled["transformer.wte.weight"]
    load_full_state_dict(part, scrambled)
    back = gather_state_dict(part)
    report["reshard_exact"] = all(torch.equal(back[k], scrambled[k]) for k in scrambled)
    torch.save(report, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def reports(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"tp{world}")
    out = str(tmp / "report")
    mp.spawn(_worker, args=(world, f"file://{tmp}/store", out), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def test_collectives_forward_and_backward(reports):
    for rank, rep in enumerate(reports):
        for name, err in rep["collectives"].items():
            assert err == 0.0, (rank, name, err)  # exact: small integers and sums of them


def test_shards_are_slices_and_gather_back_exactly(reports):
    world = len(reports)
    for rank, rep in enumerate(reports):
        for name, (shape, equal) in rep["slices"].items():
            assert equal, (rank, name, shape)
        assert all(rep["gather_exact"].values()), (rank, rep["gather_exact"])
        assert rep["reshard_exact"], rank
        # really split: the first block's MLP input matrix holds 4d/p rows here
        assert rep["slices"]["transformer.h.0.mlp.c_fc.weight"][0] == (
            4 * CFG["n_embd"] // world,
            CFG["n_embd"],
        )
        assert rep["slices"]["transformer.h.0.attn.out_proj.weight"][0] == (
            CFG["n_embd"],
            CFG["n_embd"] // world,
        )


def test_logits_loss_and_every_gradient_equal_the_single_device_model(reports):
    for rank, rep in enumerate(reports):
        assert rep["logits_err"] < ATOL, (rank, rep["logits_err"])
        assert rep["padding_is_neg_inf"], rank
        ours, ref = rep["loss"]
        assert abs(ours - ref) < ATOL, (rank, ours, ref)
        assert rep["argmax_equal"], rank
        for name, err in rep["grad_err"].items():
            assert err < ATOL, (rank, name, err)
            if not name.endswith("k_proj.bias"):  # zero in exact arithmetic: softmax ignores a shift of
                assert rep["grad_norm"][name] > 1e-6, name  # every key by the same q·b; the others are there


def test_padded_vocabulary_size():
    from llmlab.parallel.tp_gpt import padded_vocab_size

    assert padded_vocab_size(50257, 128) == 50304  # GPT-2's vocabulary, as nanoGPT pads it
    assert padded_vocab_size(128, 128) == 128
    assert padded_vocab_size(1, 128) == 128


def test_parallelize_refuses_what_does_not_split():
    from llmlab.parallel.collectives import TPGroup
    from llmlab.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from llmlab.parallel.tp_gpt import parallelize_gpt

    fake = TPGroup(group=object(), rank=0, size=3)  # no collective runs: the checks come first
    with pytest.raises(ValueError, match="divisible"):
        parallelize_gpt(_model(), fake)
    with pytest.raises(ValueError, match="out_features=8"):
        ColumnParallelLinear(4, 8, fake)
    with pytest.raises(ValueError, match="in_features=8"):
        RowParallelLinear(8, 4, fake)
    with pytest.raises(ValueError, match="num_embeddings=10"):
        VocabParallelEmbedding(10, 4, fake)
    dropout = GPT(GPTConfig(**CFG, dropout=0.1))
    with pytest.raises(ValueError, match="dropout"):
        parallelize_gpt(dropout, TPGroup(group=object(), rank=0, size=2))
    with pytest.raises(ValueError, match="needs its process group"):
        TPGroup(group=None, rank=0, size=2)
