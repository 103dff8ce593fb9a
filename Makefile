# The project's commands. `make help` lists them; each target's `##` comment is its help line.
# Targets live in mk/*.mk, one file per concern (tests, the stack, load tests, benchmarks).

SHELL := /bin/bash
.DEFAULT_GOAL := help
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
PYTHON ?= python3
VENV := $(ROOT)/.venv
VPY := $(VENV)/bin/python

# Local defaults (ports, credentials, sizing) shared with docker compose; the environment wins.
include $(ROOT)/.env
export

include $(sort $(wildcard $(ROOT)/mk/*.mk))

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2} /^##@/ {printf "\n%s\n", substr($$0, 5)}' $(MAKEFILE_LIST)
