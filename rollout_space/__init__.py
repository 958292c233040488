"""rollout_space: a vLLM replica that follows the bucket (docs/design.md §6).

`plugin`/`engine`/`weights` run inside vLLM (the `dws` weight-transfer backend); `vllm_proc`, `sync` and `gateway` run
in the gateway process that owns vLLM. Entry point: `python -m rollout_space` / `dws rollout`.
"""
