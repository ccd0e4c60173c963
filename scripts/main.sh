#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then run `advantage demo` (extra arguments are passed on, e.g. --quick).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec advantage demo "$@"
