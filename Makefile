# ssm-proxy: common tasks. `make test` and `make demo` set up a fresh Debian
# machine themselves (as root).
CARGO ?= cargo

.PHONY: build test test-only demo demo-forward lint fmt check-macos fuzz bench bench-tunnel dist clean

build:
	$(CARGO) build --workspace --locked

# Everything CI runs: unit, property, pair-harness and end-to-end tests.
test:
	bash scripts/ensure-deps.sh
	$(CARGO) build --workspace --locked --bins
	$(CARGO) test --workspace --locked

# The tunnel end to end in network namespaces (root).
demo:
	bash scripts/demo.sh

# `ssm-proxy forward` against the emulator on loopback (no root needed).
demo-forward:
	bash scripts/demo-forward.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

# Type-check for aarch64/x86_64 macOS from Linux (see the script for costs).
check-macos:
	bash scripts/check-macos.sh

# FUZZ_SECONDS per target; cargo-fuzz needs nightly features (RUSTC_BOOTSTRAP on stable).
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in frame_decode smux_deframe session_input wire_deframe agent_input; do \
		mkdir -p corpus/$$t; seeds=$$( [ -d seeds/$$t ] && echo seeds/$$t ); \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t corpus/$$t $$seeds -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

bench:
	$(CARGO) bench -p ssm-channel --bench codec
	$(CARGO) bench -p ssm-proxy --bench forward

# The tunnel against direct routing and OpenVPN (TCP) in the namespace lab (root).
bench-tunnel:
	$(CARGO) build --release --locked --bins
	python3 scripts/bench_tunnel.py

# Static release binaries for x86_64 and aarch64 Linux in dist/, with SHA256SUMS.
dist:
	bash scripts/dist.sh

clean:
	$(CARGO) clean
	rm -rf dist
