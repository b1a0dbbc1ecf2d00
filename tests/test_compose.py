"""docker-compose.yml cannot run here (no Docker): check it by reading, against the real CLI parser."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

from service.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _opt(command, flag):
    return command[command.index(flag) + 1]


def test_services_and_health_checks():
    services = _compose()["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for name in ("redis", "api", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), name
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_commands_parse_with_the_cli():
    services = _compose()["services"]
    parser = build_parser()
    for name, sub in (("api", "serve"), ("worker", "worker")):
        command = services[name]["command"]
        assert command[0] == "tokencredit-server" and command[1] == sub
        args = parser.parse_args(command[1:])  # exits (fails the test) on an unknown flag
        assert args.command == sub and args.model == "/models/rm"


def test_ports_and_broker_agree():
    services = _compose()["services"]
    redis_cmd = services["redis"]["command"]
    redis_port = int(_opt(redis_cmd, "--port"))
    assert str(redis_port) in " ".join(services["redis"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        broker = urlparse(_opt(services[name]["command"], "--broker"))
        assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == redis_port
        assert services[name]["environment"]["TOKENCREDIT_BROKER_URL"] == broker.geturl()
    api = services["api"]
    port = int(_opt(api["command"], "--port"))
    assert _opt(api["command"], "--host") == "0.0.0.0"  # reachable from outside the container
    assert any(p.split(":")[-1] == str(port) for p in api["ports"])
    assert f":{port}/readyz" in " ".join(api["healthcheck"]["test"])
    worker_name = _opt(services["worker"]["command"], "--hostname")
    assert f"{worker_name}@" in " ".join(services["worker"]["healthcheck"]["test"])


def test_worker_gpu_reservation_is_droppable():
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Everything else the worker needs lives outside `deploy`, so a CPU host can delete that block.
    assert "--device" not in worker["command"]
