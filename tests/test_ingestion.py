import json
import os
import shutil

import pytest

from components import features as F
from components.errors import DataError
from components.ingestion.ingest import run_ingestion
from components.ingestion.parsing import BadRow, Rating, parse_movie_line, parse_rating_line


def test_parse_rating_line_valid():
    assert parse_rating_line("196\t242\t3\t881250949\n", "u.data", 1) == Rating(
        196, 242, 3.0, 881250949
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("196\t242\t3\n", "expected 4 tab-separated fields, got 3"),
        ("x\t242\t3\t1\n", "field user_id is not an integer ('x')"),
        ("0\t242\t3\t1\n", "field user_id must be a positive integer, got 0"),
        ("1\t-5\t3\t1\n", "field movie_id must be a positive integer, got -5"),
        ("1\t2\t6\t1\n", "field stars must be whole stars in 1..5, got 6"),
        ("1\t2\t0\t1\n", "field stars must be whole stars in 1..5, got 0"),
        ("1\t2\tgood\t1\n", "field stars is not a number ('good')"),
        ("1\t2\t3\tyesterday\n", "field timestamp is not an integer ('yesterday')"),
    ],
)
def test_parse_rating_line_names_the_problem(line, reason):
    bad = parse_rating_line(line, "u.data", 7)
    assert isinstance(bad, BadRow)
    assert bad.reason == reason
    assert bad.describe().startswith("u.data, line 7: " + reason)


def test_parse_movie_line():
    assert parse_movie_line("1|Toy Story (1995)|01-Jan-1995||url|0|0", "u.item", 1) == (
        1,
        "Toy Story (1995)",
    )
    with pytest.raises(DataError, match=r"u.item, line 3: field movie_id is not an integer"):
        parse_movie_line("one|Toy Story|x", "u.item", 3)


def test_ingest_folder(tmp_path, small_data_dir):
    report = run_ingestion(small_data_dir, str(tmp_path / "r"), str(tmp_path / "m"))
    with open(os.path.join(small_data_dir, "u.data")) as handle:
        rows = sum(1 for _ in handle)
    assert report.ratings_rows == rows and report.invalid_rows == 0
    assert report.movies == 40
    from serving.client import load_titles

    catalogue = load_titles(str(tmp_path / "m"))
    assert catalogue[1] == "Movie 1 (1991)"
    with open(tmp_path / "r" / F.INGESTION_REPORT) as handle:
        assert json.load(handle)["ratings_rows"] == rows
    assert sorted(os.listdir(tmp_path / "r")) == [F.INGESTION_REPORT, F.RATINGS_FILE]


def test_ingest_reports_malformed_rows_without_dropping_them(tmp_path, small_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(os.path.join(small_data_dir, "u.item"), data / "u.item")
    (data / "u.data").write_text("1\t2\t3\t4\n1\t3\t9\t4\n2\t2\t5\t4\n")
    report = run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert report.ratings_rows == 3 and report.invalid_rows == 1
    assert report.problems == [
        f"{data / 'u.data'}, line 2: field stars must be whole stars in 1..5, got 9: '1\\t3\\t9\\t4'"
    ]
    # The row is still in the artifact: preprocessing's dead-letter policy decides.
    assert (tmp_path / "r" / F.RATINGS_FILE).read_text().count("\n") == 3


def test_missing_file_and_wrong_file(tmp_path, small_data_dir):
    with pytest.raises(DataError, match=r"nope: not found \(expected a MovieLens folder\)"):
        run_ingestion(str(tmp_path / "nope"), str(tmp_path / "r"), str(tmp_path / "m"))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "u.data").write_text("1\t2\t3\t4\n")
    with pytest.raises(DataError, match=r"only/u.item: not found \(the ml-100k"):
        run_ingestion(str(tmp_path / "only"), str(tmp_path / "r"), str(tmp_path / "m"))
    data = tmp_path / "csv"
    data.mkdir()
    (data / "u.data").write_text("userId,movieId,rating,timestamp\n1,2,3,4\n")
    (data / "u.item").write_text("1|A\n")
    with pytest.raises(
        DataError, match=r"line 1: expected 4 tab-separated fields.*does not look like"
    ):
        run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert not (tmp_path / "r" / F.RATINGS_FILE).exists()


def test_bad_catalogue_leaves_nothing_half_written(tmp_path, small_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "u.data").write_text("1\t2\t3\t4\n")
    (data / "u.item").write_text("1|A|x\n2|B|x\nthree|C|x\n")
    out = tmp_path / "r"
    out.mkdir()
    (out / F.RATINGS_FILE).write_text("previous\n")
    with pytest.raises(
        DataError, match=r"u.item, line 3: field movie_id is not an integer \('three'\)"
    ):
        run_ingestion(str(data), str(out), str(tmp_path / "m"))
    # The earlier run's output is gone too: a later stage cannot take it for this run's.
    assert not out.exists() and not (tmp_path / "m").exists()
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_encodings_are_checked_and_utf8_titles_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "u.data").write_bytes(b"1\t2\t3\t4\n1\t\xff3\t3\t4\n")
    (data / "u.item").write_text("2|Amélie (2001)|x\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"u.data, line 2: not valid utf-8 \(byte 0xff at column 3\)"
    ):
        run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    (data / "u.data").write_text("1\t2\t3\t4\n")
    run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert (tmp_path / "m" / F.MOVIES_FILE).read_text(encoding="utf-8") == "2\tAmélie (2001)\n"
    (data / "u.item").write_bytes("2|Amélie (2001)|x\n".encode("latin-1"))
    run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert (tmp_path / "m" / F.MOVIES_FILE).read_text(encoding="utf-8") == "2\tAmélie (2001)\n"


