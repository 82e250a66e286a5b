import pytest

from dmerge.units import SIZE_HELP, format_bytes, parse_size


@pytest.mark.parametrize("text,value", [
    ("64K", 64 << 10), ("64KiB", 64 << 10), ("256M", 256 << 20), ("256mib", 256 << 20), ("2G", 2 << 30),
    ("2GiB", 2 << 30), ("1T", 1 << 40), ("1.5G", int(1.5 * (1 << 30))),
    ("64KB", 64_000), ("500MB", 500_000_000), ("500mb", 500_000_000), ("4GB", 4_000_000_000), ("1TB", 10**12),
    ("5B", 5_000_000_000), ("5b", 5_000_000_000), ("4096", 4096), (1024, 1024),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "x", "-1K", "5Q", "0", "5KIBB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("n,text", [
    (12, "12 B"), (1000, "1000 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (128 << 20, "128 MiB"),
    (int(1.5 * (1 << 30)), "1.5 GiB"), (100_000_000, "95.4 MiB"), ((1 << 20) - 1, "1 MiB"), (3 << 40, "3 TiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("typed", ["64K", "128M", "256M", "2G", "1.5G", "1T", "64KiB", "128MiB"])
def test_binary_sizes_print_back_as_typed(typed):
    number, unit = typed.rstrip("iBKMGT"), typed.rstrip("iB")[-1]
    assert format_bytes(parse_size(typed)) == f"{number} {unit}iB"


def test_size_help_names_both_systems():
    assert "1024" in SIZE_HELP and "1000" in SIZE_HELP and "5B" in SIZE_HELP
