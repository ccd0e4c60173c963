# Sourced by scripts/main.sh and scripts/test.sh: create or reuse ./.venv and install the package into it.
# torch==2.13.0 is installed first and on its own, so that pip never resolves another (CUDA) build of torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.advantage-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    # The constraint keeps every later resolution on the installed torch (peft, accelerate and others depend on torch).
    echo "torch==2.13.0" > "$venv/torch-constraint.txt"
    "$venv/bin/python" -m pip install --quiet -c "$venv/torch-constraint.txt" -e "$root[all,test]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1
cd "$root"
