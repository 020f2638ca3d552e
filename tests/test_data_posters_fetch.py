"""Synthetic posters (deterministic, fast) and the ML-100K extraction from the recbole wheel."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from hanorec.data.fetch import WHEEL_PREFIX, extract_ml100k, fetch_ml100k
from hanorec.data.posters import render_poster, render_posters, split_title


def test_split_title() -> None:
    """The trailing '(YYYY)' is the year."""
    assert split_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert split_title("Seven (Se7en) (1995)") == ("Seven (Se7en)", "1995")
    assert split_title("Untitled") == ("Untitled", "")


def test_poster_is_deterministic_and_item_specific() -> None:
    """Same inputs -> identical pixels; another id or genre -> different pixels."""
    first = render_poster("1", "Toy Story (1995)", ["Animation", "Comedy"], (64, 96))
    again = render_poster("1", "Toy Story (1995)", ["Animation", "Comedy"], (64, 96))
    assert first.size == (64, 96) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert render_poster("2", "Toy Story (1995)", ["Animation", "Comedy"],
                         (64, 96)).tobytes() != first.tobytes()
    assert render_poster("1", "Toy Story (1995)", ["Horror"], (64, 96)).tobytes() != \
        first.tobytes()
    assert render_poster("9", "No genre", [], (64, 96)).size == (64, 96)


def test_render_posters_writes_and_skips(tmp_path: Path) -> None:
    """Two processes write identical files to one process; existing files are skipped."""
    ids = [str(k) for k in range(70)]
    titles, genres = [f"Movie {k} (19{k:02d})" for k in range(70)], [["Drama"]] * 70
    assert render_posters(ids, titles, genres, tmp_path / "a", (32, 48), workers=2) == 70
    assert render_posters(ids, titles, genres, tmp_path / "b", (32, 48), workers=1) == 70
    for k in (0, 69):
        assert (tmp_path / "a"
                / f"{k}.png").read_bytes() == (tmp_path / "b" / f"{k}.png").read_bytes()
    assert render_posters(ids, titles, genres, tmp_path / "a", (32, 48)) == 0
    with Image.open(tmp_path / "a" / "5.png") as image:
        image.verify()


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(WHEEL_PREFIX + "ml-100k.inter", "user_id:token\titem_id:token\n1\t2\n")
        archive.writestr(WHEEL_PREFIX + "ml-100k.item", "item_id:token\tmovie_title:token_seq\n")
        archive.writestr("recbole/__init__.py", "")
    return path


def test_extract_and_idempotent_fetch(tmp_path: Path, capsys) -> None:
    """The two members land in <cache>/ml-100k with their SHA-256 recorded; a second fetch
    finds them (right sizes) and does not call pip; a wheel without them is refused."""
    wheel = _fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")
    files = extract_ml100k(wheel, tmp_path / "cache" / "ml-100k")
    inter = tmp_path / "cache" / "ml-100k" / "ml-100k.inter"
    assert files["ml-100k.inter"]["sha256"] == hashlib.sha256(inter.read_bytes()).hexdigest()
    record = json.loads((inter.parent / "source.json").read_text())
    assert record["source"] == "recbole==1.2.1"
    assert fetch_ml100k(tmp_path / "cache") == inter.parent
    assert "already" in capsys.readouterr().out
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("x", "")
    with pytest.raises(ValueError, match="no member"):
        extract_ml100k(empty, tmp_path / "other")
