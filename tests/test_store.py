"""The artifact store's cache: values any worker sharing the store can reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from levers.documents.store import LocalStore


def test_a_cached_value_is_found_by_another_store_on_the_same_root(tmp_path: Path) -> None:
    LocalStore(tmp_path).put_cached("transcripts", "ab12cd", {"text": "hello", "words": [1, 2]})

    other = LocalStore(tmp_path)  # another worker, another host sharing the directory

    assert other.cached("transcripts", "ab12cd") == {"text": "hello", "words": [1, 2]}
    assert other.cached("transcripts", "ab99") is None
    assert other.cached("other", "ab12cd") is None
    assert (tmp_path / "cache" / "transcripts" / "ab" / "ab12cd.json").is_file()
    assert [p.name for p in (tmp_path / "cache" / "transcripts" / "ab").iterdir()] == ["ab12cd.json"]


def test_an_unreadable_entry_is_a_miss(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_cached("transcripts", "ffee", "whole")
    (tmp_path / "cache" / "transcripts" / "ff" / "ffee.json").write_text('{"half": ')

    assert store.cached("transcripts", "ffee") is None


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 129, "white space"])
def test_names_that_could_leave_the_store_are_refused(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "store")

    with pytest.raises(ValueError, match="letters, digits"):
        store.put_cached("transcripts", name, 1)
    with pytest.raises(ValueError, match="letters, digits"):
        store.cached(name, "abc")

    assert not (tmp_path / "store").exists()
