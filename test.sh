#!/usr/bin/env bash
# Sets itself up (see setup.sh), then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/setup.sh"
cd "$here"
exec python -m pytest -q tests "$@"
