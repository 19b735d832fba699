# shellcheck shell=bash
# Sourceable helper: download and extract the sdist of the mcp version installed for a Python.
#
#   . .ci/_sdist.sh
#   mcp_sdist PYTHON WORK     # prints the extracted source directory, WORK/mcp-<version>
#
# Used by .ci/sdk-tests (through .ci/_sdk_common.sh) and .ci/conformance, which so share one cached
# copy under .ci/work/ (WORK/mcp-<version>.tar.gz, extracted to WORK/mcp-<version>/ with a .extracted
# marker, both reused when present).
# Progress goes to stderr; only the directory is printed on stdout.
mcp_sdist() {
    local python="$1" work="$2" version sdist src
    version="$("$python" -c 'import importlib.metadata as m; print(m.version("mcp"))')" || return 1
    mkdir -p "$work"
    sdist="$work/mcp-$version.tar.gz"
    src="$work/mcp-$version"
    # The sdist (it, unlike the wheel, carries tests/ and examples/).
    if [[ ! -f "$sdist" ]]; then
        printf '[sdist] downloading the mcp==%s sdist\n' "$version" >&2
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            "mcp==$version" -d "$work" >&2 || return 1
    fi
    if [[ ! -f "$src/.extracted" ]]; then
        printf '[sdist] extracting %s\n' "$(basename "$sdist")" >&2
        rm -rf "$src" "$src.tmp"
        mkdir -p "$src.tmp"
        tar -xzf "$sdist" -C "$src.tmp" || return 1
        mv "$src.tmp/mcp-$version" "$src"
        rm -rf "$src.tmp"
        touch "$src/.extracted"
    fi
    printf '%s\n' "$src"
}
