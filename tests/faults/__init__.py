"""The fault suite (run alone: ``pytest -m faults``). A package, so its conftest is ``faults.conftest``
and never shadows tests/conftest.py for modules that ``from conftest import ...``."""
