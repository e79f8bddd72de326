"""The emulator cache keys folders by a hash the model owner sends: only a sha256 hex digest names a
folder, and nothing outside the cache is ever removed."""

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.offsite import EmulatorPackage, cache_package, load_cached
from privtune.common.offsite.package import MANIFEST_FILE
from tests.common.offsite.conftest import tiny
from tests.common.offsite.test_package import DROPPED


@pytest.fixture
def victim(tmp_path):
    """A folder beside the cache that looks like a broken package (it holds a manifest.json)."""
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text('{"name": "web app"}')
    return folder


@pytest.mark.parametrize("hostile", ["../webapp", "..", "/tmp", "A" * 64, "a" * 63, "a" * 65, "a" * 63 + "\n"])
def test_only_a_hex_digest_names_a_cache_entry(tmp_path, victim, hostile):
    with pytest.raises(PrivtuneError, match="not a sha256 hex digest"):
        load_cached(hostile, tmp_path / "cache")
    assert (victim / MANIFEST_FILE).exists()


def test_a_cache_entry_that_links_out_of_the_cache_is_neither_read_nor_removed(tmp_path, victim):
    package = EmulatorPackage.build(tiny("gpt2"), DROPPED)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / package.content_hash).symlink_to(victim)
    with pytest.raises(PrivtuneError, match="leads out of the emulator cache"):
        load_cached(package.content_hash, cache)
    with pytest.raises(PrivtuneError, match="leads out of the emulator cache"):
        cache_package(package, cache)
    assert (victim / MANIFEST_FILE).read_text() == '{"name": "web app"}'
