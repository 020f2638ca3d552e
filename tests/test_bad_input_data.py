"""Bad input files, as a new user's files break (issue classes 2, 3, 5, 7 and the data side of
8): each test writes its broken file and expects a located error or a printed policy outcome."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hanorec.data.catalog import Catalog
from hanorec.data.config import DataConfig
from hanorec.data.errors import DataFileError
from hanorec.data.mmsafe import convert_mmsafe, read_mmsafe
from hanorec.data.prepare import prepare
from hanorec.data.readers import (
    read_amazon_meta,
    read_amazon_reviews,
    read_atomic_inter,
    read_atomic_item,
    read_ml1m_interactions,
    read_ml100k_interactions,
    read_table_interactions,
    read_table_items,
)

BOM = b"\xef\xbb\xbf"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\n"


def write_source(folder: Path, *, users: int = 4, items: int = 12, length: int = 6,
                 titles: dict[int, str] | None = None) -> dict:
    """A valid RecBole data set; returns DataConfig keyword arguments reading it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{u}\t{(u + s) % items + 1}\t4\t{100 + s}\n" for u in range(1, users + 1)
            for s in range(length)]
    (folder / "d.inter").write_text(INTER_HEADER + "".join(rows))
    names = {k: f"Film {k}" for k in range(1, items + 1)} | (titles or {})
    (folder / "d.item").write_text(ITEM_HEADER + "".join(f"{k}\t{t}\n" for k, t in names.items()))
    return dict(dataset_format="recbole", interactions_path=str(folder / "d.inter"),
                items_path=str(folder / "d.item"), output_dir=str(folder / "prepared"),
                num_candidates=4, hit3_candidates=4, num_negatives=2)


def png(path: Path, size: tuple[int, int] = (20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255)
                    .astype("uint8")).save(path)
    return path


# ----------------------------------------------------------------------- class 2: where


def test_undecodable_bytes_name_file_and_line_in_every_format(tmp_path):
    """A latin-1 é in files read as UTF-8: RecBole .item, CSV table, Amazon JSONL, MMSafe-PO.
    With `encoding: latin-1` the same .item reads, and the title is right."""
    item = tmp_path / "x.item"
    item.write_bytes(ITEM_HEADER.encode() + b"1\tCaf\xe9\n2\tB\n")
    with pytest.raises(DataFileError, match=r"x\.item, line 2: byte 0xe9 at column 6 is not "
                                            r"valid utf-8"):
        read_atomic_item(item)
    assert read_atomic_item(item, encoding="latin-1").title[0] == "Café"
    table = tmp_path / "t.csv"
    table.write_bytes(b"user,item,ts\nu1,a,1\nu\xe92,b,2\n")
    with pytest.raises(DataFileError, match=r"t\.csv, line 3: byte 0xe9"):
        read_table_interactions(table, user="user", item="item", timestamp="ts", rating=None)
    reviews = tmp_path / "r.jsonl"
    reviews.write_bytes(b'{"user_id": "u", "parent_asin": "a", "rating": 5, "timestamp": 1}\n'
                        b'{"user_id": "\xe9", "parent_asin": "a", "rating": 5, "timestamp": 2}\n')
    with pytest.raises(DataFileError, match=r"r\.jsonl, line 2: byte 0xe9"):
        read_amazon_reviews(reviews)
    mmsafe = tmp_path / "m.json"
    mmsafe.write_bytes(b'[{"prompt": "caf\xe9", "image": null, "chosen": "a", "rejected": "b"}]')
    with pytest.raises(DataFileError, match=r"m\.json, line 1: byte 0xe9"):
        read_mmsafe(mmsafe, tmp_path)


def test_parquet_nulls_and_non_parquet_files_are_located(tmp_path):
    """A null user id in Parquet was `'list' argument must have no negative elements`."""
    path = tmp_path / "i.parquet"
    pq.write_table(pa.table({"user_id": ["1", None], "item_id": ["a", "b"],
                             "timestamp": [1, 2]}), path)
    with pytest.raises(DataFileError, match=r"i\.parquet, line 2, field 'user_id': missing"):
        read_table_interactions(path, user="user_id", item="item_id", timestamp="timestamp",
                                rating=None)
    fake = tmp_path / "fake.parquet"
    fake.write_text("user_id,item_id\n")
    with pytest.raises(DataFileError, match=r"fake\.parquet: not a readable Parquet file"):
        read_table_items(fake, item_id="item_id", title="title", genres=None,
                         genres_separator="|", image=None)


