# The automation entry point. The two commands the README promises:
#   make demo   services + ingester + two agents in two regions + a region table from SQL
#   make test   services + every test (unit, golden, end-to-end) + lint + the no_std build
.PHONY: test demo services services-down lint embedded fmt bench-probe

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
	cargo test --workspace --locked 2>&1 | tee target/test-output.log
	$(MAKE) lint embedded
	@awk '/^test result:/ { p += $$4; f += $$6 } END { if (p == 0) { print "no tests ran"; exit 1 } printf "tests: %d passed, %d failed\n", p, f }' target/test-output.log

demo:
	tests/demo

fmt:
	cargo fmt --all

# Probe engine benchmark (not a test): timing accuracy, throughput at 1/64/1024 concurrent probes,
# and blackbox_exporter in the same run. Writes target/bench/probe.txt.
bench-probe:
	bench/probe
