"""The AWS documents a fleet operator applies (docs/aws/) and the Greengrass recipes.

IAM documents go through moto's IAM policy validator (the syntax checks AWS
applies); the IoT policy must name exactly the Jobs topics of the device's
protocol and nothing wider; the recipes must have the fields and lifecycle
keys of the recipe format and run programs and settings that exist.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import REPO
from moto import mock_aws

from edgeagent.settings import AgentSettings
from edgeapp.settings import AppSettings

AWS = REPO / "docs" / "aws"
RECIPES = REPO / "config" / "greengrass"
OPERATIONS = REPO / "docs" / "operations.md"
THING = "${iot:Connection.Thing.ThingName}"
ARN = r"arn:aws:iot:[a-z0-9-]+:\d{12}:"

# IOT_JOBS section 1.10: what the updater publishes, receives and subscribes to
JOBS_PUBLISH = {"start-next", "*/update", "*/get", "get"}
JOBS_RECEIVE = {"notify", "notify-next", "start-next/*", "*/update/*", "get/*", "*/get/*"}
# Where '*' is allowed, and why: job ids and turbine ids are not known in advance;
# object keys under a named bucket and prefix.
JOBS_ARN = ARN + r"topic(filter)?/\$aws/things/" + re.escape(THING) + "/jobs/"
WILDCARD_OK = (
    re.compile(JOBS_ARN + r"\*/(update|get)(/\*)?"),
    re.compile(JOBS_ARN + r"(start-next|get)/\*"),
    re.compile(ARN + r"topic/wind-turbine/\*/(anomalies|label/update)"),
    re.compile(r"arn:aws:s3:::[a-z0-9][a-z0-9.-]+/[a-z0-9-]+/\*"),
)  # fmt: skip


def load(name: str) -> Any:
    return json.loads((AWS / name).read_text())


def statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    assert policy["Version"] == "2012-10-17"
    return list(policy["Statement"])


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def resources(policy: dict[str, Any], action: str) -> set[str]:
    return {
        r
        for s in statements(policy)
        if action in as_list(s["Action"])
        for r in as_list(s["Resource"])
    }


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def test_every_document_parses_and_the_operations_guide_names_it() -> None:
    guide = OPERATIONS.read_text()
    names = sorted(p.name for p in AWS.glob("*.json"))
    assert names == [
        "iot-policy.json",
        "ota-role-alias.json",
        "ota-role-permissions.json",
        "ota-role-trust.json",
    ]
    for name in names:
        load(name)
        assert f"docs/aws/{name}" in guide, f"docs/operations.md does not mention {name}"


@pytest.mark.parametrize(
    "name", ["iot-policy.json", "ota-role-permissions.json", "ota-role-trust.json"]
)
def test_least_privilege(name: str) -> None:
    for s in statements(load(name)):
        assert s["Effect"] == "Allow"
        for action in as_list(s["Action"]):
            assert "*" not in action, f"{name}: wildcard action {action}"
        for resource in as_list(s.get("Resource", [])):
            assert resource != "*", f"{name}: every resource"
            if "*" in resource:
                assert any(p.fullmatch(resource) for p in WILDCARD_OK), resource


def test_the_iot_policy_names_the_jobs_topics_exactly() -> None:
    policy = load("iot-policy.json")
    jobs = f"$aws/things/{THING}/jobs/"

    def jobs_part(arns: set[str], kind: str) -> set[str]:
        out = set()
        for arn in arns:
            found = re.fullmatch(ARN + kind + "/" + re.escape(jobs) + "(.+)", arn)
            if found:
                out.add(found[1])
        return out

    assert jobs_part(resources(policy, "iot:Publish"), "topic") == JOBS_PUBLISH
    assert jobs_part(resources(policy, "iot:Receive"), "topic") == JOBS_RECEIVE
    assert jobs_part(resources(policy, "iot:Subscribe"), "topicfilter") == JOBS_RECEIVE
    # every Jobs resource is the connected thing's own
    for arn in resources(policy, "iot:Publish") | resources(policy, "iot:Receive"):
        assert "$aws/things/" not in arn or jobs in arn, arn
    # the bridge publishes the verdict topics it forwards (config/mosquitto-bridge.conf)
    bridge = (REPO / "config" / "mosquitto-bridge.conf").read_text()
    forwarded = re.findall(r"^topic (\S+) out \d$", bridge, re.M)
    published = {re.sub(ARN + "topic/", "", r) for r in resources(policy, "iot:Publish")}
    assert {t.replace("+", "*") for t in forwarded} <= published
    connect = resources(policy, "iot:Connect")
    assert {c.split(":client/")[1] for c in connect} == {THING, f"{THING}-bridge"}
    client_id = re.search(r"^remote_clientid (\S+)$", bridge, re.M)
    assert client_id and client_id[1].endswith("-bridge")


def test_the_role_alias_chain(aws: None) -> None:
    """Policy -> role alias -> role: names agree and AWS's validators accept them."""
    alias = load("ota-role-alias.json")
    assert 1 <= len(alias["roleAlias"]) <= 128
    assert 900 <= alias["credentialDurationSeconds"] <= 43200
    iam = boto3.client("iam", region_name="us-east-1")
    role = iam.create_role(
        RoleName=alias["roleArn"].rsplit("/", 1)[1],
        AssumeRolePolicyDocument=(AWS / "ota-role-trust.json").read_text(),
    )["Role"]
    assert role["Arn"] == alias["roleArn"]
    iam.put_role_policy(
        RoleName=role["RoleName"],
        PolicyName="read-model-packages",
        PolicyDocument=(AWS / "ota-role-permissions.json").read_text(),
    )
    # the IoT policy follows the same grammar: the IAM validator checks its syntax
    iam.create_policy(
        PolicyName="syntax-of-the-iot-policy",
        PolicyDocument=(AWS / "iot-policy.json").read_text(),
    )
    iot = boto3.client("iot", region_name="eu-west-1")
    created = iot.create_role_alias(**alias)
    assert resources(load("iot-policy.json"), "iot:AssumeRoleWithCertificate") == {
        created["roleAliasArn"]
    }
    trust = statements(load("ota-role-trust.json"))
    assert [s["Principal"] for s in trust] == [{"Service": "credentials.iot.amazonaws.com"}]
    assert [s["Action"] for s in trust] == ["sts:AssumeRole"]
    # the role reads packages, nothing else
    actions = {
        a for s in statements(load("ota-role-permissions.json")) for a in as_list(s["Action"])
    }
    assert actions == {"s3:GetObject"}


