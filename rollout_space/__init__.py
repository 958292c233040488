"""rollout_space: a vLLM replica that follows the bucket (docs/design.md §6).

`plugin` (registration), `cpu_weights`, `engine`, `patchmap`, `extension` run inside vLLM (the `dws` weight-transfer
backend); `prepared` is the hand-off file between the two sides; `vllm_proc`, `sync` and `gateway` run
in the gateway process that owns vLLM. Entry point: `python -m rollout_space` / `dws rollout`.
"""
