#!/usr/bin/env bash
# Backup and restore throughput, write pause and peak agent RSS on generated RocksDB shards.
# Numbers are reported, never asserted. Sizes are set by BENCH_SIZES_MIB (default "512 2048").
# The comparison against RocksDB's BackupEngine in the same run is issue 6.
set -euo pipefail

bin="${LOCKSTEP_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/lockstep-target}/debug}"
agent="$bin/lockstep-agent"
work="${BENCH_DIR:-$(mktemp -d -t lockstep-bench.XXXXXX)}"
sizes="${BENCH_SIZES_MIB:-512 2048}"
value_size=1000
results="$work/results.md"

# Runs a command under GNU time; prints "seconds max_rss_kib".
timed() {
  local out="$work/time.$$"
  /usr/bin/time -f '%e %M' -o "$out" "$@" >"$work/last.out" 2>"$work/last.err" || {
    cat "$work/last.out" "$work/last.err" >&2
    return 1
  }
  cat "$out"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", (b / 1048576) / (s > 0 ? s : 1e-9) }'; }

{
  echo "| shard | data MiB | backup s | backup MiB/s | repo MiB | write pause ms | re-backup s | re-backup uploaded | full verify s | restore s | restore MiB/s | backup peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$results"

for size in $sizes; do
  db="$work/db-$size"
  repo="$work/repo-$size"
  keys=$(( size * 1048576 / value_size ))
  echo "== generating a $size MiB shard ($keys keys of $value_size bytes, half random)" >&2
  "$agent" load --db "$db" --keys "$keys" --value-size "$value_size" --random-fraction 0.5 >/dev/null
  sync
  read -r b_secs b_rss < <(timed "$agent" backup --db "$db" --repo "$repo" --json)
  manifest="$work/last.out"
  bytes=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["stats"]["bytes_total"])' "$manifest")
  pause_us=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["max_gate_closed_us"])' "$manifest")
  read -r r_secs _ < <(timed "$agent" backup --db "$db" --repo "$repo" --json)
  re_uploaded=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["stats"]["bytes_uploaded"])' "$work/last.out")
  repo_bytes=$(du -sb "$repo" | cut -f1)
  read -r v_secs _ < <(timed "$agent" verify --repo "$repo" --full --backup latest)
  rm -rf "$work/restored-$size"
  read -r s_secs _ < <(timed "$agent" restore --repo "$repo" --backup latest --to "$work/restored-$size")
  printf '| %s MiB | %s | %.2f | %s | %s | %.3f | %.2f | %s B | %.2f | %.2f | %s | %s |\n' \
    "$size" "$(mib "$bytes")" "$b_secs" "$(rate "$bytes" "$b_secs")" "$(mib "$repo_bytes")" \
    "$(awk -v u="$pause_us" 'BEGIN { print u / 1000 }')" "$r_secs" "$re_uploaded" "$v_secs" \
    "$s_secs" "$(rate "$bytes" "$s_secs")" "$(( b_rss / 1024 ))" >>"$results"
  rm -rf "$db" "$repo" "$work/restored-$size" "$db.lockstep-captures"
done

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM; $(date -u +%Y-%m-%d)"
cat "$results"
