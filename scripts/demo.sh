#!/usr/bin/env bash
# The main job on the embedded default (a file:// repository, everything on 127.0.0.1):
# a coordinator and three agents in one RAID5 group (two data shards, one parity shard),
# data, backups taken while clients keep writing, a restore drill into directories, a
# disaster that destroys every shard, and a verified in-place restore of the whole cluster.
set -euo pipefail

bin="${LOCKSTEP_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/lockstep-target}/debug}"
agent="$bin/lockstep-agent"
lockstep="$bin/lockstep"
work="${LOCKSTEP_DEMO_DIR:-$(mktemp -d -t lockstep-demo.XXXXXX)}"
repo="file://$work/repository"
shards=(shard-0 shard-1 shard-2)
pids=()
step() { printf '\n== %s\n' "$*"; }
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts a server in the background; sets `listening` to the address it reports.
start() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q 'listening on' "$log"; then
      listening=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -n 1)
      return
    fi
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "server did not start; see $log" >&2
  cat "$log" >&2
  exit 1
}

# Starts the agent of shard $1 on address $2 (127.0.0.1:0 picks a free port).
start_agent() {
  start "$work/agent-$1.log" "$agent" serve --db "$work/$1" --shard "$1" --listen "$2" --repo "$repo" --cfs default,users,events
}

step "1. Start three agents (RAID5: shard-0 and shard-1 data, shard-2 parity) and a coordinator"
declare -A address
for s in "${shards[@]}"; do
  start_agent "$s" 127.0.0.1:0
  address[$s]=$listening
  echo "agent $s on $listening"
done
{
  echo "repository = \"$repo\""
  echo 'listen = "127.0.0.1:0"'
  for s in "${shards[@]}"; do
    printf '[[agents]]\nshard = "%s"\nendpoint = "http://%s"\n' "$s" "${address[$s]}"
  done
  printf '[[raid_groups]]\nname = "group-0"\nlayout = "raid5"\ndata = ["shard-0", "shard-1"]\nparity = ["shard-2"]\n'
} >"$work/lockstep.toml"
start "$work/coordinator.log" "$lockstep" serve --config "$work/lockstep.toml"
export LOCKSTEP_COORDINATOR="http://$listening"
echo "coordinator on $LOCKSTEP_COORDINATOR"
"$lockstep" cluster status

step "2. Load 50k keys in 3 column families into every shard, through the agents"
for s in "${shards[@]}"; do
  "$agent" load --endpoint "http://${address[$s]}" --keys 50000 --value-size 200 --cfs default,users,events --seed "${s#shard-}"
done

step "3. Two backups while clients keep writing to every shard"
writers=()
for s in "${shards[@]}"; do
  "$agent" load --endpoint "http://${address[$s]}" --keys 400000 --value-size 200 --prefix live --seed 7 >"$work/writer-$s.log" 2>&1 &
  writers+=($!)
done
sleep 1
"$lockstep" backup create --wait
sleep 1
"$lockstep" backup create --wait
for pid in "${writers[@]}"; do kill "$pid" 2>/dev/null || true; done
wait "${writers[@]}" 2>/dev/null || true
"$lockstep" backup list
backup=$("$lockstep" backup show latest --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backup_id"])')

step "4. Restore drill: the latest backup into directories beside the live shards (which keep serving)"
"$lockstep" restore "$backup" --to "$work/drill"
for s in "${shards[@]}"; do
  drill[${s#shard-}]=$("$agent" digest --db "$work/drill/$s")
  echo "$s at the cut: ${drill[${s#shard-}]}"
done

step "5. Disaster: every agent is killed and every shard directory destroyed"
cleanup
pids=()
rm -rf "${shards[@]/#/$work/}" "$work"/*.lockstep-captures
ls "$work"

step "6. Fresh agents on empty shards, the same coordinator configuration; full verify of the backup"
for s in "${shards[@]}"; do
  start_agent "$s" "${address[$s]}"
done
start "$work/coordinator.log" "$lockstep" serve --config "$work/lockstep.toml"
export LOCKSTEP_COORDINATOR="http://$listening"
"$lockstep" cluster status
"$lockstep" backup verify "$backup" --full

step "7. Restore the whole cluster in place: every shard downloaded and checked, then swapped in"
"$lockstep" restore "$backup" --in-place
"$lockstep" cluster status

step "8. Check: every restored shard equals the drill copy of the backup"
cleanup
pids=()
status=0
for s in "${shards[@]}"; do
  after=$("$agent" digest --db "$work/$s")
  if [ "$after" = "${drill[${s#shard-}]}" ]; then
    echo "OK   $s: $after"
  else
    echo "DIFF $s: $after" >&2
    status=1
  fi
done
if [ "$status" = 0 ]; then
  echo "OK: the cluster is back at backup $backup, every shard identical to its backup (same sequence number, keys and values)."
  echo "Demo files are in $work"
else
  echo "MISMATCH: a restored shard differs from the backup" >&2
fi
exit "$status"
