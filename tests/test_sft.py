"""Step 1, supervised fine-tuning: the response-only loss against a manual reference, the trainer on demo rows
(held-out perplexity, saving, determinism, LoRA), the shared loop pieces and bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from demo_models import demo_llama, demo_rows, tokenizer

from hybrid_engine.engine import HybridEngine
from hybrid_engine.rlhf import SFTConfig, perplexity, sft_loss, train_sft
from hybrid_engine.rlhf.schedule import batch_order, lr_scale
from hybrid_engine.rlhf.sft import response_nll
from hybrid_engine.rlhf.tokens import IGNORE_INDEX, TokenConfig, collate_sft, encode_prompts, tokenize_sft
from hybrid_engine.rlhf.trainer import training_ds_config


@pytest.fixture(scope="module")
def small(cache):
    return demo_rows("sft", 320, 64, cache)


def demo_batch(data, n: int = 6):
    """A collate_sft batch of the first n training rows, its examples and each row's prompt length."""
    rows = data.train.select(range(n))
    examples, _ = tokenize_sft(rows, tokenizer(), TokenConfig())
    prompt_lens = [len(p) for p in encode_prompts(tokenizer(), list(rows["prompt"]))]
    return collate_sft(examples, tokenizer().pad_token_id), examples, prompt_lens


@torch.no_grad()
def test_loss_is_the_mean_nll_of_the_response_tokens_only(small):
    model = demo_llama()
    batch, examples, prompt_lens = demo_batch(small)
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().log_softmax(-1)
    # The reference masks by the prompt lengths of its own tokenization, not by the labels.
    terms = [-logp[b, t - 1, e["input_ids"][t]] for b, (e, P) in enumerate(zip(examples, prompt_lens))
             for t in range(P, len(e["input_ids"]))]
    ref = torch.stack(terms).mean()
    ours = sft_loss(model, batch)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) < 1e-5
    hf = model(**batch).loss  # transformers' own shifted, ignore-index mean
    assert abs(float(ours) - float(hf)) < 1e-5
    nll, count = response_nll(model, batch)
    assert int(count) == len(terms)  # every response token (with its EOS), and no prompt token
    assert float(nll) == pytest.approx(float(ref) * len(terms), rel=1e-5)


def test_predictions_at_prompt_positions_carry_no_loss(small):
    """Whatever the model predicts at a prompt position (all but the prompt's last, which predicts the first
    response token) or at padding, the loss and its gradient stay the same."""
    model = demo_llama()
    batch, _, prompt_lens = demo_batch(small)
    B, T = batch["input_ids"].shape
    scored = torch.zeros(B, T, dtype=torch.bool)  # the positions whose prediction is a response token
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    for b, P in enumerate(prompt_lens):
        assert not scored[b, : P - 1].any() and scored[b, P - 1]

    def loss_with_noise(where: torch.Tensor) -> tuple[float, torch.Tensor]:
        model.zero_grad()

        def hook(module, args):
            (hidden,) = args
            return (hidden + 100 * where[..., None] * torch.randn_like(hidden),)

        handle = model.lm_head.register_forward_pre_hook(hook)
        try:
            loss = sft_loss(model, batch)
            loss.backward()
        finally:
            handle.remove()
        return loss.item(), model.model.embed_tokens.weight.grad.clone()

    clean, clean_grad = loss_with_noise(torch.zeros(B, T, dtype=torch.bool))
    noisy, noisy_grad = loss_with_noise(~scored)
    assert noisy == pytest.approx(clean, abs=1e-6)
    assert torch.allclose(noisy_grad, clean_grad, atol=1e-6)
    last_prompt = torch.zeros(B, T, dtype=torch.bool)
    last_prompt[torch.arange(B), torch.tensor(prompt_lens) - 1] = True
    assert abs(loss_with_noise(last_prompt)[0] - clean) > 1e-3


def test_sft_lowers_held_out_perplexity_and_saves_what_from_pretrained_loads(small, tmp_path):
    out = tmp_path / "sft"
    config = SFTConfig(epochs=2, batch_size=16, lr=3e-3, eval_every=10, seed=0, output_dir=str(out))
    result = train_sft(demo_llama(), tokenizer(), small, config, progress=False)
    assert result.steps == len(result.losses) == 40  # 320 rows / 16, twice
    assert [s for s, _ in result.evals] == [0, 10, 20, 30, 40]
    assert result.eval_perplexity_before > 100  # a random model over 246 tokens
    assert result.eval_perplexity_after < 0.25 * result.eval_perplexity_before
    assert result.evals[-1][1] < result.evals[1][1]
    assert result.train_tokens > 0 and result.tokens_per_s > 0 and result.wall_s >= result.train_s > 0

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.get_vocab() == tokenizer().get_vocab() and reloaded_tok.pad_token_id == 0
    held_out, _ = tokenize_sft(small.eval, reloaded_tok, TokenConfig())
    assert perplexity(reloaded, held_out, reloaded_tok.pad_token_id) == pytest.approx(result.eval_perplexity_after,
                                                                                     rel=1e-5)


def test_a_run_is_determined_by_its_seed(small):
    def run(seed: int) -> list[float]:
        config = SFTConfig(max_steps=3, batch_size=8, lr=1e-3, seed=seed)
        return train_sft(demo_llama(), tokenizer(), small, config, progress=False).losses

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_lora_trains_the_adapters_only_and_saves_the_merged_model(small, tmp_path):
    model = demo_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = SFTConfig(max_steps=4, batch_size=8, lr=1e-2, seed=0, output_dir=str(tmp_path))
    result = train_sft(model, tokenizer(), small, config, lora=lora, progress=False)
    for name, p in result.engine.module.named_parameters():
        if "lora_" not in name:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, base[plain]), name
    assert result.eval_perplexity_after < result.eval_perplexity_before
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    held_out, _ = tokenize_sft(small.eval, tokenizer(), TokenConfig())
    assert perplexity(reloaded, held_out, 0) == pytest.approx(result.eval_perplexity_after, rel=1e-5)


