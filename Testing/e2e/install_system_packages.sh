#!/bin/sh
# Installs the Debian packages the tests need beyond pip: `chromium` for the browser tests (never
# `playwright install`, whose downloads come from hosts this project's machines cannot reach) and
# Mesa's EGL and OSMesa for VoCo Studio's off-screen rendering on a machine without a GPU.
# Idempotent and quiet; about a second when all is there. It only installs where it is allowed to
# (root with apt-get); anywhere else it says why and exits 0, and the tests that need a package skip
# with that reason. VOCO_E2E_BROWSER=0 skips the install.
CHROMIUM=/usr/bin/chromium
FLAGS="--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update --disable-sync --no-first-run"
PACKAGES="chromium libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6"
LOG=/tmp/voco_install_system_packages.log

browser_works() {
    [ -x "$CHROMIUM" ] && timeout 60 "$CHROMIUM" $FLAGS --dump-dom about:blank 2>/dev/null | grep -q '<body>'
}

all_there() {
    browser_works && ldconfig -p | grep -q 'libEGL_mesa.so.0' && ldconfig -p | grep -q 'libOSMesa.so.8'
}

if [ "${VOCO_E2E_BROWSER:-1}" = 0 ]; then
    echo "install_system_packages: VOCO_E2E_BROWSER=0, not installing $PACKAGES" >&2
    exit 0
fi
if all_there; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_packages: not root with apt-get; tests needing $PACKAGES skip unless they are there" >&2
    exit 0
fi
echo "install_system_packages: installing $PACKAGES (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
if ! apt-get install -y -q --no-install-recommends $PACKAGES >$LOG 2>&1; then
    # A fresh image may have no package lists yet.
    apt-get update -q >>$LOG 2>&1
    apt-get install -y -q --no-install-recommends $PACKAGES >>$LOG 2>&1
fi
if all_there; then
    echo "install_system_packages: $("$CHROMIUM" --version 2>/dev/null), Mesa EGL and OSMesa" >&2
else
    echo "install_system_packages: something did not install or chromium does not start (log: $LOG); tests needing it skip" >&2
    tail -n 20 $LOG >&2
fi
exit 0