def test_duplicate_columns_and_unsafe_image_paths_are_located(tmp_path):
    """A header naming a column twice was a pyarrow KeyError; an image column leaving the image
    root now names the catalogue line too."""
    table = tmp_path / "t.csv"
    table.write_text("user,user,item,ts\n1,2,a,3\n")
    with pytest.raises(DataFileError, match=r"t\.csv, line 1: column 'user' appears twice"):
        read_table_interactions(table, user="user", item="item", timestamp="ts", rating=None)
    from hanorec.data.images import UnsafeImagePathError, check_images

    items = tmp_path / "items.csv"
    items.write_text("item_id,title,image\na,A,a.png\nb,B,../b.png\n")
    catalogue = read_table_items(items, item_id="item_id", title="title", genres=None,
                                 genres_separator="|", image="image")
    png(tmp_path / "root" / "a.png")
    with pytest.raises(UnsafeImagePathError, match=r"items\.csv, line 3, field 'image': .*'\.\.'"):
        check_images(catalogue, tmp_path / "root", "text-only")


@pytest.mark.parametrize("manifest", ['{"fingerprint": "ab', '{"fingerprint": "x"}', '[1, 2]'])
def test_a_damaged_manifest_in_the_output_folder_means_a_rebuild(tmp_path, manifest, capsys):
    """A killed run's half-written manifest.json (or one without counts) is reported and the
    folder is rebuilt, instead of `Unterminated string` / `KeyError: 'counts'`."""
    config = DataConfig(**write_source(tmp_path))
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(manifest)
    built = prepare(config, progress=False)
    assert "is unusable" in capsys.readouterr().out and built["counts"]["candidates"]["test"] == 4
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == built["fingerprint"]


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    kwargs = write_source(tmp_path)
    Path(kwargs["output_dir"]).write_text("not a folder")
    with pytest.raises(DataFileError, match=r"prepared: output_dir is a file"):
        prepare(DataConfig(**kwargs), progress=False)
    nested = dict(kwargs, output_dir=str(Path(kwargs["output_dir"]) / "inner"))
    with pytest.raises(DataFileError, match=r"prepared: is a file, so output_dir"):
        prepare(DataConfig(**nested), progress=False)


# ----------------------------------------------------------------------- class 3: read right


@pytest.mark.parametrize("kind", ["u.data", "ratings.dat", "inter", "csv", "jsonl"])
def test_a_byte_order_mark_is_removed_in_every_format(tmp_path, kind):
    """The BOM once turned user 7 into 'ï»¿7' (MovieLens) or broke the header (CSV/RecBole)."""
    if kind == "u.data":
        path = tmp_path / "u.data"
        path.write_bytes(BOM + b"7\t1\t5\t10\n8\t1\t5\t11\n")
        users = read_ml100k_interactions(path).user
    elif kind == "ratings.dat":
        path = tmp_path / "ratings.dat"
        path.write_bytes(BOM + b"7::1::5::10\n8::1::5::11\n")
        users = read_ml1m_interactions(path).user
    elif kind == "inter":
        path = tmp_path / "x.inter"
        path.write_bytes(BOM + INTER_HEADER.encode() + b"7\t1\t5\t10\n")
        users = read_atomic_inter(path).user
    elif kind == "csv":
        path = tmp_path / "x.csv"
        path.write_bytes(BOM + b"user_id,item_id,timestamp\n7,1,10\n")
        users = read_table_interactions(path, user="user_id", item="item_id",
                                        timestamp="timestamp", rating=None).user
    else:
        path = tmp_path / "r.jsonl"
        path.write_bytes(BOM + b'{"user_id": "7", "parent_asin": "a", "rating": 5, '
                               b'"timestamp": 1}\n')
        users = read_amazon_reviews(path).user
    assert users.to_pylist()[0] == "7"


def test_control_characters_in_ids_are_errors_and_line_breaks_in_titles_are_cleaned(tmp_path):
    """A NUL inside a user id created a new user; a title with a newline was rendered over two
    lines (the hit3 answer format is one title per line)."""
    inter = tmp_path / "x.inter"
    inter.write_bytes(INTER_HEADER.encode() + b"1\t1\t5\t10\n1\x002\t1\t5\t11\n")
    with pytest.raises(DataFileError, match=r"x\.inter, line 3, field 'user_id': id .* control "
                                            r"character U\+0000"):
        read_atomic_inter(inter)
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"parent_asin": "a", "title": "Line one\r\nline two\ttab\x07"})
                    + "\n" + json.dumps({"parent_asin": "b\u2028c", "title": "B"}) + "\n")
    with pytest.raises(DataFileError, match=r"meta\.jsonl, line 2, field 'parent_asin'"):
        read_amazon_meta(meta)
    meta.write_text(json.dumps({"parent_asin": "a", "title": "Line one\r\nline two\ttab\x07"})
                    + "\n")
    catalogue = read_amazon_meta(meta)
    assert catalogue.title == ["Line one line two tab"] and catalogue.stats["titles_cleaned"] == 1


