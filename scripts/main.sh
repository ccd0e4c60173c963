#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then run `advantage verify` (extra arguments are passed on).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec advantage verify "$@"
