# Sourced by the scripts beside it (and .ci/run): make .venv (once) and install into it what the
# caller needs, again whenever pyproject.toml changes. The caller sets `setup_kind` first:
#   example  the package alone (./scripts/example);
#   cluster  the package with its redis extra, and Debian's redis-server (./scripts/example-cluster);
#   test     the default: the package with its test and lint extras, Debian's chromium for the
#            browser test (Playwright drives it; it downloads nothing) and redis-server for the
#            Redis tests, which start their own servers (./scripts/test, .ci/run).
# Debian packages come from apt-get only where their commands are missing. Each kind has its own
# stamp, so moving from one kind to another installs what the new one needs.
PYTHON=${PYTHON:-python3}
case "${setup_kind:=test}" in
  example) pip_target="." apt_commands="" ;;
  cluster) pip_target=".[redis]" apt_commands="redis-server" ;;
  test) pip_target=".[test,lint]" apt_commands="chromium redis-server" ;;
  *)
    echo "scripts/_setup.sh: unknown setup_kind '$setup_kind' (example, cluster or test)" >&2
    return 1
    ;;
esac
apt_packages=""
for cmd in $apt_commands; do # each command comes in the Debian package of its name
  command -v "$cmd" >/dev/null 2>&1 || apt_packages="$apt_packages $cmd"
done
if [ -n "$apt_packages" ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $apt_packages >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$setup_kind-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e "$pip_target"
  touch "$stamp"
fi
unset apt_commands apt_packages cmd pip_target stamp sudo
