##@ Reference stack (primary + 2 replicas + the app's three services; STACK=docker|local)

# STACK=docker: docker-compose.yml (images built locally FROM debian:trixie-slim, which is
#               pulled, or built with debootstrap where no registry answers: compose/baseimage.py).
# STACK=local:  the same topology as processes on this machine (`python -m native`: the local
#               PostgreSQL binaries and the app under gunicorn from .venv), same ports.
# Default: local if the native stack runs (a node's postmaster.pid names a live process), else
# docker if a Docker engine and Compose v2 answer, else local: after `make up STACK=local`, the
# other targets need no STACK. Only probed when a stack target is asked for, so other targets
# never wait for the Docker daemon.
NATIVE_BASEDIR ?= $(ROOT)/.stack/native
STACK_GOALS := up down ps logs kill-replica start-replica kill-primary start-primary psql clean \
               replication-status promote rejoin lag-replica stall resume
ifneq ($(filter $(STACK_GOALS),$(MAKECMDGOALS)),)
NATIVE_RUNS := $(shell for f in $(NATIVE_BASEDIR)/*/postmaster.pid; do \
                 [ -f "$$f" ] && kill -0 "$$(head -n 1 "$$f")" 2>/dev/null && echo yes && break; done)
STACK ?= $(if $(NATIVE_RUNS),local,$(shell docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 && echo docker || echo local))
STACK := $(STACK)
ifeq ($(filter $(STACK),docker local),)
$(error STACK must be docker or local, not '$(STACK)')
endif
endif

COMPOSE := docker compose -f $(ROOT)/docker-compose.yml
NATIVE := cd $(ROOT) && $(VPY) -m native
# stackctl.py is standard library only: the venv's python if there is one, else python3.
STACK_PY = $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))
STACKCTL = $(STACK_PY) $(ROOT)/compose/stackctl.py
STACK_WAIT ?= 240
REPLICA ?= replica1
NODE ?= primary
# lag-replica: how long WAL replay stays paused (a make variable; the shell's own $SECONDS is
# never used in a recipe)
SECONDS ?= 10
SERVICE ?=
# APP_PY_DEPS=wheelhouse builds the app image from ./wheelhouse (pinned gunicorn/psycopg2 wheels,
# fetched on the host by `make wheelhouse`) instead of Debian's python3-psycopg2 and gunicorn.
APP_PY_DEPS ?= debian
export APP_PY_DEPS
# The app image's wheels: the versions pinned for the test venv, plus pip to install them with.
WHEELHOUSE_REQS ?= $(shell grep -hE '^(gunicorn|psycopg2-binary)==' $(ROOT)/requirements-test.txt 2>/dev/null) pip
WHEELHOUSE_STAMP := $(ROOT)/wheelhouse/.stamp-$(shell echo '$(WHEELHOUSE_REQS)' | cksum | cut -d' ' -f1)

# Prerequisite checks (shell snippets).
define check_compose
	@docker info >/dev/null 2>&1 || { echo "error: no Docker engine answers (docker info); use STACK=local" >&2; exit 1; }
	@docker compose version >/dev/null 2>&1 || { echo "error: Docker Compose v2 (\`docker compose\`) is required" >&2; exit 1; }
endef
# Every image is built FROM debian:trixie-slim: present, else pulled, else built with debootstrap.
define check_base_image
	@$(STACK_PY) $(ROOT)/compose/baseimage.py ensure
endef
define check_replica
	@case "$(REPLICA)" in replica1|replica2) ;; *) echo "error: REPLICA must be replica1 or replica2" >&2; exit 2;; esac
endef
# After a promotion any node may be a replica: promote/lag-replica take any node name.
define check_node
	@case "$($(1))" in primary|replica1|replica2) ;; *) echo "error: $(1) must be primary, replica1 or replica2" >&2; exit 2;; esac
endef
# The topology procedures (topology/): the same subcommands in both stacks' CLIs.
TOPOLOGY_CLI = $(if $(filter local,$(STACK)),$(NATIVE),$(STACKCTL))
# The node that is the primary now (topology state; `primary` in the initial topology).
CURRENT_PRIMARY = $(TOPOLOGY_CLI) current-primary

.PHONY: up down ps logs kill-replica start-replica kill-primary start-primary psql clean \
        replication-status promote rejoin lag-replica stall resume wheelhouse

up: $(if $(filter local,$(STACK)),venv) ## build and start the stack in the initial topology, wait until replicas stream and apps answer, print URLs
ifeq ($(STACK),local)
	$(NATIVE) up
else
	$(check_compose)
	$(check_base_image)
	@if [ "$(APP_PY_DEPS)" = wheelhouse ]; then $(MAKE) --no-print-directory wheelhouse; fi
	@echo "==> building images (postgres, app: Python deps from $(APP_PY_DEPS), nginx)"
	$(COMPOSE) build
	$(COMPOSE) up -d
	@echo "==> waiting for both replicas to stream and every app to answer /healthz"
	@$(STACKCTL) wait --timeout $(STACK_WAIT)
	@$(STACKCTL) restore
	@$(STACKCTL) urls
endif

down: ## stop and remove the stack's containers (data volumes are kept)
ifeq ($(STACK),local)
	$(NATIVE) down
else
	$(COMPOSE) down
endif

clean: ## stop the stack and delete its data and topology state (docker: down -v; local: down --purge)
ifeq ($(STACK),local)
	$(NATIVE) down --purge
else
	$(COMPOSE) down -v --remove-orphans
endif

ps: ## show the stack's nodes and services
ifeq ($(STACK),local)
	-$(NATIVE) status
else
	$(COMPOSE) ps --all
endif

logs: ## follow the logs (SERVICE=name for one service; Ctrl-C to stop)
ifeq ($(STACK),local)
	tail -n 100 -F $(if $(SERVICE),$(NATIVE_BASEDIR)/log/$(SERVICE).log,$(NATIVE_BASEDIR)/log/*.log)
else
	$(COMPOSE) logs -f --tail=100 $(SERVICE)
endif

replication-status: ## which node is primary, its timeline, each replica's upstream and lag (bytes, seconds), slots
ifeq ($(STACK),local)
	@$(NATIVE) replication
else
	@$(STACKCTL) status
endif

promote: $(if $(filter local,$(STACK)),venv) ## make REPLICA the primary (pg_promote); a running primary is stopped first (switchover); the other replica follows
	$(call check_node,REPLICA)
	@$(TOPOLOGY_CLI) promote $(REPLICA)

rejoin: $(if $(filter local,$(STACK)),venv) ## bring NODE (default primary, a former primary) back as a replica of the new one, with pg_rewind
	$(call check_node,NODE)
	@$(TOPOLOGY_CLI) rejoin $(NODE)

lag-replica: $(if $(filter local,$(STACK)),venv) ## pause WAL replay on REPLICA for SECONDS (default 10), then resume and wait until it caught up
	$(call check_node,REPLICA)
	@$(TOPOLOGY_CLI) lag-replica $(REPLICA) --seconds $(SECONDS)

kill-replica: ## SIGKILL a replica (REPLICA=replica1|replica2, default replica1)
	$(check_replica)
ifeq ($(STACK),local)
	$(NATIVE) kill $(REPLICA)
else
	$(COMPOSE) kill -s SIGKILL $(REPLICA)
endif

start-replica: ## start a killed/stopped replica and wait until it streams again (no re-clone)
	$(check_replica)
ifeq ($(STACK),local)
	$(NATIVE) start $(REPLICA)
else
	$(COMPOSE) start $(REPLICA)
	@$(STACKCTL) wait --timeout 60 --services primary $(REPLICA)
endif

kill-primary: ## SIGKILL the current primary (reads continue on the replicas, writes fail fast); then start-primary or promote
ifeq ($(STACK),local)
	$(NATIVE) kill $$($(CURRENT_PRIMARY))
else
	$(COMPOSE) kill -s SIGKILL $$($(CURRENT_PRIMARY))
endif

start-primary: ## start the current primary again (after kill-primary) and wait until the replicas stream from it
ifeq ($(STACK),local)
	$(NATIVE) start $$($(CURRENT_PRIMARY))
else
	$(COMPOSE) start $$($(CURRENT_PRIMARY))
	@$(STACKCTL) wait --timeout 90 --services primary replica1 replica2
endif

stall: ## SIGSTOP every process of NODE (docker pause): a stalled server, whose kernel still ACKs; then resume
	$(call check_node,NODE)
ifeq ($(STACK),local)
	$(NATIVE) stall $(NODE)
else
	$(COMPOSE) pause $(NODE)
endif

resume: ## SIGCONT a stalled NODE (docker unpause)
	$(call check_node,NODE)
ifeq ($(STACK),local)
	$(NATIVE) resume $(NODE)
else
	$(COMPOSE) unpause $(NODE)
endif

psql: ## psql as the superuser on NODE (primary, replica1, replica2; default primary)
	@case "$(NODE)" in primary|replica1|replica2) ;; *) echo "error: NODE must be primary, replica1 or replica2" >&2; exit 2;; esac
ifeq ($(STACK),local)
	$(NATIVE) psql $(NODE)
else
	$(COMPOSE) exec $(NODE) psql -d $(APP_DB)
endif

wheelhouse: $(WHEELHOUSE_STAMP) ## download the app image's pinned wheels into ./wheelhouse (for APP_PY_DEPS=wheelhouse)

$(WHEELHOUSE_STAMP):
	@echo "==> downloading $(WHEELHOUSE_REQS) for CPython 3.13 manylinux x86_64 into wheelhouse/"
	@rm -rf $(ROOT)/wheelhouse && mkdir -p $(ROOT)/wheelhouse
	$(STACK_PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
		--python-version 3.13 --implementation cp --abi cp313 --abi abi3 --abi none \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
		-d $(ROOT)/wheelhouse $(WHEELHOUSE_REQS)
	@touch $@
	@ls $(ROOT)/wheelhouse
