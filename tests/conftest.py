import logging
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def pytest_collection_modifyitems(config, items):
    # Tests under tests/unit are `unit` unless marked otherwise; the directory names the layer.
    for item in items:
        path = pathlib.Path(str(item.fspath))
        for layer in ("unit", "integration", "e2e"):
            if layer in path.parts and not item.get_closest_marker(layer):
                item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def fixtures():
    return FIXTURES


@pytest.fixture
def package_logger():
    """The "domubackup" logger, put back as it was after the test (logs.setup(), which cli.main
    calls, replaces its handlers and stops its propagation)."""
    logger = logging.getLogger("domubackup")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield logger
    logger.handlers, logger.propagate = handlers, propagate
    logger.setLevel(level)
