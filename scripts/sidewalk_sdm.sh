#!/usr/bin/env bash
# The sidewalk SDM reference workflow (prepare -> train -> guidance fine-tune -> generate -> evaluate -> report):
# a shell spelling of scripts/sidewalk_sdm.py, with the same flags (see --help). $PYTHON picks the interpreter.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/sidewalk_sdm.py" "$@"