@pytest.mark.parametrize("rating", ["-1", "1e308", "6"])
def test_ratings_outside_the_range_are_errors_naming_the_line(tmp_path, rating):
    """Negative or 1e308 ratings passed unchecked; `rating_range` widens the accepted range."""
    kwargs = write_source(tmp_path)
    path = Path(kwargs["interactions_path"])
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[3].split("\t")
    lines[3] = "\t".join([fields[0], fields[1], rating, fields[3]])
    path.write_text("".join(lines))
    shown = re.escape(f"{float(rating):g}")
    with pytest.raises(DataFileError, match=rf"d\.inter, line 4, field 'rating': rating "
                                            rf"{shown} is outside"):
        prepare(DataConfig(**kwargs, rating_range=[0, 5]), progress=False)
    prepare(DataConfig(**kwargs, rating_range=[-1, 1e308]), progress=False)


def test_empty_splits_and_counts_are_reported(tmp_path, capsys):
    """Every user with exactly min_history + 2 items leaves the train split empty: an error at
    prepare, not an empty training run. Duplicates and short users are printed after a build."""
    kwargs = write_source(tmp_path, length=3)
    with pytest.raises(ValueError, match=r"data: the train split is empty"):
        prepare(DataConfig(**kwargs), progress=False)
    kwargs = write_source(tmp_path / "b")
    path = Path(kwargs["interactions_path"])
    path.write_text(path.read_text() + "1\t2\t4\t100\n" + "9\t1\t4\t5\n")
    prepare(DataConfig(**kwargs), progress=False)
    out = capsys.readouterr().out
    assert "read 26 interaction rows; kept 24 interactions of 4 users on 9 items" in out
    assert "1 duplicate (user, item, timestamp), 1 of 1 user with too few interactions" in out


def test_old_mac_line_ends_utf16_and_unreachable_temporal_quantiles(tmp_path):
    """CR-only line ends were a csv-module traceback; a UTF-16 file gets a hint; temporal
    quantiles that leave no target were an IndexError."""
    path = tmp_path / "x.inter"
    path.write_bytes((INTER_HEADER + "1\t1\t5\t10\n2\t1\t5\t11\n").replace("\n", "\r").encode())
    assert read_atomic_inter(path).user.to_pylist() == ["1", "2"]
    path.write_bytes((INTER_HEADER + "1\t1\t5\t10\n").encode("utf-16"))
    with pytest.raises(DataFileError, match=r"x\.inter: the file is UTF-16"):
        read_atomic_inter(path)
    config = DataConfig(**write_source(tmp_path / "t"), split="temporal",
                        temporal_quantiles=[0.01, 0.02])
    with pytest.raises(ValueError, match=r"the train split is empty: temporal_quantiles"):
        prepare(config, progress=False)


def test_an_empty_file_is_called_empty(tmp_path):
    """It was reported as a blank line inside the file."""
    path = tmp_path / "x.inter"
    path.write_text("")
    with pytest.raises(DataFileError, match=r"x\.inter: the file is empty"):
        read_atomic_inter(path)
    path.write_text(INTER_HEADER)
    with pytest.raises(DataFileError, match=r"x\.inter: no interactions"):
        read_atomic_inter(path)


def test_a_candidate_list_too_long_names_its_key_and_a_user(tmp_path):
    """`hit3_candidates: 100000` blamed num_candidates and 'user index 0'."""
    config = DataConfig(**{**write_source(tmp_path), "hit3_candidates": 100_000})
    with pytest.raises(ValueError, match=r"data\.hit3_candidates \(100000\) needs 99999 items "
                                         r"outside each user's sequence, but user '1' has only "
                                         r"3 \(the catalogue has 9 items\); lower "
                                         r"hit3_candidates"):
        prepare(config, progress=False)


# ----------------------------------------------------------------------- class 5: not late


