# Sourced by .ci/sdk-tests: the setup every run of the MCP SDK's own tests shares, and the bounded
# pytest run. Not executable on its own. Expects PYTHON and ROOT to be set and `set -euo pipefail`.
#
# After sdk_setup: MCP_VERSION, WORK (.ci/work, gitignored), SRC (the extracted sdist), PLUGIN_DIR.
# sdk_pytest runs pytest from inside $SRC and maps its status (see there).

WORK="$ROOT/.ci/work"
PLUGIN_DIR="$ROOT/.ci/sdk_plugin"
# shellcheck source=.ci/_sdist.sh
. "$ROOT/.ci/_sdist.sh"

log() { printf '[sdk-tests] %s\n' "$*" >&2; }

sdk_setup() {
    MCP_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("mcp"))')"
    log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])'); mcp $MCP_VERSION"
    "$PYTHON" -c 'import mcp_sse_transport' || { log "mcp_sse_transport is not importable by $PYTHON"; exit 2; }

    # 1. The sdist (it, unlike the wheel, carries tests/).
    SRC="$(mcp_sdist "$PYTHON" "$WORK")"

    # 2. Test dependencies: the entries of the sdist's [dependency-groups].dev that the selected tests
    # need to be collected and run, with the SDK's own version specifiers. Not needed: pyright, ruff,
    # pytest-flakefinder/-pretty, pillow, strict-no-cover, pydantic-settings, mcp[cli],
    # the examples workspace, and dirty-equals (no selected test or conftest imports it; this holds
    # for the SSE and the Streamable HTTP selections alike).
    #   pytest, trio              runner; trio is imported by tests/interaction modules
    #   pytest-examples           the SDK's addopts load it with `-p examples`
    #   inline-snapshot           snapshot() assertions
    #   logfire, opentelemetry-sdk, blockbuster   imported by tests/conftest.py and tests/server/conftest.py
    #   coverage                  imported by tests/interaction/transports/_stdio_server.py (collection)
    #   pytest-xdist              mcp 1.x's addopts pass --numprocesses (sdk_pytest turns it off: -p no:xdist
    #                             would leave the option unknown)
    local needed="pytest trio pytest-examples inline-snapshot logfire opentelemetry-sdk blockbuster coverage pytest-xdist"
    local reqs
    # shellcheck disable=SC2086  # $needed is a word list
    mapfile -t reqs < <("$PYTHON" - "$SRC/pyproject.toml" $needed <<'EOF'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    dev = tomllib.load(f)["dependency-groups"]["dev"]
wanted = set(sys.argv[2:])
seen = set()
for req in dev:
    if not isinstance(req, str):
        continue
    name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
    if name in wanted:
        print(req)
        seen.add(name)
missing = wanted - seen
if missing:
    sys.exit(f"not in the sdist's dev group: {sorted(missing)}")
EOF
    )
    local constraints="$WORK/constraints.txt"
    "$PYTHON" -m pip list --disable-pip-version-check --format=freeze --exclude-editable >"$constraints"
    log "installing test dependencies: ${reqs[*]}"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -c "$constraints" "${reqs[@]}"
}

# sdk_pytest PLUGIN JUNIT_NAME [pytest args...]
# Runs, from inside the sdist (so its pyproject.toml -- addopts, filterwarnings=error -- and conftests
# apply), `pytest -p PLUGIN` with .ci/sdk_plugin on PYTHONPATH and the junit report at
# .ci/work/JUNIT_NAME. A hung test must not hold CI: faulthandler dumps the stacks of a test running
# over 120 s, and the whole run is interrupted (SIGINT: pytest still prints its summary) after
# $SDK_TESTS_TIMEOUT s. Sets SDK_RC to pytest's status, except that "no tests collected" (5) and a
# timeout become failures (1); never exits the script.
sdk_pytest() {
    local plugin="$1" junit="$2" start=$SECONDS rc serial=()
    shift 2
    # One process, as the 2.x suite runs: the swap plugins patch the SDK in the process they load in.
    if grep -q -- "--numprocesses" "$SRC/pyproject.toml"; then serial=(--numprocesses 0); fi
    set +e
    (
        cd "$SRC" &&
            PYTHONPATH="$PLUGIN_DIR${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT -k 30 "${SDK_TESTS_TIMEOUT:-900}" \
                "$PYTHON" -m pytest -o faulthandler_timeout=120 \
                -p "$plugin" -p no:cacheprovider -ra --durations=5 \
                --junitxml="$WORK/$junit" "${serial[@]}" "$@"
    )
    rc=$?
    set -e
    SDK_RC=$rc
    SDK_RUN_SECONDS=$((SECONDS - start))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        SDK_FAIL="the run was stopped after ${SDK_TESTS_TIMEOUT:-900} s"
        SDK_RC=1
    elif [[ $rc -eq 5 ]]; then
        SDK_FAIL="no tests were selected"
        SDK_RC=1
    else
        SDK_FAIL=""
    fi
    SDK_PYTEST_RC=$rc
}
