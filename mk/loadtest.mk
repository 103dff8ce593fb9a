##@ Load tests (Locust; need a running stack: `make up`; docs/loadtest.md)

# Knobs: USERS and DURATION (s) for the failover and lag runs, STEP (s per step) and STEPS (user
# counts) for the scaling curves, TARGET (replica|primary|promote) for loadtest-failover, SECONDS
# (how long replica1's replay stays paused, as for `make lag-replica`; mk/stack.mk, default 10) for
# loadtest-lag, APP and WORKERS for the distributed run, MODES (pooled apps) for loadtest-outage. LOADTEST_ARGS passes anything else to `python -m loadtest run`, e.g.
# LOADTEST_ARGS="--tags read". STACK=docker|local picks the stack (default: whichever is up).
USERS ?= 8
DURATION ?= 40
STEP ?= 10
STEPS ?= 4,8,16,32,64
TARGET ?= replica
APP ?= threaded
MODES ?= process
WORKERS ?= 2
LOADTEST_ARGS ?=
LOADTEST := cd $(ROOT) && $(VPY) -m loadtest run
# The wheels of the Locust image, for the container's CPython 3.13 (trixie), made on the host:
# PyPI cannot be reached from inside a build here.
LOADTEST_WHEELS := $(ROOT)/compose/loadtest/wheelhouse
LOADTEST_LOCUST := locust==2.47.0

.PHONY: loadtest loadtest-scaling loadtest-failover loadtest-lag loadtest-outage loadtest-image loadtest-distributed

loadtest: venv ## scaling (3 targets, STEPS users, STEP s each) + replica and primary failover (USERS, DURATION s); ~6 min
	$(LOADTEST) scaling failover --target replica,primary --steps $(STEPS) --step-seconds $(STEP) \
		--users $(USERS) --duration $(DURATION) $(LOADTEST_ARGS)

loadtest-scaling: venv ## only the scaling curves: threaded, process, nopool at STEPS users, STEP s each
	$(LOADTEST) scaling --steps $(STEPS) --step-seconds $(STEP) $(LOADTEST_ARGS)

loadtest-failover: venv ## TARGET=replica|primary: kill and restart under load; TARGET=promote: kill the primary, promote replica1, rejoin (async, then SYNC=on)
	$(LOADTEST) failover --target $(TARGET) --users $(USERS) --duration $(DURATION) $(LOADTEST_ARGS)

loadtest-lag: venv ## write-then-read-back load on both pooled apps, replica1's replay paused SECONDS s (default 10) mid-run: stale reads with and without the token
	$(LOADTEST) lag --users $(USERS) --duration $(DURATION) --lag-seconds $(SECONDS) $(LOADTEST_ARGS)

loadtest-outage: venv ## one outage, every app worker (MODES=process, or process,threaded): the primary killed, started, stalled, and again with fresh workers; replica1 killed and started; ~2 min a mode
	cd $(ROOT) && $(VPY) -m loadtest outage --modes $(MODES)

$(LOADTEST_WHEELS)/.done: | venv
	@echo "==> downloading $(LOADTEST_LOCUST) wheels for CPython 3.13 into $(LOADTEST_WHEELS)"
	$(VPY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
		--python-version 3.13 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux1_x86_64 -d $(LOADTEST_WHEELS) $(LOADTEST_LOCUST) pip
	@touch $@

loadtest-image: $(LOADTEST_WHEELS)/.done ## build the Locust image (locust-master/-worker) from the wheelhouse
	@cd $(ROOT) && docker compose --profile loadtest config --services 2>/dev/null | grep -qx locust-master || \
		{ echo "error: docker-compose.yml does not include compose/loadtest.compose.yml" \
		       "(add: include: [compose/loadtest.compose.yml])" >&2; exit 1; }
	cd $(ROOT) && docker compose --profile loadtest build locust-master

loadtest-distributed: venv loadtest-image ## scaling against APP=threaded|process|nopool with Locust as master + WORKERS workers in compose
	$(LOADTEST) scaling --distributed $(WORKERS) --targets $(APP) --steps $(STEPS) \
		--step-seconds $(STEP) $(LOADTEST_ARGS)
