"""`pagedserve gateway` flags to `GatewayConfig`: served names, limits, the API key."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.flags import add_arguments, config_from_args


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    config = parse("--model", "org/name")
    assert config.model_names == ("org/name",) and config.served_model_name == "org/name"
    assert config.limits == RequestLimits()
    assert (config.limits.max_n, config.limits.max_request_bytes) == (128, 8 * 1024 * 1024)
    assert config.api_key is None and not config.protect_metrics


def test_model_path_as_given_and_served_names() -> None:
    assert parse("--model", "./models/tiny-py").model_names == ("./models/tiny-py",)
    config = parse("--model", "/m/tiny", "--served-model-name", "a", "b", "a")
    assert config.model_names == ("a", "b") and config.served_model_name == "a" and config.model == "/m/tiny"


def test_limits_and_key_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    config = parse(
        "--model", "m", "--max-n", "4", "--max-stop-strings", "2", "--max-stop-chars", "10",
        "--max-request-bytes", "1000", "--max-json-depth", "8", "--read-timeout", "2.5", "--protect-metrics",
    )  # fmt: skip
    assert config.limits == RequestLimits(
        max_n=4,
        max_stop_strings=2,
        max_stop_chars=10,
        max_request_bytes=1000,
        max_json_depth=8,
        read_timeout=2.5,
    )
    assert config.api_key == "from-env" and config.protect_metrics
    assert parse("--model", "m", "--api-key", "flag").api_key == "flag"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--max-n", "0"), "--max-n must be >= 1"),
        (("--max-request-bytes", "0"), "--max-request-bytes must be >= 1"),
        (("--max-json-depth", "1"), "--max-json-depth must be >= 2"),
        (("--read-timeout", "0"), "--read-timeout must be > 0"),
        (("--served-model-name", " "), "names must not be empty"),
    ],
)
def test_bad_flags_stop_the_gateway(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        parse("--model", "m", *argv)
