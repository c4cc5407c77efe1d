"""``headrace evaluate-policy``'s argument checks: each bad value exits 2 with one
sentence before Kafka is touched (the bootstrap points at a closed port, so reaching
Kafka would fail differently)."""

from __future__ import annotations

import pytest

from headrace.cli import main
from headrace.commands.evaluate_policy import parse_range
from headrace.core.errors import InputError

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def test_parse_range() -> None:
    assert parse_range("2026-01-01T00:00:00Z..2026-01-01T01:00:00Z") == (T0, T0 + 3_600_000)
    assert parse_range(f"{T0}..{T0 + 1}") == (T0, T0 + 1)
    for bad, needle in (("2026-01-01", "expects FROM..TO"), (f"{T0}..{T0}", "is empty"),
                        (f"..{T0}", "expects FROM..TO"), ("x..y", "cannot read 'x'")):
        with pytest.raises(InputError, match=needle):
            parse_range(bad)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--log", f"{T0 + 5}..{T0}"], "is empty"),
    (["--policy", "softmax"], "unknown policy 'softmax'"),
    (["--policy", "eps:2"], "unknown policy 'eps:2'"),
    (["--clip", "0"], "--clip must be positive"),
    (["--min-support", "1.5"], "--min-support must be in [0, 1]"),
    (["--attribution", "soon"], "cannot read 'soon' as a duration"),
])
def test_bad_arguments_exit_2_with_one_sentence(
        extra: list[str], needle: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    args = ["evaluate-policy", "--log", f"{T0}..{T0 + 1000}", "--model", "v1", *extra]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err and err.count("\n") == 1
    assert err.startswith("headrace evaluate-policy: ")
