"""hybrid_engine.benchmarks.ds_generate, bench_rlhf.py's DeepSpeed-without-a-hybrid-engine actor: HF generate's
output in hybrid_engine's GenerationOutput form, its log-probs the actor's own, its mask cut after the first eos."""

import torch
from demo_models import demo_llama, tokenizer

from hybrid_engine.benchmarks import ds_generate


def test_response_mask_keeps_the_first_eos_and_nothing_after():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(ds_generate.response_mask(tokens, eos_token_id=2), expected)


def _engine():
    return ds_generate.HFGenerateEngine(demo_llama(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))


def _prompts(tok):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, len(tok), (3, 5), generator=g), torch.tensor([[0, 1, 1, 1, 1], [1] * 5, [0, 0, 1, 1, 1]])


def test_logprobs_are_the_actors_own_and_stop_at_eos():
    """Greedy, with eos set to a token row 0 emits third: the log-probs equal the engine's training-mode ones
    (fp32, 1e-5), row 0's mask and tokens stop after that eos, and the module trains again afterwards."""
    tok, engine = tokenizer(), _engine()
    ids, mask = _prompts(tok)
    engine.train()
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    first = engine.generate(ids, mask, eos_token_id=len(tok) + 10, **args)  # an id never sampled: no eos
    eos = int(first.sequences[0, ids.shape[1] + 2])
    out = engine.generate(ids, mask, eos_token_id=eos, **args)
    assert engine.module.training
    row0 = out.response_mask[0]
    assert row0[:3].tolist() == [1, 1, 1] and not row0[3:].any()
    assert (out.sequences[0, ids.shape[1] + 3:] == tok.pad_token_id).all()
    engine.eval()
    full_mask = torch.cat([mask, out.response_mask], 1)
    ref = engine.token_logprobs(out.sequences, full_mask, ids.shape[1]).detach()
    keep = out.response_mask.bool()
    torch.testing.assert_close(out.logprobs[keep], ref[keep], rtol=0, atol=1e-5)
    assert not out.logprobs[~keep].any()


def test_sampling_uses_the_temperature_without_top_k():
    """Sampled at temperature 2: the log-probs are log-softmax(logits / 2) of the drawn tokens (no top-k cut),
    so some token outside the 50 most likely ones is drawn among 3 x 24 draws from a near-uniform random model."""
    tok, engine = tokenizer(), _engine()
    ids, mask = _prompts(tok)
    torch.manual_seed(0)
    out = engine.generate(ids, mask, max_new_tokens=24, do_sample=True, temperature=2.0, eos_token_id=len(tok) + 10,
                          pad_token_id=tok.pad_token_id)
    engine.eval()
    full_mask = torch.cat([mask, out.response_mask], 1)
    ref = engine.token_logprobs(out.sequences, full_mask, ids.shape[1], temperature=2.0).detach()
    torch.testing.assert_close(out.logprobs, ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        logits = engine.module(input_ids=out.sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1]
    rank = (logits > logits.gather(-1, out.sequences[:, ids.shape[1]:, None])).sum(-1)
    assert int(rank.max()) >= 50
