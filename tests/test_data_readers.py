"""Readers on small files in the exact upstream formats, and their bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hanorec.data.errors import DataFileError
from hanorec.data.readers import (
    read_amazon_meta,
    read_amazon_reviews,
    read_atomic_inter,
    read_atomic_item,
    read_ml1m_interactions,
    read_ml1m_items,
    read_ml100k_interactions,
    read_ml100k_items,
    read_table_interactions,
    read_table_items,
)

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def _u_item(path: Path, rows: list[str]) -> Path:
    path.write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    (path.parent / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    return path


def test_ml100k_raw(tmp_path: Path) -> None:
    """u.data rows keep file order; lines are 1-based; u.item genres come from the flags."""
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    toy_flags = _flags("Animation", "Children's", "Comedy")
    items = _u_item(tmp_path / "u.item", [
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{toy_flags}",
        f"2|Café au lait (1994)|01-Jan-1994||http://y|{_flags('Drama')}",
    ])
    inter = read_ml100k_interactions(tmp_path / "u.data")
    assert inter.user.to_pylist() == ["196", "186"]
    assert inter.item.to_pylist() == ["242", "302"]
    assert inter.timestamp.tolist() == [881250949.0, 891717742.0]
    assert inter.rating.tolist() == [3.0, 3.0] and inter.line.tolist() == [1, 2]
    catalogue = read_ml100k_items(items)
    assert catalogue.title == ["Toy Story (1995)", "Café au lait (1994)"]
    assert catalogue.genres == [["Animation", "Children's", "Comedy"], ["Drama"]]


def test_ml1m_raw(tmp_path: Path) -> None:
    """``::``-separated ratings.dat / movies.dat, latin-1, genres split on ``|``."""
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3::Les Misérables (1995)::Drama|Musical\n".encode("latin-1"))
    inter = read_ml1m_interactions(tmp_path / "ratings.dat")
    assert inter.item.to_pylist() == ["1193", "661"]
    assert inter.timestamp.tolist() == [978300760.0, 978302109.0]
    catalogue = read_ml1m_items(tmp_path / "movies.dat")
    assert catalogue.genres[1] == ["Animation", "Children's", "Musical"]
    assert catalogue.title[2] == "Les Misérables (1995)"


def test_recbole_atomic(tmp_path: Path) -> None:
    """The recbole==1.2.1 ML-100K headers; the title gets the year: 'Toy Story (1995)'."""
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n")
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n242\tKolya\t1996\tComedy\n")
    inter = read_atomic_inter(tmp_path / "ml-100k.inter")
    assert inter.line.tolist() == [2] and inter.rating.tolist() == [3.0]
    catalogue = read_atomic_item(tmp_path / "ml-100k.item")
    assert catalogue.title == ["Toy Story (1995)", "Kolya (1996)"]
    assert catalogue.genres[0] == ["Animation", "Children's", "Comedy"]
    assert catalogue.line == [2, 3]


def test_amazon_2023(tmp_path: Path) -> None:
    """Reviews (timestamp in ms) and meta (categories, image URL dicts ignored)."""
    reviews = [{"rating": 5.0, "title": "Great", "text": "ok", "images": [], "asin": "B01",
                "parent_asin": "P1", "user_id": "U1", "timestamp": 1588687728923,
                "helpful_vote": 0, "verified_purchase": True},
               {"rating": 3.0, "title": "Meh", "text": "", "images": [], "asin": "B02",
                "parent_asin": "P2", "user_id": "U1", "timestamp": 1588687729000,
                "helpful_vote": 1, "verified_purchase": False}]
    (tmp_path / "All_Beauty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    meta = [{"main_category": "All Beauty", "title": "Soap", "parent_asin": "P1",
             "categories": ["Beauty", "Bath"], "images": [{"thumb": "t", "large": "l",
                                                          "hi_res": None, "variant": "MAIN"}]},
            {"main_category": "All Beauty", "title": "Brush", "parent_asin": "P2",
             "categories": [], "images": []}]
    (tmp_path / "meta_All_Beauty.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    inter = read_amazon_reviews(tmp_path / "All_Beauty.jsonl")
    assert inter.item.to_pylist() == ["P1", "P2"]
    assert inter.timestamp.tolist() == [1588687728923.0, 1588687729000.0]
    catalogue = read_amazon_meta(tmp_path / "meta_All_Beauty.jsonl")
    assert catalogue.item_id == ["P1", "P2"] and catalogue.genres == [["Beauty", "Bath"], []]


def test_plain_tables(tmp_path: Path) -> None:
    """CSV with quoting, TSV and Parquet, with renamed columns and an image column."""
    (tmp_path / "inter.csv").write_text("uid,iid,ts\nu1,a,10\nu2,b,11.5\n")
    (tmp_path / "items.csv").write_text(
        'id,name,tags,pic\na,"Hello, World",x|y,a.jpg\nb,"Say ""hi""",,\n')
    inter = read_table_interactions(tmp_path / "inter.csv", user="uid", item="iid",
                                    timestamp="ts", rating=None)
    assert inter.rating is None and inter.timestamp.tolist() == [10.0, 11.5]
    catalogue = read_table_items(tmp_path / "items.csv", item_id="id", title="name",
                                 genres="tags", genres_separator="|", image="pic")
    assert catalogue.title == ["Hello, World", 'Say "hi"']
    assert catalogue.genres == [["x", "y"], []] and catalogue.image == ["a.jpg", None]
    (tmp_path / "inter.tsv").write_text("uid\tiid\tts\nu1\ta\t10\n")
    assert read_table_interactions(tmp_path / "inter.tsv", user="uid", item="iid", timestamp="ts",
                                   rating=None).user.to_pylist() == ["u1"]
    pq.write_table(pa.table({"uid": [1, 2], "iid": ["a", "b"], "ts": [5, 6]}),
                   tmp_path / "inter.parquet")
    parquet = read_table_interactions(tmp_path / "inter.parquet", user="uid", item="iid",
                                      timestamp="ts", rating=None)
    assert parquet.user.to_pylist() == ["1", "2"] and np.array_equal(parquet.timestamp, [5, 6])


