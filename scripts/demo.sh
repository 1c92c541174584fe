#!/usr/bin/env bash
# The main job on the embedded default (a file:// repository, everything on 127.0.0.1):
# a coordinator and three agents in one RAID5 group (two data shards, one parity shard)
# shipping their WAL to a second "region", data, a full and an incremental backup taken while
# clients keep writing, a restore drill into directories, a tag before a bad migration and a
# restore to that tag, a disaster that destroys every shard, and a verified in-place restore
# of the whole cluster.
set -euo pipefail

bin="${LOCKSTEP_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/lockstep-target}/debug}"
agent="$bin/lockstep-agent"
lockstep="$bin/lockstep"
work="${LOCKSTEP_DEMO_DIR:-$(mktemp -d -t lockstep-demo.XXXXXX)}"
repo="file://$work/repository"
region2="file://$work/region-2/wal"
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

# Starts the agent of shard $1 on address $2 (127.0.0.1:0 picks a free port), shipping its
# WAL to the second region.
declare -A agent_pid
start_agent() {
  start "$work/agent-$1.log" "$agent" serve --db "$work/$1" --shard "$1" --listen "$2" --repo "$repo" --cfs default,users,events --wal-to "$region2"
  agent_pid[$1]=${pids[-1]}
}

# Stops every agent (cleanly), prints each shard's digest into `digest`, and restarts them.
declare -A digest
digest_agents() {
  for s in "${shards[@]}"; do
    kill "${agent_pid[$s]}"
    while kill -0 "${agent_pid[$s]}" 2>/dev/null; do sleep 0.1; done
    digest[$s]=$("$agent" digest --db "$work/$s")
    echo "$s: ${digest[$s]}"
  done
  for s in "${shards[@]}"; do
    start_agent "$s" "${address[$s]}"
  done
}

step "1. Start three agents (RAID5: shard-0 and shard-1 data, shard-2 parity) shipping their WAL to region 2, and a coordinator"
declare -A address
for s in "${shards[@]}"; do
  start_agent "$s" 127.0.0.1:0
  address[$s]=$listening
  echo "agent $s on $listening"
done
{
  echo "repository = \"$repo\""
  echo "wal_archive = \"$region2\""
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

step "3. A full and an incremental backup (the WAL since the full one) while clients keep writing to every shard"
writers=()
for s in "${shards[@]}"; do
  "$agent" load --endpoint "http://${address[$s]}" --keys 400000 --value-size 200 --prefix live --seed 7 >"$work/writer-$s.log" 2>&1 &
  writers+=($!)
done
sleep 1
"$lockstep" backup create --wait
sleep 1
"$lockstep" backup create --kind incremental --wait
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

step "5. WAL shipping to region 2: every shard's archive is caught up"
"$lockstep" wal status

step "6. A tag before a schema migration; the migration goes wrong and rewrites every value"
"$lockstep" tag create before-migration
"$lockstep" tag list
echo "The shards at the tag (agents stopped to read them, then restarted):"
digest_agents
at_tag=()
for s in "${shards[@]}"; do at_tag+=("${digest[$s]}"); done
for s in "${shards[@]}"; do
  "$agent" load --endpoint "http://${address[$s]}" --keys 50000 --value-size 200 --cfs default,users,events --seed 99 >/dev/null
done
echo "bad migration applied: 150k values rewritten"

step "7. Restore the cluster in place to the tag: base backup, its chain, then region 2's WAL up to the tag"
"$lockstep" restore --tag before-migration --in-place --dry-run
"$lockstep" restore --tag before-migration --in-place
echo "The shards after the restore:"
digest_agents
i=0
for s in "${shards[@]}"; do
  if [ "${digest[$s]}" != "${at_tag[$i]}" ]; then
    echo "MISMATCH: $s after the restore to the tag differs from the tag" >&2
    exit 1
  fi
  i=$((i + 1))
done
echo "OK: every shard is exactly at the tag again (same sequence number, keys and values)."

step "8. Disaster: every agent is killed and every shard directory destroyed"
cleanup
pids=()
rm -rf "${shards[@]/#/$work/}" "$work"/*.lockstep-captures
ls "$work"

step "9. Fresh agents on empty shards, the same coordinator configuration; full verify of the backup"
for s in "${shards[@]}"; do
  start_agent "$s" "${address[$s]}"
done
start "$work/coordinator.log" "$lockstep" serve --config "$work/lockstep.toml"
export LOCKSTEP_COORDINATOR="http://$listening"
"$lockstep" cluster status
"$lockstep" backup verify "$backup" --full

step "10. Restore the whole cluster in place: every shard downloaded and checked, then swapped in"
"$lockstep" restore "$backup" --in-place
"$lockstep" cluster status

step "11. Check: every restored shard equals the drill copy of the backup"
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
