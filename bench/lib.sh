# Sourced by the bench scripts (from the repository root).

# wait_serving URL PID: polls gRPC health until cratemae.v1.CrateMae is SERVING at URL
# (every 50 ms: start-up is one of the figures); fails at once if the server process exits.
wait_serving() {
  local url=$1 pid=$2
  until "${CLI:-target/release/crate-mae-cli}" --addr "$url" --timeout 1 health \
    --service cratemae.v1.CrateMae >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "the server exited before SERVING" >&2; return 1; }
    sleep 0.05
  done
}
