"""env_space: the dws environment Space -- OpenEnv episodes and batch scoring over HTTP(S).

Owns the environment service of docs/design.md §6.2. Modules: `tasks` (registry and rules: wordle, letter, short,
reverse), `models` (typed OpenEnv action/observation/state), `environment` (the OpenEnv `Environment`), `v1` (batch
scoring and prompt listing), `guard` (auth, size limit, session-cap refusal), `metrics`, `ui` (Gradio page), `app`
(assembly), `config` and `__main__` (`python -m env_space`, the image's entrypoint), `client` (clients of this
service). Its image holds no protocol code (`shared/`), and importing the package stays light: no torch.
"""