def test_a_truncated_or_fake_image_is_refused_at_prepare(tmp_path):
    """A JPEG cut in half passed PIL verify() and killed SFT later; text saved as .jpg too."""
    kwargs = write_source(tmp_path)
    root = tmp_path / "images"
    for k in range(1, 13):
        png(root / f"{k}.png")
    noise = np.random.default_rng(1).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)  # headers intact when cut
    data = (tmp_path / "full.jpg").read_bytes()
    (root / "3.png").unlink()
    (root / "3.jpg").write_bytes(data[: len(data) // 2])
    config = DataConfig(**kwargs, image_root=str(root))
    with pytest.raises(DataFileError, match=r"d\.item, line 4, field 'image': corrupt image for "
                                            r"item '3'.*truncated"):
        prepare(config, progress=False)
    (root / "3.jpg").write_text("not an image")
    with pytest.raises(DataFileError, match=r"corrupt image for item '3'"):
        prepare(config, progress=False)
    placeholder = prepare(DataConfig(**kwargs, image_root=str(root),
                                     missing_image_policy="placeholder"), progress=False)
    assert placeholder["stats"]["images_corrupt"] == 1


def test_long_titles_are_truncated_by_policy_or_refused(tmp_path, capsys):
    """A 10,000-character title passed prepare and stopped SFT with a token-budget error."""
    kwargs = write_source(tmp_path, titles={2: "Word " * 2000})
    with pytest.raises(DataFileError, match=r"d\.item, line 3, field 'title': title of item '2' "
                                            r"has 9999 characters"):
        prepare(DataConfig(**kwargs, long_title_policy="error"), progress=False)
    manifest = prepare(DataConfig(**kwargs), progress=False)
    assert manifest["stats"]["titles_truncated"] == 1
    assert "1 titles truncated to max_title_chars" in capsys.readouterr().out
    title = Catalog.from_prepared(kwargs["output_dir"]).title("2")
    assert len(title) <= 200 and title.endswith("Word…")


def test_mmsafe_rows_are_checked_for_what_dpo_needs(tmp_path):
    """A text file as an image, a prompt ending with an assistant turn, unequal K and an empty
    file used to convert (exit 0) and fail in DPO, or convert to 0 rows."""
    root = tmp_path / "imgs"
    png(root / "ok.png")
    (root / "fake.png").write_text("hello")
    good = {"prompt": "USER: <image> what? ASSISTANT:", "image": "ok.png", "chosen": "a",
            "rejected": "b"}
    cases = [({**good, "image": "fake.png"}, "image", "not a readable image"),
             ({**good, "prompt": "USER: hi ASSISTANT: I answered"}, "prompt", "user turn"),
             ({**good, "rejected": ["b", "c"]}, "rejected", "row 1 has 1")]
    for row, field, why in cases:
        path = tmp_path / "m.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataFileError, match=rf"m\.jsonl, row 2, field '{field}': .*{why}"):
            convert_mmsafe(path, root, tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFileError, match=r"empty\.jsonl: no rows"):
        convert_mmsafe(empty, root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- class 7: limits


def test_images_over_the_pixel_limit_are_downscaled_or_refused(tmp_path, capsys):
    """A 12000x12000 PNG was decoded at 1.8 GB per load (and a larger one called 'corrupt'):
    here a 300x200 image over a 10,000-pixel limit is downscaled into the prepared folder, or
    refused by name and size."""
    kwargs = write_source(tmp_path)
    root = tmp_path / "images"
    for k in range(1, 13):
        png(root / f"{k}.png")
    png(root / "5.png", (300, 200))
    with pytest.raises(DataFileError, match=r"item '5' is 300x200 pixels, above "
                                            r"max_image_pixels 10000"):
        prepare(DataConfig(**kwargs, image_root=str(root), max_image_pixels=10_000,
                           large_image_policy="error"), progress=False)
    manifest = prepare(DataConfig(**kwargs, image_root=str(root), max_image_pixels=10_000),
                       progress=False)
    assert manifest["stats"]["images_downscaled"] == 1
    assert "1 downscaled" in capsys.readouterr().out
    catalog = Catalog.from_prepared(kwargs["output_dir"])
    small = catalog.image_path("5")
    assert small.is_relative_to(Path(kwargs["output_dir"]).resolve())
    with Image.open(small) as image:
        assert image.size[0] * image.size[1] <= 10_000 and image.size[0] > image.size[1]
    assert catalog.image_path("4") == (root / "4.png").resolve()
    mmsafe = tmp_path / "m.jsonl"
    mmsafe.write_text(json.dumps({"prompt": "USER: <image> ASSISTANT:", "image": "5.png",
                                  "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataFileError, match=r"row 1, field 'image': .*too large \(300x200"):
        read_mmsafe(mmsafe, root, max_pixels=10_000)
