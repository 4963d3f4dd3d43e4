import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist import Pools  # noqa: E402


@pytest.fixture(scope="session")
def ranks():
    """``ranks.run(world, fn, *args)`` runs fn on every rank of a gloo group; returns the list of results."""
    pools = Pools()
    yield pools
    pools.close()
