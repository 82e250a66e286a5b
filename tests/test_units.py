import pytest

from dmerge.units import format_bytes, parse_size


@pytest.mark.parametrize("text,value", [("64K", 65536), ("256M", 256 << 20), ("2G", 2 << 30), ("5B", 5_000_000_000),
                                        ("1.5G", int(1.5 * (1 << 30))), ("4096", 4096), (1024, 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "x", "-1K", "5Q", "0"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_bytes():
    assert format_bytes(1_600_000_000) == "1.6 GB"
    assert format_bytes(12) == "12 B"
