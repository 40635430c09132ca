import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the Stack helper module beside this file

from e2e_stack import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The whole embedded stack, serving included, on its own local Ray: one for every module
    here (each uses its own tenants), started once."""
    s = Stack(tmp_path_factory.mktemp("stack"))
    s.start()
    yield s
    s.stop()
