# The automation entry point. The two commands the README promises:
#   make demo   services + ingester + two agents in two regions + a region table from SQL
#   make test   services + every test (unit, golden, end-to-end) + lint + the no_std build
.PHONY: test demo services services-down lint unit e2e embedded fmt

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

test: services
	cargo test --workspace --locked
	$(MAKE) lint embedded

demo:
	tests/demo

fmt:
	cargo fmt --all
