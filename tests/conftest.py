"""Shared fixtures."""
import pytest


@pytest.fixture(scope="session")
def bagel_release(tmp_path_factory):
    """A tiny BAGEL release (chain tokenizer, `tiny` preset, fresh weights and autoencoder); copy before writing."""
    from bagel_release import make_release

    return make_release(tmp_path_factory.mktemp("bagel") / "release")