def test_batch_order_is_seeded_and_splits_each_global_batch_across_ranks():
    assert batch_order(10, 4, seed=3, epoch=0) == batch_order(10, 4, seed=3, epoch=0)
    assert batch_order(10, 4, seed=3, epoch=0) != batch_order(10, 4, seed=3, epoch=1)
    one = batch_order(10, 4, seed=3, epoch=0)
    assert [len(b) for b in one] == [4, 4, 2] and sorted(sum(one, [])) == list(range(10))
    ranks = [batch_order(11, 2, seed=3, epoch=0, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # the last global batch of 3 rows: 2 + 1
    seen = sum(ranks[0], []) + sum(ranks[1], [])
    assert sorted(seen) == list(range(11))
    assert [len(b) for b in batch_order(9, 2, seed=0, epoch=0, rank=1, world=4)] == [2]  # 1 row left: dropped


def test_each_steps_learning_rate_is_the_schedules_and_the_optimizers(small):
    engine = HybridEngine(demo_llama(), optimizer=lambda params: torch.optim.AdamW(params, lr=1.0))
    stepped = []
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: stepped.append(opt.param_groups[0]["lr"]))
    config = SFTConfig(max_steps=4, batch_size=8, lr=1e-3, warmup_steps=2, schedule="linear")
    result = train_sft(engine, tokenizer(), small, config, progress=False)
    assert result.lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], rel=1e-12)  # warmup 0/2, 1/2, then 2/2, 1/2
    assert stepped == result.lrs


def hf_learning_rates(schedule: str, total: int, warmup: int, peak: float, **options) -> list[float]:
    """The learning rate of each of `total` steps as transformers' scheduler sets it on a real optimizer, stepped
    once per step: the reference."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=peak)
    scheduler = transformers.get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=options)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule, options", [
    ("linear", {}), ("cosine", {}), ("cosine_with_restarts", {}), ("constant_with_warmup", {}), ("inverse_sqrt", {}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"min_lr_ratio": 0.1, "num_decay_steps": 4})])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedules_are_transformers(schedule, options, warmup):
    total, peak = 11, 3e-4
    ours = [peak * lr_scale(s, total, warmup, schedule, options.get("min_lr_rate", options.get("min_lr_ratio", 0.0)),
                            options.get("num_decay_steps")) for s in reversed(range(total))][::-1]  # any order
    torch.testing.assert_close(ours, hf_learning_rates(schedule, total, warmup, peak, **options), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_a_fractional_warmup_is_transformers_share_of_the_run(ratio):
    """warmup_steps below 1 is a fraction of the run's steps, as transformers 5's TrainingArguments reads it."""
    total, peak = 11, 3e-4
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to="none")
    ours = [peak * lr_scale(s, total, SFTConfig(warmup_steps=ratio).warmup_steps, "cosine") for s in range(total)]
    torch.testing.assert_close(ours, hf_learning_rates("cosine", total, args.get_warmup_steps(total), peak),
                               rtol=1e-12, atol=0)


def test_the_defaults_schedule_is_unchanged():
    """Linear without warmup, the default, as it was before the schedules came from transformers (the README's
    figures depend on it)."""
    assert [lr_scale(s, 3, 0, "linear") for s in range(3)] == [1.0, 2 / 3, 1 / 3]
    assert [lr_scale(s, 6, 0, "constant") for s in range(6)] == [1.0] * 6


@pytest.mark.parametrize("settings, message", [
    ({"schedule": "constant", "warmup_steps": 2}, "use 'constant_with_warmup'"),
    ({"schedule": "warmup_stable_decay"}, "needs decay_steps"),
    ({"schedule": "reduce_lr_on_plateau"}, "schedule must be one of"),
    ({"min_lr_rate": 1.5}, "min_lr_rate must be in"),
    ({"decay_steps": 0}, "decay_steps must be a positive integer"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be a whole number of steps, or a fraction in \[0, 1\)"),
    ({"warmup_steps": -1}, "warmup_steps must be")])
def test_a_schedule_transformers_would_run_otherwise_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SFTConfig(**settings)


def test_the_config_sets_deepspeeds_batch_and_clipping():
    ds = training_ds_config({"zero_optimization": {"stage": 2}}, batch_size=8, max_grad_norm=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_clipping"] == 0.5
    assert training_ds_config(None, 8, 1.0) is None
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        training_ds_config({"train_micro_batch_size_per_gpu": 4}, batch_size=8, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        training_ds_config({"gradient_accumulation_steps": 2}, batch_size=8, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="scheduler"):
        training_ds_config({"scheduler": {"type": "WarmupLR"}}, batch_size=8, max_grad_norm=1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="polynomial"), "schedule"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_steps=0), "max_steps"),
    (dict(lr=0.0), "lr"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(eval_every=-1), "eval_every"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kwargs)


def test_bad_inputs_fail_with_a_clear_error(small):
    no_pad = copy.deepcopy(tokenizer())
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        train_sft(demo_llama(), no_pad, small, SFTConfig(max_steps=1), progress=False)
    narrow = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        train_sft(narrow, tokenizer(), small, SFTConfig(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="no training rows"):
        empty = copy.copy(small)
        empty.train = small.train.select([])
        train_sft(demo_llama(), tokenizer(), empty, SFTConfig(max_steps=1), progress=False)
