#!/usr/bin/env bash
# Local launcher: one process on this machine, all of its devices, any coerase subcommand.
#   launch/local.sh sample --config configs/tiny.py --prompt "a red circle" --out out/tiny
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/coerase ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/coerase "$@"
