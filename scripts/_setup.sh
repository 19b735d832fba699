# Sourced by the scripts beside it: make .venv (once) and install the project with its test and
# lint tools into it (again whenever pyproject.toml changes). Two Debian packages come from
# apt-get where their commands are missing: Chromium for the browser test (Playwright drives it;
# it downloads nothing) and redis-server for the Redis tests (which start their own servers).
PYTHON=${PYTHON:-python3}
apt_packages=""
command -v chromium >/dev/null 2>&1 || apt_packages="$apt_packages chromium"
command -v redis-server >/dev/null 2>&1 || apt_packages="$apt_packages redis-server"
if [ -n "$apt_packages" ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $apt_packages >/dev/null
fi
unset apt_packages
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test,lint]"
  touch "$stamp"
fi
