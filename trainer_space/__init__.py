"""trainer_space: TRL's AsyncGRPOTrainer over remote rollout replicas and env Spaces, publishing every policy version
to the bucket as a lossless delta. Modules: `config` (flags and their variables), `train` (the run), `worker` (the
`rollout_worker=` extension point: continuous generation and scoring), `rollouts` (one GRPO group -> TRL samples),
`remote` (replica and env clients), `transfer` (the `weight_transfer=` extension point: the bucket), `cpu_shims`
(what TRL needs without CUDA), `state` / `status` / `figures` / `page` (the dashboard). Entry point:
`python -m trainer_space` / `dws train`."""
