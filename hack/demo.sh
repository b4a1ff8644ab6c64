#!/usr/bin/env bash
# The sidecar for real, in a throwaway network namespace: one-shot, then as a
# daemon that repairs what is removed under it, with a TCP round trip to the
# address through its rules. Needs root (`make demo` as root, or
# `sudo make demo`). Everything happens inside the namespace, which is
# deleted on any exit; the host's own network is never touched.
#
# Environment: ADDRESS (10.96.0.2), PORT (443), BACKEND (nft or legacy; nft),
# GO (go).
set -euo pipefail
cd "$(dirname "$0")/.."

ADDRESS=${ADDRESS:-10.96.0.2}
PORT=${PORT:-443}
BACKEND=${BACKEND:-nft}
GO=${GO:-go}
IPT=iptables-$BACKEND
CHAINS=("raw APISERVER-PROXY-PREROUTING" "raw APISERVER-PROXY-OUTPUT" "filter APISERVER-PROXY-INPUT" "filter APISERVER-PROXY-OUTPUT")

die() {
	echo "demo: $*" >&2
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "needs root to create a network namespace: run make demo as root, or sudo make demo
  (without root, print the rules instead: go run . --dry-run --ip-address $ADDRESS)"
[[ $ADDRESS != *:* ]] || die "this demo shows an IPv4 address; the sidecar itself also takes IPv6"
case $BACKEND in nft | legacy) ;; *) die "BACKEND must be nft or legacy, not \"$BACKEND\"" ;; esac
for cmd in ip "$IPT" "$IPT-save" "$IPT-restore" "$GO"; do
	command -v "$cmd" >/dev/null || die "\"$cmd\" not found in PATH (Debian: apt-get install iptables iproute2; Go from go.dev; with sudo, PATH may lack go: sudo env PATH=\"\$PATH\" make demo)"
done

ns=apiserver-proxy-demo-$$
tmp=$(mktemp -d)
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	if ip netns list | grep -qw "$ns"; then
		ip netns del "$ns"
		echo "demo: deleted network namespace $ns"
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bold='' off=''
if [[ -t 1 ]]; then bold=$'\e[1m' off=$'\e[0m'; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
show() { # print a command, then run it with its output indented
	printf '$'
	printf ' %q' "$@"
	printf '\n'
	"$@" 2>&1 | indent
}
indent() { sed 's/^/    /'; }
now_ms() { date +%s%3N; }
# wait_for SECONDS COMMAND...: run COMMAND every 20ms until it succeeds.
wait_for() {
	local deadline=$(($(now_ms) + $1 * 1000))
	shift
	until "$@" >/dev/null 2>&1; do
		(($(now_ms) < deadline)) || return 1
		sleep 0.02
	done
}
has_address() { ip -n "$ns" -4 addr show dev lo | grep -qw "inet $ADDRESS/32"; }
has_rules() { "${in_ns[@]}" "$IPT" -t filter -S APISERVER-PROXY-INPUT | grep -q -- "-d $ADDRESS/32"; }
list_rules() {
	local table chain
	for tc in "${CHAINS[@]}"; do
		read -r table chain <<<"$tc"
		show "${in_ns[@]}" "$IPT" -t "$table" -S "$chain"
	done
	echo "    jumps from the built-in chains:"
	for tc in "raw PREROUTING" "raw OUTPUT" "filter INPUT" "filter OUTPUT"; do
		read -r table chain <<<"$tc"
		"${in_ns[@]}" "$IPT" -t "$table" -S "$chain" | grep -- '-j APISERVER-PROXY' | sed "s/^/    [$table] /" || true
	done
}
round_trip() {
	show "${in_ns[@]}" tcpecho -dial "$ADDRESS:$PORT" -send "$1"
}

