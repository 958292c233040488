"""trainer_space: TRL GRPO over remote rollout replicas and the env Space, publishing every optimizer step to the
bucket (shared.publisher), with a staleness guard, TRL's importance-sampling correction enabled for remote logprobs
(`grpo.RemoteISGRPOTrainer`) and a live dashboard (`dashboard`). Entry point: `python -m trainer_space` / `dws train`."""
