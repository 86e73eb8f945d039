# The automation entry point. The two commands the README promises:
#   make demo   services + ingester + two agents in two regions + a region table from SQL, then
#               the dashboard's URL; runs until Ctrl-C (DEMO_ONCE=1: stops there)
#   make test   services + every test (unit, golden, end-to-end) + lint + the no_std build
.PHONY: test demo services services-down lint embedded fmt bench-probe bench-memory bench-storage

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Every end-to-end test needs these running; `up` is idempotent and cheap when they are.
services:
	tests/services/up

services-down:
	tests/services/down

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# proto must build for a Cortex-M0 (no std, no alloc).
embedded:
	rustup target add thumbv6m-none-eabi
	cargo build -p vantage-proto --target thumbv6m-none-eabi --locked

# The last line is the total over every cargo test binary, e.g. "tests: 42 passed, 0 failed".
test: services
	mkdir -p target
	$(MAKE) cross-test-build
	cargo build --bins --locked
	cargo test --workspace --locked 2>&1 | tee target/test-output.log
	$(MAKE) test-crash 2>&1 | tee -a target/test-output.log
	$(MAKE) lint embedded fuzz
	@awk '/^test result:/ { p += $$4; f += $$6 } END { if (p == 0) { print "no tests ran"; exit 1 } printf "tests: %d passed, %d failed\n", p, f }' target/test-output.log

demo:
	tests/demo

# Coverage-guided fuzzing of every wire-format decoder (libFuzzer via cargo-bolero, stable
# toolchain): a short run in `make test`; the long one is FUZZ_RUNS=10000000 make fuzz.
# Writes target/bench/fuzz.txt.
.PHONY: fuzz
fuzz:
	tests/fuzz

fmt:
	cargo fmt --all

# Alert benchmark (not a test, issue #16): evaluation cost at 10,000 targets x 10 regions and
# detection latency (probe 1 s, evaluation 1 s) over 20 outages. Writes target/bench/alerts.txt.
.PHONY: bench-alerts
bench-alerts: services
	cargo run --release --locked -p vantage-tests --bin bench-alerts

# Dashboard benchmark (not a test, issue #17): server time p50/p99 of 50 requests for the
# overview and a target page at 24 h and 30 d, bytes per page, time to a rendered chart in
# Chromium, on the storage benchmark's data (bench-storage --keep fills schema bench_web when it
# is empty; BENCH_WEB_RESULTS results, default 10 million). Writes target/bench/web.txt.
.PHONY: bench-web
BENCH_WEB_RESULTS ?= 10000000
bench-web: services
	cargo build --release --locked -p vantage-tests --bin bench-storage --bin bench-web
	target/release/bench-web --results $(BENCH_WEB_RESULTS)

# Probe engine benchmark (not a test): timing accuracy, throughput at 1/64/1024 concurrent probes,
# and blackbox_exporter in the same run. Writes target/bench/probe.txt.
bench-probe:
	bench/probe

# Body-memory benchmark (not a test): peak RSS of the agent under 64 concurrent 5 MB bodies,
# with and without probes.memory_budget. Writes target/bench/memory.txt.
bench-memory:
	bench/memory

# Spool benchmark (not a test, issue #18): bytes written to disk per result (over the result's
# version 3 wire size), write syscalls per flush and per second (/proc/self/io) and fsyncs at
# 100 targets / 10 s, per uplink.spool_fsync policy (30 s each, real time).
# Writes target/bench/spool.txt. A dev build: the figures are counts of bytes and calls, not CPU.
.PHONY: bench-spool
bench-spool:
	cargo run --locked -p vantage-tests --bin bench-spool

# --- Raspberry Pi and microcontrollers (cross/README.md) --------------------------------------
.PHONY: cross-install cross-build deb cross-test-build embedded-run cross-build-zig bench-size \
	bench-footprint

# Rust targets, cross gcc, qemu-user and qemu-system-arm, dpkg tools; idempotent.
cross-install:
	cross/install

# vantage-agent for aarch64-unknown-linux-musl and armv7-unknown-linux-gnueabihf, profile `dist`.
cross-build:
	cross/build

# vantage-agent .deb packages for arm64, armhf and amd64 (profile `dist`) into target/deb.
deb:
	cross/package

# The vantage-ingester .deb for amd64 servers (profile `dist`) into target/deb.
.PHONY: deb-ingester
deb-ingester:
	cross/package-ingester

# What tests/arm.rs runs (part of `make test`): quick-profile arm64/armhf packages, and proto's
# no_std example built and run for a Cortex-M0 and, with defmt, a Cortex-M4F.
cross-test-build:
	cross/package --profile armtest --out target/cross/deb-test \
		--target aarch64-unknown-linux-musl --target armv7-unknown-linux-gnueabihf
	cross/embedded

embedded-run:
	cross/embedded

# Opt-in, not in `make test`: the ARMv6 (Pi 1 / Zero) static musl agent, built with zig and
# nightly -Z build-std (about 4 minutes); other targets: cross/build-zig TARGET... (cross/README.md).
cross-build-zig:
	cross/build-zig arm-unknown-linux-musleabihf

# Stripped agent sizes per target and opt-level; writes target/bench/size.txt. Not in `make test`.
bench-size:
	cross/bench-size

# RSS, CPU and writes of the agent with and without its spool vs blackbox_exporter at
# 10/100/1000 targets, in one run; writes target/bench/footprint.txt. Not in `make test`
# (about 6 minutes).
bench-footprint: services
	cross/bench-footprint

# --- Delivery (tests/delivery.rs, README "Delivery") -----------------------------------------
.PHONY: test-crash bench-ingest

# The crash tests, which restart, kill -9 or freeze the shared services, so they run alone,
# after the other tests (part of `make test`, 5 to 10 minutes): >= 50,000 results from 4
# simulated agents while bridges and sinks are kill -9ed and Mosquitto, PostgreSQL and Kafka
# restart; kill -9 of PostgreSQL, of Kafka and of Mosquitto during load (one run each, each
# prints its "compared:" line); a bridge whose librdkafka producer loses every broker; the
# rebalance commit while Kafka hangs; storage upkeep across a PostgreSQL restart; the sink's
# shutdown while Kafka hangs; sink and bridge stopped while PostgreSQL or Kafka is down. No
# retry: a failure fails the build.
test-crash: services
	cargo build --bins --locked
	cargo test -p vantage-tests --test delivery --locked -- --ignored --test-threads=1 --nocapture
	cargo test -p vantage-tests --test storage --locked -- --ignored --test-threads=1 --nocapture
	cargo test -p vantage-tests --test shutdown --locked -- --ignored --test-threads=1 --nocapture

# Ingest benchmark (not a test): bytes per result vs JSON, COPY vs unnest, MQTT -> PostgreSQL
# throughput with the row-per-INSERT and psql COPY baselines, latency at 5,000 results/s.
# Release build; writes target/bench/ingest.txt (about 3 minutes).
bench-ingest: services
	bench/ingest

# Storage benchmark (not a test): 10 million synthetic results, rollups vs raw vs a naive table,
# bytes per result, retention. Writes target/bench/storage.txt. Takes several minutes.
bench-storage: services
	cargo build --release --locked -p vantage-tests --bin bench-storage
	target/release/bench-storage
