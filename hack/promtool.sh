#!/usr/bin/env bash
# Unpacks promtool from Debian's prometheus package into DIR (default
# .cache/promtool) and prints its path, for `make alerts PROMTOOL=...`.
# The package is unpacked, not installed: installing it would also start a
# Prometheus server on the machine. Needs apt-get and dpkg-deb (Debian).
set -euo pipefail

dir=${1:-.cache/promtool}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ ! -x "$dir/root/usr/bin/promtool" ]]; then
	# apt's download user writes into the directory.
	chown _apt "$dir" 2>/dev/null || true
	(cd "$dir" && apt-get download -qq prometheus)
	dpkg-deb -x "$(ls "$dir"/prometheus_*.deb | head -n 1)" "$dir/root"
	rm -f "$dir"/prometheus_*.deb
fi
"$dir/root/usr/bin/promtool" --version >&2
echo "$dir/root/usr/bin/promtool"
