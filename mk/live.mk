##@ Watching failover live, and slow clients (need a running stack: `make up`)

# WATCH_ARGS / DEMO_ARGS / SLOWLORIS_ARGS pass options through, e.g. WATCH_ARGS="--rate 50",
# DEMO_ARGS="--phase 5", SLOWLORIS_ARGS="--sockets 200 --seconds 30 --direct".
WATCH_ARGS ?=
DEMO_ARGS ?=
SLOWLORIS_ARGS ?=

.PHONY: watch demo slowloris

watch: venv ## live view: steady load on both pooled apps, endpoint states, events; Ctrl-C for the summary
	@cd $(ROOT) && $(VPY) -m watch watch $(WATCH_ARGS)

demo: venv ## the live view, scripted: kill replica1, start it, kill the primary, start it (~1 min)
	@cd $(ROOT) && $(VPY) -m watch demo $(DEMO_ARGS)

slowloris: venv ## 200 slow sockets per app; ordinary requests must stay answered, p99 < 100 ms (~25 s)
	@cd $(ROOT) && $(VPY) -m loadtest.slowloris $(SLOWLORIS_ARGS)
