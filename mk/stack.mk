##@ Reference stack (primary + 2 replicas + the app's three services; STACK=docker|local)

# STACK=docker: docker-compose.yml (images built locally FROM debian:trixie-slim).
# STACK=local:  the same topology as processes on this machine (`python -m native`: the local
#               PostgreSQL binaries and the app under gunicorn from .venv), same ports.
# Default: docker if a Docker engine and Compose v2 answer, else local. Only probed when a
# stack target is asked for, so other targets never wait for the Docker daemon.
STACK_GOALS := up down ps logs kill-replica start-replica kill-primary start-primary psql clean \
               replication-status
ifneq ($(filter $(STACK_GOALS),$(MAKECMDGOALS)),)
STACK ?= $(shell docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 && echo docker || echo local)
STACK := $(STACK)
ifeq ($(filter $(STACK),docker local),)
$(error STACK must be docker or local, not '$(STACK)')
endif
endif

COMPOSE := docker compose -f $(ROOT)/docker-compose.yml
NATIVE := cd $(ROOT) && $(VPY) -m native
NATIVE_BASEDIR ?= $(ROOT)/.stack/native
# stackctl.py is standard library only: the venv's python if there is one, else python3.
STACK_PY = $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))
STACKCTL = $(STACK_PY) $(ROOT)/compose/stackctl.py
STACK_WAIT ?= 240
REPLICA ?= replica1
NODE ?= primary
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
define check_base_image
	@docker image inspect debian:trixie-slim >/dev/null 2>&1 || { echo "error: base image debian:trixie-slim is missing: every image here is built FROM it and nothing is pulled; create it (.ci/install-docker.sh imports one with debootstrap)" >&2; exit 1; }
endef
define check_replica
	@case "$(REPLICA)" in replica1|replica2) ;; *) echo "error: REPLICA must be replica1 or replica2" >&2; exit 2;; esac
endef

.PHONY: up down ps logs kill-replica start-replica kill-primary start-primary psql clean \
        replication-status wheelhouse

up: $(if $(filter local,$(STACK)),venv) ## build and start the stack, wait until replicas stream and apps answer, print URLs
ifeq ($(STACK),local)
	$(NATIVE) up
else
	$(check_compose)
	$(check_base_image)
	@if [ "$(APP_PY_DEPS)" = wheelhouse ]; then $(MAKE) --no-print-directory wheelhouse; fi
	@echo "==> building images (postgres, app: Python deps from $(APP_PY_DEPS))"
	$(COMPOSE) build
	$(COMPOSE) up -d
	@echo "==> waiting for both replicas to stream and every app to answer /healthz"
	@$(STACKCTL) wait --timeout $(STACK_WAIT)
	@$(STACKCTL) urls
endif

down: ## stop and remove the stack's containers (data volumes are kept)
ifeq ($(STACK),local)
	$(NATIVE) down
else
	$(COMPOSE) down
endif

clean: ## stop the stack and delete its data (docker: down -v; local: down --purge)
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

replication-status: ## pg_stat_replication and slot state on the primary
ifeq ($(STACK),local)
	$(NATIVE) replication
else
	@$(COMPOSE) exec -T primary psql -X -q -d postgres -c "SELECT s.slot_name, coalesce(r.state, 'inactive') AS state, r.application_name, r.client_addr, s.wal_status, r.sent_lsn, r.replay_lsn, r.replay_lag FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid ORDER BY 1"
endif

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

kill-primary: ## SIGKILL the primary (reads continue on the replicas, writes fail fast)
ifeq ($(STACK),local)
	$(NATIVE) kill primary
else
	$(COMPOSE) kill -s SIGKILL primary
endif

start-primary: ## start the primary again and wait until both replicas stream from it
ifeq ($(STACK),local)
	$(NATIVE) start primary
else
	$(COMPOSE) start primary
	@$(STACKCTL) wait --timeout 90 --services primary replica1 replica2
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
