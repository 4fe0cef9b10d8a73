#!/usr/bin/env bash
# Leak and memory-error check of the native addon: runs test/fixtures/native-exercise.js under valgrind and
# fails on memory definitely lost, or on any error whose stack passes through the addon. (V8's
# conservative stack scan reports "uninitialised value" errors of its own; those are not ours.)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v valgrind >/dev/null; then
  echo "leak check skipped: valgrind is not installed (apt-get install valgrind)"
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
valgrind --leak-check=full --show-leak-kinds=definite --num-callers=30 \
  node --expose-gc test/fixtures/native-exercise.js >"$log" 2>&1 || true
lost=$(grep -oE 'definitely lost: [0-9,]+ bytes' "$log" | grep -oE '[0-9,]+' | tr -d , || echo 0)
ours=$(awk '/^==[0-9]+== [A-Z]/ { block = "" } { block = block "\n" $0 } /pagemerge\.node|pm::/ && block ~ /Invalid|uninitialised|definitely lost/ { n++ } END { print n + 0 }' "$log")
echo "native leak check: ${lost:-0} bytes definitely lost, ${ours} error lines in the addon"
if [ "${lost:-0}" != 0 ] || [ "$ours" != 0 ]; then
  cat "$log"
  exit 1
fi