def test_tfds_offline_fails_fast_with_a_clear_message(tmp_path):
    """Offline (as on CI), the tfds path says to pass --data-dir, within seconds."""
    import socket

    from components.ingestion import tfds as ingestion

    try:
        socket.create_connection((ingestion.DOWNLOAD_HOST, 443), timeout=3).close()
        pytest.skip("online: tensorflow-datasets would really download MovieLens")
    except OSError:
        pass
    with pytest.raises(DataError, match=r"cannot reach files.grouplens.org.*Pass --data-dir"):
        ingestion.ingest_tfds(
            str(tmp_path / "r"), str(tmp_path / "m"), tfds_data_dir=str(tmp_path / "tfds")
        )
    assert not (tmp_path / "r").exists()


def test_tfds_names_follow_the_movielens_size():
    from components.ingestion.tfds import tfds_names

    assert tfds_names("movielens/1m-ratings") == ("movielens/1m-ratings", "movielens/1m-movies")
    with pytest.raises(DataError, match="expected a MovieLens ratings data set"):
        tfds_names("mnist")


def test_the_tfds_half_star_layout_parses_numbers():
    from components.ingestion.layouts import TFDS_HALF_STARS
    from components.ingestion.parsing import parse_block, parse_rating_line

    assert parse_rating_line("7\t42\t3.5\t100\n", "tfds", 1, TFDS_HALF_STARS).stars == 3.5
    assert parse_block("7\t42\t3.5\t100\n", TFDS_HALF_STARS)["stars"].tolist() == [3.5]


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-25m"])
def test_every_release_layout_is_recognised(tmp_path, layout):
    from tests.conftest import write_movielens

    data = write_movielens(str(tmp_path / "data"), users=10, movies=8, per_user=4, layout=layout)
    report = run_ingestion(data, str(tmp_path / "r"), str(tmp_path / "m"))
    assert report.ratings_rows == 40 and report.invalid_rows == 0 and report.movies == 8
    low, high = report.stars_range
    assert (low >= 1.0 and high <= 5.0) if layout != "ml-25m" else (low >= 0.5 and high <= 5.0)
    titles = (tmp_path / "m" / F.MOVIES_FILE).read_text(encoding="utf-8").splitlines()
    expected = "1\tMovie 1, The (1991)" if layout == "ml-25m" else "1\tMovie 1 (1991)"
    assert titles[0] == expected


def test_half_stars_and_the_scale_from_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,2,0.5,10\n1,3,4.5,11\n2,2,3.0,12\n2,3,5.5,13\n"
        "2,4,3.25,14\n"
    )
    (data / "movies.csv").write_text('movieId,title,genres\n2,"Heat, The (1995)",Drama\n3,B,C\n')
    report = run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert report.layout == "ml-20m/ml-25m/ml-latest" and report.stars_range == (0.5, 4.5)
    assert report.invalid_rows == 2
    assert "line 5: field stars must be half stars in 0.5..5, got 5.5" in report.problems[0]
    assert "line 6: field stars must be half stars in 0.5..5, got 3.25" in report.problems[1]
    assert "2\tHeat, The (1995)" in (tmp_path / "m" / F.MOVIES_FILE).read_text()


def test_wrong_header_and_unknown_folders_are_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(DataError, match="not a MovieLens folder .*ml-100k \\(u.data, u.item\\)"):
        run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    (data / "ratings.csv").write_text("user,item,rating,time\n1,2,3,4\n")
    (data / "movies.csv").write_text("movieId,title,genres\n2,A,B\n")
    with pytest.raises(
        DataError, match=r"ratings.csv, line 1: expected the header 'userId,movieId"
    ):
        run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))


def test_duplicate_ratings_are_counted_and_the_newest_kept(tmp_path):
    from components.artifacts.examples import load_columns
    from components.config import PreprocessingConfig
    from components.preprocessing.pipeline import run_preprocessing

    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.dat").write_text(
        "1::2::3::100\n1::2::5::300\n1::2::1::200\n2::2::4::50\n2::3::4::60\n2::3::2::60\n"
    )
    (data / "movies.dat").write_text("2::A (1990)::Drama\n3::B (1991)::Drama\n")
    report = run_ingestion(str(data), str(tmp_path / "r"), str(tmp_path / "m"))
    assert report.duplicate_pairs == 2 and report.superseded_lines == [1, 3, 5]
    stats = run_preprocessing(
        str(tmp_path / "r"), str(tmp_path / "e"), PreprocessingConfig(test_fraction=0.34)
    )
    assert stats["superseded_rows"] == 3 and sum(stats["rows"].values()) == 3
    kept = sorted(  # (timestamp, stars): the timestamps tell the rows apart
        (int(t), float(s))
        for split in ("train", "validation", "test")
        if stats["rows"][split]
        for t, s in zip(
            *(load_columns(str(tmp_path / "e"), split)[k] for k in ("timestamp", "stars")),
            strict=True,
        )
    )
    assert kept == [(50, 4.0), (60, 2.0), (300, 5.0)]  # user 1's newest; user 2's later line
