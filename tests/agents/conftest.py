from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog():
    """Tests that run the CLI in-process configure structlog; later tests start from the defaults again."""
    yield
    structlog.reset_defaults()
