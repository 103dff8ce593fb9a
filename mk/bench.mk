##@ Benchmarks

BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-$(shell cat $(ROOT)/requirements-bench.txt | cksum | cut -d' ' -f1)

$(BENCH_STAMP): $(VENV_STAMP) $(ROOT)/requirements-bench.txt
	@$(VPY) -m pip install --quiet --disable-pip-version-check -r $(ROOT)/requirements-bench.txt
	@rm -f $(VENV)/.bench-* && touch $@

.PHONY: bench
bench: $(BENCH_STAMP) ## pool vs pgdbpool, psycopg2, DBUtils, SQLAlchemy, psycopg_pool (BENCH_ARGS="--seconds 2 --rounds 3")
	cd $(ROOT) && $(VPY) -m bench.bench $(BENCH_ARGS)

.PHONY: bench-failures
bench-failures: venv ## failure behaviour measured: stalls, a black hole, NOTIFY, refusals, terminations, a stalled name server (~3 min)
	cd $(ROOT) && $(VPY) -m bench.failures $(BENCH_ARGS)