@pytest.mark.parametrize("content, line, field", [
    ("1\t2\t3\t100\n1\t3\t4\n", 2, None),                    # missing a field
    ("1\t2\t3\t100\n\n1\t3\t4\t101\n", 2, None),             # blank line inside the file
    ("1\t2\tfive\t100\n", 1, "rating"),                      # non-numeric rating
    ("1\t2\t3\t100\n1\t3\t4\tnan\n", 2, "timestamp"),        # NaN timestamp
    ("1\t2\t3\t100\n1\t\t4\t101\n", 2, "item_id"),           # empty id
])
def test_bad_ratings_lines(tmp_path: Path, content: str, line: int, field: str | None) -> None:
    """Each bad u.data line raises a ValueError naming the file, the line and the field."""
    path = tmp_path / "u.data"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"u\.data, line {line}") as error:
        read_ml100k_interactions(path)
    assert isinstance(error.value, DataFileError) and error.value.field == field


def test_bad_catalogues(tmp_path: Path) -> None:
    """Empty titles, duplicated ids, bad flags and broken JSON are located by line."""
    bad_item = tmp_path / "bad.item"
    bad_item.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                        "1\tA\t1995\tDrama\n2\t \t1996\tDrama\n")
    with pytest.raises(ValueError, match=r"bad\.item, line 3, field 'title'"):
        read_atomic_item(bad_item)
    dup = _u_item(tmp_path / "u.item", [f"1|A (1995)|||u|{_flags('Drama')}",
                                         f"1|B (1995)|||u|{_flags('Drama')}"])
    with pytest.raises(ValueError, match=r"line 2.*already defined on line 1"):
        read_ml100k_items(dup)
    flags = _u_item(tmp_path / "u.item", [f"1|A (1995)|||u|{_flags('Drama')[:-1]}x"])
    with pytest.raises(ValueError, match=r"line 1, field 'genres'"):
        read_ml100k_items(flags)
    (tmp_path / "r.jsonl").write_text('{"user_id": "u", "parent_asin": "p", "rating": 1, '
                                      '"timestamp": 5}\n{"user_id": \n')
    with pytest.raises(ValueError, match=r"r\.jsonl, line 2: malformed JSON"):
        read_amazon_reviews(tmp_path / "r.jsonl")
    (tmp_path / "s.jsonl").write_text('{"user_id": "u", "parent_asin": "p", "rating": "x", '
                                      '"timestamp": 5}\n')
    with pytest.raises(ValueError, match=r"line 1, field 'rating'"):
        read_amazon_reviews(tmp_path / "s.jsonl")
    (tmp_path / "t.csv").write_text("user,item\nu,i\n")
    with pytest.raises(ValueError, match="missing column 'timestamp'"):
        read_table_interactions(tmp_path / "t.csv", user="user", item="item",
                                timestamp="timestamp", rating=None)


def test_read_source_dispatch_and_config(tmp_path: Path) -> None:
    """`read_source` picks the reader by dataset_format and expands `{cache}`; every
    DataConfig field has help text; bad values are refused."""
    import dataclasses

    from hanorec.data.config import DataConfig
    from hanorec.data.readers import read_source

    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t1\t5\t10\n")
    _u_item(tmp_path / "ml" / "u.item", [f"1|A (1995)|||u|{_flags('Drama')}"])
    config = DataConfig(dataset_format="ml-100k", cache_dir=str(tmp_path),
                        interactions_path="{cache}/ml/u.data", items_path="{cache}/ml/u.item")
    inter, catalogue = read_source(config)
    assert inter.item.to_pylist() == ["1"] and catalogue.genres == [["Drama"]]
    (tmp_path / "i.tsv").write_text("u\tv\tt\nx\tp\t1\n")
    (tmp_path / "m.tsv").write_text("id\tname\np\tProduct\n")
    table = DataConfig(dataset_format="table", interactions_path=str(tmp_path / "i.tsv"),
                       items_path=str(tmp_path / "m.tsv"), user_column="u", item_column="v",
                       timestamp_column="t", item_id_column="id", title_column="name")
    assert read_source(table)[1].title == ["Product"]
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    for bad in ({"protocols": ["top5"]}, {"min_history": 0}, {"split": "random"},
                {"temporal_quantiles": [0.9, 0.8]}, {"missing_image_policy": "skip"}):
        with pytest.raises(ValueError, match="DataConfig"):
            DataConfig(**bad)
