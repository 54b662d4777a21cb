"""pytest configuration: the `slow` marker and the --slow switch.

`python -m pytest` runs the fast suite; `python -m pytest --slow` (README's test
command, and CI) runs everything, including real-model tests.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model or long tests; run with --slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