def test_the_validator_rejects_a_broken_document(aws: None) -> None:
    iam = boto3.client("iam", region_name="us-east-1")
    broken = load("ota-role-permissions.json")
    broken["Statement"][0]["Actions"] = broken["Statement"][0].pop("Action")
    with pytest.raises(iam.exceptions.MalformedPolicyDocumentException):
        iam.create_policy(PolicyName="broken", PolicyDocument=json.dumps(broken))


# -- Greengrass v2 component recipes ---------------------------------------------------------
LIFECYCLE_KEYS = {"setenv", "install", "run", "startup", "shutdown", "recover", "bootstrap"}
STEP_KEYS = {"script", "requiresprivilege", "skipif", "timeout", "setenv"}
VARIABLE = re.compile(r"\{([^{}]+)\}")
SETTINGS = {"WINDEDGE_AGENT_": AgentSettings, "WINDEDGE_APP_": AppSettings}


def strings(value: Any) -> Iterator[str]:
    """Every string value (not key) in a JSON document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def recipes() -> list[Path]:
    return sorted(RECIPES.glob("*.json"))


def test_there_is_a_recipe_for_the_agent_and_the_app() -> None:
    names = {json.loads(p.read_text())["ComponentName"] for p in recipes()}
    assert names == {"com.windedge.Agent", "com.windedge.App"}


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_recipe_format(path: Path) -> None:
    recipe = json.loads(path.read_text())
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", recipe["ComponentName"])
    assert path.name == f"{recipe['ComponentName']}.json"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert recipe["ComponentVersion"] == version
    for key in ("ComponentDescription", "ComponentPublisher"):
        assert isinstance(recipe[key], str) and recipe[key]
    defaults = recipe.get("ComponentConfiguration", {}).get("DefaultConfiguration", {})
    for name, dep in recipe.get("ComponentDependencies", {}).items():
        assert dep["DependencyType"] in {"HARD", "SOFT"}, name
        assert dep["VersionRequirement"], name
    assert recipe["Manifests"], "a recipe needs at least one manifest"
    for manifest in recipe["Manifests"]:
        assert manifest["Platform"]["os"] == "linux"
        lifecycle = manifest["Lifecycle"]
        keys = {k.lower() for k in lifecycle}
        assert keys <= LIFECYCLE_KEYS, keys - LIFECYCLE_KEYS
        assert "run" in keys and "startup" not in keys  # a long-running service
        for key, step in lifecycle.items():
            if key.lower() == "setenv" or isinstance(step, str):
                continue
            assert {k.lower() for k in step} <= STEP_KEYS, (key, step.keys())
            assert step["Script"]
        for artifact in manifest.get("Artifacts", []):
            assert artifact["URI"].startswith("s3://")
        for variable in (v for text in strings(manifest) for v in VARIABLE.findall(text)):
            parts = variable.split(":")
            if parts[0] == "configuration":
                assert parts[1].lstrip("/") in defaults, f"{variable}: no default"
            elif len(parts) == 3:  # another component's: a dependency of this one
                assert parts[0] in recipe.get("ComponentDependencies", {}), variable
                assert parts[1:] in (["work", "path"], ["artifacts", "path"]), variable
            else:
                assert parts in (["work", "path"], ["artifacts", "path"]), variable


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_recipe_runs_what_the_project_installs(path: Path) -> None:
    recipe = json.loads(path.read_text())
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for manifest in recipe["Manifests"]:
        lifecycle = {k.lower(): v for k, v in manifest["Lifecycle"].items()}
        program = re.search(r"/venv/bin/(\S+)", lifecycle["run"]["Script"])
        assert program and program[1] in scripts, lifecycle["run"]
        # every environment variable is a setting of the process it configures
        for name in lifecycle.get("setenv", {}):
            prefix = next(p for p in SETTINGS if name.startswith(p))
            field = name.removeprefix(prefix).lower()
            assert field in SETTINGS[prefix].model_fields, name
    if recipe["ComponentName"] == "com.windedge.App":
        deps = recipe["ComponentDependencies"]
        assert "com.windedge.Agent" in deps
        # the app keeps running (and buffering) while the agent restarts
        assert deps["com.windedge.Agent"]["DependencyType"] == "SOFT"
