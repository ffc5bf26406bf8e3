#!/usr/bin/env bash
# What a new user does on a fresh machine: clone the repository alone (nothing beside it, no
# ../shared) and run the README's test command there. Fails if any test needs something
# outside the clone.
#
#   scripts/fresh-clone-check.sh      # reuses this checkout's dependency builds (CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
git clone -q --no-local . "$root/crate-mae-serve"
# The README's test command, exactly (its second line).
test_command=$(grep -m1 -oE '^Run the tests: `[^`]+`' README.md | sed -E 's/^Run the tests: `(.*)`$/\1/')
[ -n "$test_command" ] || { echo "README has no 'Run the tests:' line" >&2; exit 1; }
echo "== fresh clone in $root (nothing beside it): $test_command"
ls -A "$root"
cd "$root/crate-mae-serve"
# Dependencies compile the same anywhere; sharing their build keeps this check short.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$OLDPWD/target}"
start=$(date +%s)
bash -c "$test_command"
echo "== fresh clone passed in $(( $(date +%s) - start )) s"
