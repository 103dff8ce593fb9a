# The project's commands. `make help` lists them; each target's `##` comment is its help line.
# Targets live in mk/*.mk, one file per concern (tests, the stack, load tests, benchmarks).

SHELL := /bin/bash
.DEFAULT_GOAL := help
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
PYTHON ?= python3
VENV := $(ROOT)/.venv
VPY := $(VENV)/bin/python
# Defined here, not in mk/test.mk: mk/bench.mk sorts first, and a prerequisite is expanded as its
# rule is read, so there it would be empty and `make bench` would skip creating the venv.
VENV_STAMP := $(VENV)/.installed-$(shell cat $(ROOT)/requirements-test.txt | cksum | cut -d' ' -f1)

# Local defaults (ports, credentials, sizing) shared with docker compose. The environment wins:
# a plain `include .env` would make the file's values beat it (so `PRIMARY_PORT=25432 make up`
# would still use 15432). Each KEY of .env is set from the file only if neither the environment
# nor the command line set it; `:=` keeps a `$` in a value literal. `make env` shows the result.
ENV_KEYS := $(shell sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' $(ROOT)/.env)
$(foreach key,$(ENV_KEYS),$(if $(filter undefined default,$(origin $(key))),\
	$(eval $(key) := $$(shell sed -n 's/^[[:space:]]*$(key)=//p' $(ROOT)/.env))))
export

include $(sort $(wildcard $(ROOT)/mk/*.mk))

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2} /^##@/ {printf "\n%s\n", substr($$0, 5)}' $(MAKEFILE_LIST)

.PHONY: env
env: ## the effective settings: .env overlaid by the environment (passwords masked)
	@sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' $(ROOT)/.env | while read -r key; do \
		case $$key in *PASSWORD*) printf '%s=***\n' "$$key";; *) printf '%s=%s\n' "$$key" "$${!key}";; esac; \
	done
