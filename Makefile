# Entry points. `make demo` runs the main job end to end; `make test` is what CI runs.
# The cargo target directory lives outside the clone so CI runs and later sessions reuse the
# RocksDB build (about 20 minutes cold on 2 cores; compiled once for clippy and the tests).

export CARGO_TARGET_DIR ?= $(HOME)/.cache/lockstep-target
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# Demo and bench use the test build: our crates at opt-level 1, every dependency (RocksDB, zstd,
# sha2, object_store) at opt-level 2, so `make demo` after `make test` compiles nothing.
BIN := $(CARGO_TARGET_DIR)/debug

.PHONY: deps build test demo bench sim fuzz fmt

## deps: install what a fresh Debian machine lacks (libclang for the RocksDB bindings, moto for S3 tests)
deps:
	@bash scripts/deps.sh

## build: the binaries (lockstep, lockstep-agent)
build: deps
	cargo build --workspace --bins

## test: format check, clippy with -D warnings, every test
test: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo build --workspace --bins
	LOCKSTEP_BIN_DIR=$(CARGO_TARGET_DIR)/debug cargo test --workspace -- --test-threads=2 2>&1 | tee $(CARGO_TARGET_DIR)/make-test.log
	@awk '/^test result:/ { passed += $$4; failed += $$6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' $(CARGO_TARGET_DIR)/make-test.log

## demo: a RAID5 cluster of 3 agents and a coordinator, backups under writes, a disaster, a verified restore
demo: build
	@$(BIN)/lockstep demo

## bench: Lockstep against RocksDB's BackupEngine on the same data, disk and threads (under 20 minutes on 2 cores)
bench: build
	$(BIN)/lockstep-bench run --bin-dir $(BIN) --work $(CARGO_TARGET_DIR)/bench-work --out bench/results $(BENCH_ARGS)

## sim: a longer simulation sweep, SEEDS per scenario (default 500); violations per scenario
sim:
	cargo build -p lockstep-simulations --bins
	$(BIN)/lockstep-sim $(or $(SEEDS),500)

## fuzz: the decoders' property tests (objects, sealed objects and records, WAL segments, manifests, ids, certificates' identities, token files, wire requests, the configuration) with CASES each (default 200000)
fuzz:
	LOCKSTEP_FUZZ_CASES=$(or $(CASES),200000) cargo test -p lockstep-repository --test decoders
	LOCKSTEP_FUZZ_CASES=$(or $(CASES),200000) cargo test -p lockstep-proto --test identities
	LOCKSTEP_FUZZ_CASES=$(or $(CASES),200000) cargo test -p lockstep-proto --test wire
	LOCKSTEP_FUZZ_CASES=$(or $(CASES),200000) cargo test -p lockstep-coordinator --test config

fmt:
	cargo fmt --all
