"""llmlab.nn.sampling: generation on the KV cache == re-running the whole sequence each step (greedy and
sampled, same seed), and == HF transformers' `generate` on the same weights — greedy, and sampled with
temperature, top-k, top-p and the repetition penalty from the same torch RNG state (the same processing
order and arithmetic, so the same tokens)."""

from __future__ import annotations

import pytest
import torch

from llmlab.models.gpt import GPT, GPTConfig, from_hf_state_dict, hf_config
from llmlab.nn.sampling import SampleConfig, generate, process_logits

transformers = pytest.importorskip("transformers")

CFG = GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(CFG).double().eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)  # peakier distributions than the 0.02 init gives: real choices
    return m


def _hf_twin(model: GPT):
    from llmlab.models.gpt import to_hf_state_dict

    cfg = transformers.GPT2Config(**{k: v for k, v in hf_config(model.cfg).items() if k != "architectures"})
    cfg._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    return hf


PROMPT = torch.tensor([[5, 17, 3, 42, 8], [9, 9, 60, 2, 31]])
SETTINGS = [
    SampleConfig(max_new_tokens=20, temperature=0.0),
    SampleConfig(max_new_tokens=20, temperature=0.8),
    SampleConfig(max_new_tokens=20, temperature=1.0, top_k=5),
    SampleConfig(max_new_tokens=20, temperature=1.3, top_p=0.7),
    SampleConfig(max_new_tokens=20, temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.5),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "T0.8", "topk5", "topp0.7", "all+rep1.5"])
def test_cache_equals_recompute(cfg):
    model = _model()
    a = generate(model, PROMPT, cfg, generator=torch.Generator().manual_seed(3), use_cache=True)
    b = generate(model, PROMPT, cfg, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert a.shape == (2, 25) and torch.equal(a, b)


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "T0.8", "topk5", "topp0.7", "all+rep1.5"])
def test_equals_hf_generate(cfg):
    model = _model(1)
    hf = _hf_twin(model)
    torch.manual_seed(11)
    ours = generate(model, PROMPT, cfg)
    torch.manual_seed(11)
    kwargs = dict(do_sample=cfg.temperature > 0, max_new_tokens=cfg.max_new_tokens, pad_token_id=0)
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0)
    if cfg.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = cfg.repetition_penalty
    theirs = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **kwargs)
    assert torch.equal(ours, theirs)


def test_processing_steps():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    seen = torch.tensor([[0, 3]])
    z = process_logits(logits, seen, SampleConfig(repetition_penalty=2.0))
    assert z.tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]  # positive divided, negative multiplied
    z = process_logits(logits, seen, SampleConfig(top_k=2))
    assert torch.isinf(z).tolist() == [[False, False, True, True, True]]
    # top-p 0.5: the most likely token alone holds >= 0.5 of the mass (softmax: 0.57, ...)
    z = process_logits(logits, seen, SampleConfig(top_p=0.5))
    assert torch.isinf(z).tolist() == [[False, True, True, True, True]]
    assert torch.equal(process_logits(logits, seen, SampleConfig(temperature=2.0)), logits / 2)


def test_eos_stops_rows_and_limits_are_checked():
    model = _model()
    eos = int(generate(model, PROMPT, SampleConfig(max_new_tokens=1, temperature=0))[0, -1])  # row 0's first
    out = generate(model, PROMPT, SampleConfig(max_new_tokens=10, temperature=0, eos_id=eos))
    assert out[0, 5] == eos and (out[0, 5:] == eos).all()  # a finished row only repeats EOS
    # Past the context (block 48): the window slides, the same with and without the cache.
    long = SampleConfig(max_new_tokens=60, temperature=0.7)
    a = generate(model, PROMPT, long, generator=torch.Generator().manual_seed(1))
    b = generate(model, PROMPT, long, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert a.shape == (2, 65) and torch.equal(a, b)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SampleConfig(**bad)
    # from_hf_state_dict is what _hf_twin inverts: the twin really has our weights.
    back = from_hf_state_dict(_hf_twin(model).state_dict(), CFG)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
