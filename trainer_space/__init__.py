"""trainer_space: TRL GRPO over remote rollout replicas and the env Space, publishing every optimizer step to the
bucket (shared.publisher), with generation of the next batch overlapping training (`rollouts.Prefetcher`), a
staleness guard applied when a batch is consumed, multi-turn episodes through OpenEnv's client, TRL's
importance-sampling correction enabled for remote logprobs (`grpo.RemoteISGRPOTrainer`) and a live dashboard
(`dashboard`). Entry point: `python -m trainer_space` / `dws train`."""
