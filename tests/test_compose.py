"""docker-compose.yml cannot run here (no Docker): check it by reading, against the real CLI parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from service.cli import build_parser
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def _compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _interpolate(value, env=None):
    """Compose's variable substitution: ${VAR:-default}, ${VAR}, $$ → $ (env: the shell running compose)."""
    env = env or {}

    def one(m):
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    pattern = r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}"
    if isinstance(value, list):
        return [re.sub(pattern, one, str(v)) for v in value]
    return re.sub(pattern, one, str(value))


def _bo_parser():
    from tokencredit.bo.cli import add_parser

    parser = argparse.ArgumentParser(prog="tokencredit")  # as tokencredit.cli.main builds it
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _dockerfile_stages():
    return set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))


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


def test_api_gets_deployment_and_admin_token_from_the_environment():
    services = _compose()["services"]
    api_env = services["api"]["environment"]
    env = {"TOKENCREDIT_DEPLOYMENT": "prod", "TOKENCREDIT_ADMIN_TOKEN": "s3cret"}
    for name in env:
        assert _interpolate(api_env[name], env) == env[name]  # passed through from the shell running compose
        assert _interpolate(api_env[name]) == ""  # unset: unnamed deployment / admin API off (Settings ignores "")
    assert Settings(deployment="prod").deployment == "prod"
    # Every TOKENCREDIT_* variable given to a server container is a setting it reads.
    for name in ("api", "worker"):
        for key in services[name]["environment"]:
            if key.startswith("TOKENCREDIT_"):
                assert key.removeprefix("TOKENCREDIT_").lower() in Settings.model_fields, (name, key)
    assert "TOKENCREDIT_ADMIN_TOKEN" not in services["worker"]["environment"]  # workers never use the admin API
    # The shaping versions live in Redis: it must keep them across restarts.
    redis = services["redis"]
    assert _opt(redis["command"], "--appendonly") == "yes" and any(v.endswith(":/data") for v in redis["volumes"])
    assert any(v.split(":")[0] == "redis-data" for v in redis["volumes"]) and "redis-data" in _compose()["volumes"]


def test_bo_service_runs_tokencredit_bo_against_the_api():
    services = _compose()["services"]
    bo, api = services["bo"], services["api"]
    env = {"TOKENCREDIT_BO_OBJECTIVE_CMD": "python /bo/eval_policy.py --quick", "TOKENCREDIT_BO_TRIALS": "7"}
    command = _interpolate(bo["command"], env)
    assert command[:3] == ["tokencredit", "bo", "run"]
    args = _bo_parser().parse_args(command[1:])  # exits (fails the test) on an unknown flag
    assert args.bo_command == "run" and args.objective_cmd == env["TOKENCREDIT_BO_OBJECTIVE_CMD"] and args.trials == 7
    assert _bo_parser().parse_args(_interpolate(bo["command"])[1:]).trials == 20  # the default
    # The api, on the port it serves, once it is ready; the same URL for the objective command.
    service = urlparse(args.service)
    assert service.hostname == "api" and service.port == int(_opt(api["command"], "--port"))
    assert bo["environment"]["TOKENCREDIT_URL"] == args.service
    assert bo["depends_on"]["api"]["condition"] == "service_healthy"
    assert bo["environment"]["TOKENCREDIT_ADMIN_TOKEN"] == api["environment"]["TOKENCREDIT_ADMIN_TOKEN"]
    assert args.admin_token_env == "TOKENCREDIT_ADMIN_TOKEN"
    # The study (and its plot) on the volume, so it survives the container and a rerun resumes it.
    mounts = [v.split(":") for v in _interpolate(bo["volumes"])]
    assert any(args.study.startswith(target.rstrip("/") + "/") for _, target, *_ in mounts)
    from tokencredit.types import Component

    assert set(args.components.split(",")) <= {c.value for c in Component}
    # Its image has botorch (Dockerfile stage `bo`); api and worker use the `server` stage.
    assert bo["build"]["target"] == "bo" and bo["image"] != api["image"]
    assert {bo["build"]["target"], api["build"]["target"], services["worker"]["build"]["target"]} <= _dockerfile_stages()
    assert bo["restart"] == "no" and bo["profiles"] == ["bo"]


def test_bo_refuses_an_unset_objective_command():
    """Unset TOKENCREDIT_BO_OBJECTIVE_CMD gives `--objective-cmd ""`: refused before any weights are pushed."""
    from tokencredit.bo.cli import cmd_run

    args = _bo_parser().parse_args(_interpolate(_compose()["services"]["bo"]["command"])[1:])
    with pytest.raises(SystemExit, match="TOKENCREDIT_BO_OBJECTIVE_CMD"):
        cmd_run(args)


def test_worker_gpu_reservation_is_droppable():
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Everything else the worker needs lives outside `deploy`, so a CPU host can delete that block.
    assert "--device" not in worker["command"]
