"""Every CLI: a bad flag exits 2 with one line (no usage dump, no traceback), checked before any work or any
file is written (wam_fast.utils.cli; issue: hardening)."""
import pytest

from wam_fast.bench import cli as bench_cli
from wam_fast.eval import diagnose, fidelity
from wam_fast.serve import cli as serve_cli

CASES = [
    (bench_cli.parse_args, ["--threads", "0"], "--threads: must be >= 1, got 0"),
    (bench_cli.parse_args, ["--threads", "-2"], "--threads: must be >= 1, got -2"),
    (bench_cli.parse_args, ["--device", "tpu"], "'tpu' is not a torch device"),
    (bench_cli.parse_args, ["--json", "/"], "/ is a directory"),
    (bench_cli.parse_args, ["--json", "/nonexistent-dir/x.json"], "/nonexistent-dir does not exist"),
    (bench_cli.parse_args, ["--repeats", "0"], "--repeats: must be >= 1"),
    (bench_cli.parse_args, ["--warmup", "-1"], "--warmup: must be >= 0"),
    (fidelity.build_parser().parse_args, ["--episodes", "0"], "--episodes: must be >= 1, got 0"),
    (fidelity.build_parser().parse_args, ["--episodes", "-1"], "--episodes: must be >= 1, got -1"),
    (fidelity.build_parser().parse_args, ["--threads", "x"], "expected an int, got 'x'"),
    (fidelity.build_parser().parse_args, ["--out", "/proc/version"], "exists and is not a directory"),
    (diagnose.main, ["--task", "push-v3", "--demos", "d", "--out", "/"], "/ is a directory"),
    (serve_cli.main, ["--demo", "--port", "-1"], "port must be in 0..65535"),
]


@pytest.mark.parametrize("call,argv,message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_flag_exits_2_with_one_line(capsys, tmp_path, monkeypatch, call, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        call(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_eval_help_says_95_percent(capsys):
    with pytest.raises(SystemExit):
        fidelity.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "95% intervals" in out and "95%%" not in out
