#!/usr/bin/env bash
# The whole test suite: set up ./.venv if needed, then run pytest (extra arguments are passed on).
# pytest exits 5 when it collected no test; that is a failure here, and so is any other non-zero code.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The report's test renders the page in a real browser: Debian's chromium, installed here when this machine allows
# it (root and apt); otherwise that test fails and says how to install it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing chromium (apt) for the report's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
        || echo "scripts/test.sh: could not install chromium" >&2
fi
# Two worker processes (pytest-xdist), each test file on one of them (tests/conftest.py groups them; the quick
# demo's two readers share one worker, so the demo runs once): the suite's wall time on 2 cores is about
# half of one process's (every test pins torch to 1 thread). ADVANTAGE_TEST_WORKERS=0 runs it in this process.
exec python -m pytest -n "${ADVANTAGE_TEST_WORKERS:-2}" --dist loadfile "$@"
