#!/usr/bin/env bash
# What a new user does on a fresh machine: clone the repository alone (nothing beside it, not
# even this team's reference folder) and run the README's test command there. Fails if any
# test needs something outside the clone.
#
#   scripts/fresh-clone-check.sh      # builds in target/fresh-clone (kept for the next run)
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
# A target folder of its own: build scripts and tests embed their checkout's path.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$OLDPWD/target/fresh-clone}"
start=$(date +%s)
bash -c "$test_command"
echo "== fresh clone passed in $(( $(date +%s) - start )) s"
