##@ Tests

$(VENV_STAMP): $(ROOT)/requirements-test.txt
	@echo "==> creating $(VENV) with the pinned test requirements"
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install --quiet --disable-pip-version-check -r $(ROOT)/requirements-test.txt
	@rm -f $(VENV)/.installed-* && touch $@

.PHONY: venv test test-fast
venv: $(VENV_STAMP) ## create .venv with the pinned test requirements

test: venv ## run every test: unit, PostgreSQL, app, load-test smoke, Docker (skips if no engine)
	cd $(ROOT) && $(VPY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## only the tests that need neither PostgreSQL nor Docker
	cd $(ROOT) && $(VPY) -m pytest -m "not db and not docker" $(PYTEST_ARGS)
