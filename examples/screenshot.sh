#!/bin/bash
# Screenshot a report in headless Chromium (apt-get install chromium-headless-shell):
#   bash examples/screenshot.sh results/gru/report.html gru.png [height in pixels]
set -euo pipefail
chromium-headless-shell --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size=1100,"${3:-4000}" --screenshot="$2" "file://$(realpath "$1")" 2>/dev/null
