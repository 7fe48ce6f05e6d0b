"""reforge.io.paths.cache_dir: the one home of reforge's cache folders (``$REFORGE_HOME/cache/<kind>``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import reforge
from reforge.io.paths import cache_dir, cache_root, reforge_home

# Modules outside this change's reach that still join ``"cache"`` by hand; each has a one-line fix to
# `cache_dir`/`cache_root` (listed in the change's report). Remove a module here once it calls the helper.
_NOT_YET: set[str] = set()


def test_cache_dir_follows_reforge_home_as_set_now(monkeypatch, tmp_path):
    monkeypatch.setenv("REFORGE_HOME", str(tmp_path / "home"))
    assert cache_dir("corpus-index") == tmp_path / "home" / "cache" / "corpus-index"
    assert cache_root() == tmp_path / "home" / "cache" and cache_dir("x").parent == cache_root()
    monkeypatch.setenv("REFORGE_HOME", "~/elsewhere")
    assert reforge_home() == Path.home() / "elsewhere" and cache_dir("q") == Path.home() / "elsewhere" / "cache" / "q"
    monkeypatch.delenv("REFORGE_HOME")
    assert cache_dir("token-lengths") == Path.home() / ".cache" / "reforge" / "cache" / "token-lengths"


def test_reforge_home_is_the_one_the_content_key_memo_uses(monkeypatch, tmp_path):
    from reforge.io.checkpoint import memo_dir

    for value in (str(tmp_path / "h"), "~/h2", None):
        if value is None:
            monkeypatch.delenv("REFORGE_HOME")
        else:
            monkeypatch.setenv("REFORGE_HOME", value)
        assert memo_dir().parent.parent == reforge_home()
        assert memo_dir() == cache_dir("content-keys")


@pytest.mark.parametrize("kind", ["", ".", "..", "a/b", "../x", "a\\b"])
def test_cache_dir_takes_one_folder_name(kind):
    with pytest.raises(ValueError, match="not a cache folder name"):
        cache_dir(kind)


def test_no_module_joins_a_cache_folder_by_hand():
    root = Path(reforge.__file__).parent
    found = set()
    for file in root.rglob("*.py"):
        name = file.relative_to(root).as_posix()
        code = "\n".join(line.split("#")[0] for line in file.read_text(encoding="utf-8").splitlines())
        if name != "io/paths.py" and re.search(r'/ "cache"( |$|\))', code, re.M):
            found.add(name)
    assert found - _NOT_YET == set(), "use reforge.io.paths.cache_dir(kind) instead of joining 'cache' by hand"
