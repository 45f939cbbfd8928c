#!/usr/bin/env bash
# Runs the README's quick-start commands on a fresh copy of the checkout, so the README cannot
# drift from what works. The commands come from README.md itself: the fenced block after
# "<!-- quickstart: serve" starts the server, the one after "<!-- quickstart: check" checks it.
# Two substitutions keep it fast and safe beside other servers: the binary built by tests/run
# ($S3CACHED_BIN, default target/debug/s3cached) stands in for `cargo run --release` and
# ./target/release/s3cached, and the server listens on a loopback port it picks (port 0,
# reported through S3CACHED_ADDR_FILE) instead of 11211.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin="${S3CACHED_BIN:-$root/target/debug/s3cached}"
[ -x "$bin" ] || { echo "quickstart: no binary at $bin (cargo build --bins)" >&2; exit 1; }

# The one command in the fenced block after the marker, without its comment.
block() {
  awk -v tag="<!-- quickstart: $1" '
    index($0, tag) == 1 { found = 1; next }
    found && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }' README.md | sed -e 's/[[:space:]]#.*$//' -e 's/[[:space:]]*$//' -e '/^$/d'
}
fail() { echo "quickstart: $*" >&2; exit 1; }

serve=$(block serve)
check=$(block check)
[ "$(printf '%s\n' "$serve" | wc -l)" = 1 ] && [ -n "$serve" ] || fail "README's serve block must hold one command, has: $serve"
[ "$(printf '%s\n' "$check" | wc -l)" = 1 ] && [ -n "$check" ] || fail "README's check block must hold one command, has: $check"
case "$serve" in
  "cargo run --release") serve_args="" ;;
  "cargo run --release -- "*) serve_args=${serve#cargo run --release -- } ;;
  *) fail "README's first command is no longer 'cargo run --release': update tests/quickstart.sh ($serve)" ;;
esac
case "$check" in
  "./target/release/s3cached "*) check_args=${check#./target/release/s3cached } ;;
  *) fail "README's check is no longer ./target/release/s3cached: update tests/quickstart.sh ($check)" ;;
esac

# A fresh copy: the checkout's files (committed or not), no data, no target, no config.
tmp=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fresh="$tmp/s3cached"
mkdir "$fresh"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && cp --parents -- "$f" "$fresh/"
done
[ -f "$fresh/README.md" ] && [ ! -e "$fresh/s3cached-data" ] || fail "the fresh copy is not fresh"

while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^S3CACHED_' || true)
# Port 0: the server binds a free port itself and writes the address to a file.
export S3CACHED_LISTEN="127.0.0.1:0" S3CACHED_ADDR_FILE="$tmp/addr"

log="$tmp/server.log"
: >"$log"
# shellcheck disable=SC2086 # the README's arguments split as the shell would split them
(cd "$fresh" && exec "$bin" $serve_args) >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 1 200); do
  [ -s "$S3CACHED_ADDR_FILE" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; fail "the server exited at startup"; }
  sleep 0.05
done
[ -s "$S3CACHED_ADDR_FILE" ] || { cat "$log" >&2; fail "the server did not start in 10 s"; }
grep -q "s3cached listening" "$log" || { cat "$log" >&2; fail "the server did not log that it listens"; }
# The check reads the listen address from the environment, as the server did.
S3CACHED_LISTEN=$(sed -n 's/^listen //p' "$S3CACHED_ADDR_FILE")

# shellcheck disable=SC2086
if ! out=$(cd "$fresh" && "$bin" $check_args 2>&1); then
  printf '%s\n' "$out" >&2; cat "$log" >&2; fail "the README's check failed: $check"
fi
printf '%s\n' "$out" | grep -q "ok: set, get and delete" || { printf '%s\n' "$out" >&2; fail "the check did no round trip"; }
[ -d "$fresh/s3cached-data" ] || fail "the server did not create ./s3cached-data"

kill -TERM "$server_pid"
wait "$server_pid" || fail "the server did not stop cleanly on SIGTERM"
server_pid=""
# The same check fails once the server is gone: it can tell.
# shellcheck disable=SC2086
if (cd "$fresh" && "$bin" $check_args --timeout-ms 2000) >/dev/null 2>&1; then
  fail "the check passed with no server"
fi
echo "quickstart: the README's commands work on a fresh copy ($serve; $check)"