step "Build the sidecar and the demo's TCP helper"
show "$GO" build -o "$tmp/apiserver-proxy-sidecar" .
show "$GO" build -o "$tmp/tcpecho" ./hack/tcpecho
export PATH="$tmp:$PATH"
# Every command below runs in the namespace through `ip netns exec`, which
# replaces itself with the command: a background job's pid is the command's.
in_ns=(ip netns exec "$ns")
sidecar=(apiserver-proxy-sidecar --ip-address "$ADDRESS" --port "$PORT" --iptables-backend "$BACKEND")

step "Create network namespace $ns (the host's own network is not touched)"
show ip netns add "$ns"
show ip -n "$ns" link set lo up

step "One-shot: put the address and the rules in place, then exit"
show "${in_ns[@]}" "${sidecar[@]}" --daemon=false --setup-iptables
echo "exit code: $?"

step "The address, as the kernel lists it"
show ip -n "$ns" -4 addr show dev lo

step "The rules, as the kernel lists them ($IPT)"
list_rules

step "A TCP round trip to $ADDRESS:$PORT through the rules"
echo "(tcpecho stands in for the proxy and listens on the address, in the namespace)"
"${in_ns[@]}" tcpecho -listen "$ADDRESS:$PORT" -for 60s >"$tmp/server.log" 2>&1 &
pids+=($!)
wait_for 5 grep -q listening "$tmp/server.log" || die "the TCP helper did not start: $(cat "$tmp/server.log")"
round_trip hello
echo "packet counters of our chains (non-zero: the round trip went through them):"
for tc in "raw APISERVER-PROXY-PREROUTING" "filter APISERVER-PROXY-INPUT"; do
	read -r table chain <<<"$tc"
	show "${in_ns[@]}" "$IPT" -t "$table" -L "$chain" -n -v -x
done

step "Daemon: --sync-interval 2s, and we break things under it"
"${in_ns[@]}" "${sidecar[@]}" --setup-iptables --sync-interval 2s -v 2 >"$tmp/daemon.log" 2>&1 &
daemon=$!
pids+=("$daemon")
wait_for 5 grep -q "Sync finished" "$tmp/daemon.log" || die "the daemon did not sync: $(cat "$tmp/daemon.log")"
echo "daemon running (pid $daemon). With nft the kernel reports every change and the daemon"
echo "repairs at once; legacy iptables has no such events, so the daemon polls each table's"
echo "info (microseconds, every 100 ms) and repairs as soon as it changes."

show ip -n "$ns" addr del "$ADDRESS/32" dev lo
start=$(now_ms)
wait_for 5 has_address || die "the address was not repaired within 5 s"
echo "address back after $(($(now_ms) - start)) ms"

show "${in_ns[@]}" "$IPT" -t filter -F APISERVER-PROXY-INPUT
start=$(now_ms)
wait_for 5 has_rules || die "the chain was not repaired within 5 s"
echo "APISERVER-PROXY-INPUT refilled after $(($(now_ms) - start)) ms:"
"${in_ns[@]}" "$IPT" -t filter -S APISERVER-PROXY-INPUT | indent
round_trip hello-after-the-repair

sleep 0.2
kill -TERM "$daemon"
wait "$daemon" && rc=0 || rc=$?
echo "daemon stopped by SIGTERM, exit code $rc; its log:"
grep -E '"(Starting|Chose iptables backend|Repaired [a-z]+|Sync finished|Stopping|Leaving[^"]*)"' "$tmp/daemon.log" | indent
has_address && echo "without --cleanup the address stays (and the rules), as a rolling update needs"

step "Teardown mode: --daemon=false --cleanup removes exactly what the sidecar added"
show "${in_ns[@]}" "${sidecar[@]}" --daemon=false --cleanup --setup-iptables
show ip -n "$ns" -4 addr show dev lo
printf '$ %s\n' "${in_ns[*]} $IPT-save | grep -c APISERVER-PROXY"
echo "    $("${in_ns[@]}" "$IPT-save" | grep -c APISERVER-PROXY || true) lines of ours left"

step "Remove the namespace"
cleanup
trap - EXIT
if ip netns list | grep -qw "$ns"; then die "namespace $ns is still there"; fi
echo "done: no namespace, link or rule of the demo is left"
