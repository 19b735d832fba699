# Sourced by the scripts beside it: make .venv (once) and install the project with its test and
# lint tools into it (again whenever pyproject.toml changes); the browser test needs Debian's
# Chromium, installed with apt-get where it is missing (Playwright drives it; it downloads nothing).
PYTHON=${PYTHON:-python3}
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test,lint]"
  touch "$stamp"
fi
