"""Operator and developer tooling -- never copied into a Space image.

* `launch` -- start the Spaces as local child processes from their own venvs (what `make demo` and the tests use);
* `demo` -- `make demo` / `dws demo`: env, replicas and trainer on 127.0.0.1 over a local-folder bucket, then a report;
* `spaces` -- `dws spaces deploy` / `make spaces`: the bucket and the three Hugging Face Spaces in one command;
* `tiny_model` -- `dws tiny-model DIR`: the deterministic tiny Qwen3 checkpoint tests and the demo train.
"""
