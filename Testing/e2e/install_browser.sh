#!/bin/sh
# Installs the browser the e2e tests drive: Debian's `chromium` (never `playwright install`, whose
# downloads come from hosts this project's machines cannot reach). Idempotent and quiet; about a
# second when chromium is already there. It only installs where it is allowed to (root with
# apt-get); anywhere else it says why and exits 0, and the e2e tests skip with that reason.
# VOCO_E2E_BROWSER=0 skips the install.
CHROMIUM=/usr/bin/chromium
FLAGS="--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update --disable-sync --no-first-run"

works() {
    [ -x "$CHROMIUM" ] && timeout 60 "$CHROMIUM" $FLAGS --dump-dom about:blank 2>/dev/null | grep -q '<body>'
}

if [ "${VOCO_E2E_BROWSER:-1}" = 0 ]; then
    echo "install_browser: VOCO_E2E_BROWSER=0, not installing chromium" >&2
    exit 0
fi
if works; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: not root with apt-get; the e2e tests skip unless $CHROMIUM works" >&2
    exit 0
fi
echo "install_browser: installing Debian chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/tmp/voco_install_browser.log 2>&1; then
    # A fresh image may have no package lists yet.
    apt-get update -q >>/tmp/voco_install_browser.log 2>&1
    apt-get install -y -q --no-install-recommends chromium >>/tmp/voco_install_browser.log 2>&1
fi
if works; then
    echo "install_browser: $("$CHROMIUM" --version 2>/dev/null)" >&2
else
    echo "install_browser: chromium did not install or does not start (log: /tmp/voco_install_browser.log); the e2e tests will skip" >&2
    tail -n 20 /tmp/voco_install_browser.log >&2
fi
exit 0
