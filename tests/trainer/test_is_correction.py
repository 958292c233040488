"""The docs/design.md §6 trap: TRL's own importance-sampling correction must act on rollout_func logprobs without vLLM.

A tiny model, no services: the same prompt/completion batch is scored through `RemoteISGRPOTrainer` twice -- once
with sampling logprobs equal to the current policy's (fresh) and once with logprobs of an older policy (stale). The
importance ratio and the loss must differ; with the stock `GRPOTrainer` (flag off) the sampling logprobs are ignored.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trainer_space.grpo import RemoteISGRPOTrainer, load_model_and_tokenizer

PROMPT = [104, 105, 258]
COMPLETION = [97, 98, 99, 100, 101, 102]


def _token_logps(model, n_rows: int) -> list[list[float]]:
    ids = torch.tensor([PROMPT + COMPLETION])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1:-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(COMPLETION)[:, None])[:, 0]
    return [lp.tolist()] * n_rows


def _make(cls, model, tok, tmp_path, sampling):
    n = 4
    rewards = iter([[0.0, 1.0, 0.5, 0.25]] * 10)

    def rollout(prompts, trainer):
        return {"prompt_ids": [PROMPT] * len(prompts), "completion_ids": [COMPLETION] * len(prompts),
                "logprobs": sampling}

    def reward(prompts, completions, **_):
        return next(rewards)

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=n, num_generations=n,
                      max_completion_length=8, use_cpu=True, report_to=[], save_strategy="no",
                      vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=100.0)
    ds = Dataset.from_list([{"prompt": "hi"}] * 8)
    return cls(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
               rollout_func=rollout)


def _ratio_and_loss(trainer) -> tuple[torch.Tensor | None, float]:
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.training_step
    inputs = trainer._generate_and_score_completions([{"prompt": "hi"}] * 4)
    loss = trainer.compute_loss(trainer.model, inputs)
    return inputs.get("importance_sampling_ratio"), float(loss)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    old = copy.deepcopy(model)
    # The "older policy": perturb every weight so its token logprobs clearly differ from the current model's.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, old, tok


def test_stale_logprobs_change_ratio_and_loss(models, tmp_path):
    model, old, tok = models
    fresh_lp = _token_logps(model, 4)
    # Rows 1-3 were sampled by the older policy (row 0 fresh): with identical completions and zero-mean advantages
    # only a per-row difference in the ratio can move the loss.
    stale_lp = fresh_lp[:1] + _token_logps(old, 3)
    assert max(abs(a - b) for a, b in zip(fresh_lp[1], stale_lp[1])) > 0.05

    fresh_ratio, fresh_loss = _ratio_and_loss(_make(RemoteISGRPOTrainer, model, tok, tmp_path, fresh_lp))
    stale_ratio, stale_loss = _ratio_and_loss(_make(RemoteISGRPOTrainer, model, tok, tmp_path, stale_lp))
    assert fresh_ratio is not None and stale_ratio is not None, "TRL's IS correction did not run"
    mask = fresh_ratio != 0
    # Fresh: sampling logprobs are the current policy's -> ratio 1 (up to batched-vs-single fp32 error). Stale: exp(new - old).
    assert torch.allclose(fresh_ratio[mask], torch.ones_like(fresh_ratio[mask]), atol=5e-3)
    expected = torch.exp(torch.tensor(fresh_lp[1]) - torch.tensor(stale_lp[1]))
    assert torch.allclose(stale_ratio[1, :len(COMPLETION)], expected, rtol=5e-3, atol=1e-3)
    assert abs(stale_loss - fresh_loss) > 1e-4, (fresh_loss, stale_loss)


def test_stock_trainer_ignores_remote_logprobs(models, tmp_path):
    """Why the subclass exists: without it, sampling logprobs from rollout_func never reach the loss."""
    model, old, tok = models
    fresh_lp, stale_lp = _token_logps(model, 4), _token_logps(old, 4)
    r1, l1 = _ratio_and_loss(_make(GRPOTrainer, model, tok, tmp_path, fresh_lp))
    r2, l2 = _ratio_and_loss(_make(GRPOTrainer, model, tok, tmp_path, stale_lp))
    assert r1 is None and r2 is None
    assert l1 == pytest.approx(l2, abs=1e-7)


def test_subclass_refuses_without_rollout_func(models, tmp_path):
    model, _, tok = models
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                      report_to=[])
    with pytest.raises(ValueError, match="rollout_func"):
        RemoteISGRPOTrainer(model=model, reward_funcs=[lambda **k: [0.0]], args=args,
                            train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4), processing_class=tok)
