"""tandem.tools.bench_attention: it times the kernel and the portable path on the same step, and
checks they agree before it times them."""

from __future__ import annotations

import json

import pytest

from tandem.core.modeling import attention
from tandem.tools import bench_attention


def test_both_paths_are_timed_on_a_step_whose_outputs_agree(tmp_path, capsys):
    path = tmp_path / "attention.json"
    kernel_before = attention.CPU_KERNEL
    bench_attention.main(["--sequences", "3", "--context", "40", "--block-size", "4", "--head-dim", "16",
                          "--repeats", "2", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["max_abs_difference"] < 1e-5
    for name in ("kernel", "portable"):
        assert len(result[name]["rounds_ms"]) == 2
        assert result[name]["us_per_job"] > 0 and result[name]["kv_gb_per_s"] > 0
    assert attention.CPU_KERNEL == kernel_before  # the switch it flips is put back
    out = capsys.readouterr().out
    assert "3 sequences x 40 tokens" in out and "kernel" in out and "portable" in out


@pytest.mark.parametrize("argv,field", [(["--heads", "6", "--kv-heads", "4"], "--heads"),
                                        (["--context", "0"], "--context")])
def test_a_bad_shape_is_refused_naming_the_option(argv, field, capsys):
    with pytest.raises(SystemExit):
        bench_attention.parse_args(argv)
    assert field in capsys.readouterr().err
