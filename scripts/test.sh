#!/usr/bin/env bash
# Set-up plus the test suite (GPU tests skip without a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests "$@"
