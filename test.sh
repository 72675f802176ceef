#!/usr/bin/env bash
# Sets itself up (see setup.sh), then runs the test suite. Extra arguments go to pytest.
# Test files run in parallel on up to 4 processes (pytest-xdist, one file's tests together, so
# a file's fixtures are built once): most tests are single-threaded subprocess runs, and two
# cores finished the suite in 13 min 11 s (457 tests, 2026-11-30), about three quarters of the serial
# time. FEDSUITE_TEST_WORKERS=0 runs it serially; -n N on the command line also wins.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/setup.sh"
cd "$here"
cores="$(nproc 2>/dev/null || echo 2)"
workers="${FEDSUITE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec python -m pytest -q -n "$workers" --dist loadfile tests "$@"
