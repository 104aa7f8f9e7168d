# Fluidity: `make run` starts the one-machine tunnel; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit install clean bench bench-longpath bench-smoke bench-deps lint-deploy image \
	test-deps soak fuzz-long load

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench,aws]'
	touch $(STAMP)

install: $(STAMP)

## run: install into .venv, create certs if missing, start server + agent on loopback
run: $(STAMP)
	$(BIN)/fluidity up

## lint: ruff and mypy
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

## test: lint, the benchmark harness's smoke run, then the whole pytest suite
test: lint lint-deploy bench-smoke test-deps
	$(BIN)/pytest -q

## test-deps: Debian packages the tests drive (chromium for tests/browser; prlimit, curl)
test-deps:
	@command -v chromium >/dev/null && command -v prlimit >/dev/null && command -v curl >/dev/null \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	       --no-install-recommends chromium util-linux curl; }

## soak: 10 minutes of mixed traffic; RSS and open fds every 10 s, slope after warm-up
soak: $(STAMP)
	$(BIN)/python -m tests.load.soak --seconds 600 --interval 10 --warmup 120

## fuzz-long: each atheris harness for FUZZ_SECONDS (default 600) seconds
FUZZ_SECONDS ?= 600
fuzz-long: $(STAMP)
	@mkdir -p test-artifacts/fuzz/frames test-artifacts/fuzz/session test-artifacts/fuzz/http
	cd test-artifacts/fuzz && ../../$(BIN)/python ../../tests/fuzz/fuzz_frames.py \
	  -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 frames
	cd test-artifacts/fuzz && ../../$(BIN)/python ../../tests/fuzz/fuzz_session.py \
	  -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 session
	cd test-artifacts/fuzz && ../../$(BIN)/python ../../tests/fuzz/fuzz_http.py \
	  -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 http

## load: 10,000 concurrent tunnels held 30 s, then used (the `slow` tests)
load: $(STAMP)
	$(BIN)/pytest -q -s -m slow tests/load

## bench-deps: the Debian packages the benchmark chains need (installed only if missing)
BENCH_DEBS := nginx-light tinyproxy squid stunnel4 openssh-server openssh-client wrk curl
bench-deps:
	@for c in nginx tinyproxy squid stunnel4 sshd ssh wrk curl; do \
	  command -v $$c >/dev/null || [ -x /usr/sbin/$$c ] || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_DEBS); fi

## bench: Fluidity against direct, tinyproxy, squid, stunnel, ssh -L, pproxy (~15 min)
bench: $(STAMP) bench-deps
	$(BIN)/python -m bench

## bench-longpath: one download per chain over a 40 ms relay (window growth vs fixed; ~3 min);
## LONGPATH_ARGS="--rate 50 --size 64" adds a 50 MB/s bottleneck (the queue a download keeps)
LONGPATH_ARGS ?=
bench-longpath: $(STAMP) bench-deps
	$(BIN)/python -m bench.longpath $(LONGPATH_ARGS)

## bench-smoke: every benchmark chain moves bytes correctly (seconds; no timing asserted)
bench-smoke: $(STAMP) bench-deps
	$(BIN)/python -m bench --smoke
	$(BIN)/python -m bench --smoke --chains direct,fluidity --baseline .

## lint-deploy: cfn-lint, checkov, hadolint and shellcheck over deployments/ and scripts/
CHECKOV := $(VENV)/tools/checkov/bin/checkov
# checkov pins packaging<24, which pytest>=9 cannot share: it gets a virtualenv of its own.
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/pip install --quiet 'checkov>=3.2,<4'

# checkov does not evaluate resources that carry a Condition (the optional load balancer), so it
# also scans copies of the templates with the Condition lines removed. One process for all files.
lint-deploy: $(STAMP) $(CHECKOV)
	$(BIN)/cfn-lint deployments/cloudformation/*.yaml
	$(BIN)/hadolint deployments/docker/*.Dockerfile
	$(BIN)/shellcheck scripts/*.sh
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  cp deployments/cloudformation/*.yaml deployments/docker/*.Dockerfile $$tmp/ && \
	  for f in deployments/cloudformation/*.yaml; do \
	    sed '/^    Condition: /d' $$f > $$tmp/all-conditions-$$(basename $$f); done && \
	  $(CHECKOV) --quiet --compact --skip-download --framework cloudformation dockerfile \
	    -d $$tmp && echo "checkov: no failed checks"

## image: build the server image (needs a Docker engine; CI has none: tests install the wheel)
IMAGE ?= fluidity-server:latest
image:
	docker build --platform linux/amd64 -f deployments/docker/server.Dockerfile -t $(IMAGE) .

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
