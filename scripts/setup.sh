#!/usr/bin/env bash
# Creates .venv (once) and installs dinov3-pl with its dev extras into it. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with data-loader workers, spinning
# threads slowed small ops 10-30x (measured in the Fashion-MNIST experiment).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
