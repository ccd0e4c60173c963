#!/usr/bin/env bash
# The whole test suite: set up ./.venv if needed, then run pytest (extra arguments are passed on).
# pytest exits 5 when it collected no test; that is a failure here, and so is any other non-zero code.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
