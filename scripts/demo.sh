#!/usr/bin/env bash
# Set-up, then the demo (FP4 layers + fusion under torch.compile). Extra arguments go to the demo,
# e.g. --recipe mxfp4, --device cpu, --tokens 8192.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py "$@"
