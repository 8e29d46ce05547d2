"""`distad bench compress`: runs, and prints one table row per compressor and size."""

from __future__ import annotations

import pytest

from distad.bench.compress import DEFAULT_SPECS, main, parse_size


def test_bench_prints_a_markdown_row_per_compressor_and_size(capsys):
    assert main(["--sizes", "4K,8K", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "steady state" in text  # says how it measured: buffers reused, like a training run
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| compressor | floats |")
    assert len(rows) == 1 + 2 * len(DEFAULT_SPECS)
    assert any(r.startswith("| topk:0.01 | 8K | 656 |") for r in rows)  # 8 bytes x k=82


def test_bench_rejects_a_bad_spec_before_measuring(capsys):
    with pytest.raises(SystemExit):
        main(["--specs", "topk:9"])
    assert "ratio must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "n"), [("1M", 1 << 20), ("64k", 65536), ("1000", 1000)])
def test_sizes_take_k_and_m_suffixes(text, n):
    assert parse_size(text) == n
