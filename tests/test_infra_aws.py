"""infra/aws/hostmeter.yaml: the CloudFormation template that runs the registry's jobs on AWS.

- drift: every job in ``jobs.registry.JOBS`` has exactly one EventBridge Scheduler schedule (one
  per shard of ``CloseShards`` for shardable jobs) with the registry's expression and time zone,
  and every schedule names a registered job, with a command ``hostmeter run`` accepts or a
  payload ``jobs.triggers.aws_lambda.handler`` accepts;
- the template passes ``cfn-lint`` (skipped when cfn-lint is not installed);
- the post-time hot path (``HotPath``): the ElastiCache replication group and everything it needs
  exist only with ``elasticache``, are encrypted in transit and at rest, admit 6379 only from the
  tasks' and the API servers' groups, and the task gets ``HOSTMETER_REDIS_URL`` as a secret (never
  plain env) exactly when a hot path is configured;
- IAM: no wildcard action, ``Resource: "*"`` only for actions that have no resource type, and
  each role grants exactly the listed permissions (a new grant fails the test until it is
  reviewed and added here).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli.runs import run_cmd
from jobs.monitoring import cloudwatch
from jobs.registry import JOBS
from jobs.triggers import aws_lambda as aws
from metering.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "aws" / "hostmeter.yaml"

PLACEHOLDER = "<aws.scheduler.scheduled-time>"
CONTAINER = "hostmeter"
# The registry has no "where does this job run" property: the jobs that run on Lambda.
LAMBDA_JOBS = frozenset({"aggregate-job-logs"})

CLUSTER_ARN = {"Fn::GetAtt": ["Cluster", "Arn"]}
FUNCTION_ARN = {"Fn::GetAtt": ["AggregateJobLogsFunction", "Arn"]}
DLQ_ARN = {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
SSM_PARAMETER_ARN = {
    "Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}"
               ":parameter${MackerelApiKeyParameterName}"
}


# ---------------------------------------------------------------- loading the template


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short tags as their long forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "Condition":
        return {"Condition": value}
    if suffix == "GetAtt" and isinstance(value, str):
        return {"Fn::GetAtt": value.split(".", 1)}
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


@cache
def _template() -> dict[str, Any]:
    loaded = yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)
    assert isinstance(loaded, dict)
    return loaded


def _resources(kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in _template()["Resources"].items() if res["Type"] == kind}


def _only(kind: str) -> tuple[str, dict[str, Any]]:
    found = _resources(kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.items()))


def _allowed_close_shards() -> list[str]:
    return [str(v) for v in _template()["Parameters"]["CloseShards"]["AllowedValues"]]


# ---------------------------------------------------------------- conditions


def _parameters(**overrides: str) -> dict[str, str]:
    params = {name: str(p.get("Default", "")) for name, p in _template()["Parameters"].items()}
    params.update(overrides)
    return params


HOT_PATHS = ["none", "elasticache", "external"]
VPC = "vpc-0123456789abcdef0"
API_SERVERS_SG = "sg-0a1b2c3d4e5f60718"
EXTERNAL_URL_SECRET = (
    "arn:aws:secretsmanager:ap-northeast-1:123456789012:secret:hostmeter/redis-AbC")


def _hot_path_parameters(hot_path: str, **overrides: str) -> dict[str, str]:
    """A stack's parameters with that ``HotPath`` option and what the option needs."""
    needs = {"none": {},
             "elasticache": {"VpcId": VPC},
             "external": {"HotPathRedisUrlSecretArn": EXTERNAL_URL_SECRET}}[hot_path]
    return _parameters(HotPath=hot_path, **{**needs, **overrides})


def _evaluate(expr: Any, params: Mapping[str, str]) -> Any:
    """Evaluate the condition functions this template uses (and fail on any other)."""
    if isinstance(expr, dict):
        ((fn, arg),) = expr.items()
        if fn == "Ref":
            return params[arg]
        if fn == "Condition":
            return _evaluate(_template()["Conditions"][arg], params)
        if fn == "Fn::Equals":
            left, right = (_evaluate(a, params) for a in arg)
            return str(left) == str(right)
        if fn == "Fn::Not":
            return not _evaluate(arg[0], params)
        if fn == "Fn::And":
            return all(_evaluate(a, params) for a in arg)
        if fn == "Fn::Or":
            return any(_evaluate(a, params) for a in arg)
        raise AssertionError(f"condition function {fn} is not understood by this test")
    return expr


def _exists(resource: Mapping[str, Any], params: Mapping[str, str]) -> bool:
    condition = resource.get("Condition")
    return condition is None or bool(_evaluate({"Condition": condition}, params))


_NO_VALUE = {"Ref": "AWS::NoValue"}


def _pick(value: Any, params: Mapping[str, str]) -> Any:
    """``value`` as deployed with ``params``: every ``Fn::If`` replaced by its branch, and
    ``AWS::NoValue`` dropped from lists and mappings (other functions are left as they are)."""
    if isinstance(value, dict):
        if set(value) == {"Fn::If"}:
            condition, then, otherwise = value["Fn::If"]
            return _pick(then if _evaluate({"Condition": condition}, params) else otherwise,
                         params)
        picked = {k: _pick(v, params) for k, v in value.items()}
        return {k: v for k, v in picked.items() if v != _NO_VALUE}
    if isinstance(value, list):
        return [v for v in (_pick(item, params) for item in value) if v != _NO_VALUE]
    return value


def _deployed(params: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The resources a stack with ``params`` has, their properties as deployed (``_pick``)."""
    return {name: _pick(res, params) for name, res in _template()["Resources"].items()
            if _exists(res, params)}


# ---------------------------------------------------------------- schedules


RETRY_SCHEDULE = "RetryFailedSchedule"
# Every ECS task's security groups: with HotPath=elasticache, SecurityGroupIds plus the group
# that the Redis admits (CloudFormation has no list append: join, add, split).
TASK_SECURITY_GROUPS = {"Fn::If": [
    "HotPathElastiCache",
    {"Fn::Split": [",", {"Fn::Sub": [
        "${Ids},${HotPathClientSecurityGroup.GroupId}",
        {"Ids": {"Fn::Join": [",", {"Ref": "SecurityGroupIds"}]}},
    ]}]},
    {"Ref": "SecurityGroupIds"},
]}


def _schedules() -> dict[str, dict[str, Any]]:
    """The schedules of registry jobs (the retry pass is checked on its own)."""
    return {n: r for n, r in _resources("AWS::Scheduler::Schedule").items()
            if n != RETRY_SCHEDULE}


def _command(props: Mapping[str, Any]) -> list[str]:
    overrides = json.loads(props["Target"]["Input"])
    assert set(overrides) == {"containerOverrides"}, overrides
    (container,) = overrides["containerOverrides"]
    assert container["name"] == CONTAINER
    command = container["command"]
    assert isinstance(command, list)
    assert all(isinstance(arg, str) for arg in command)
    return command


def _invocation(props: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """A schedule's (target kind, job, shard)."""
    target = props["Target"]
    if target["Arn"] == CLUSTER_ARN:
        command = _command(props)
        assert command[:1] == ["run"] and len(command) >= 2, command
        shard = command[command.index("--shard") + 1] if "--shard" in command else None
        return "ecs", command[1], shard
    if target["Arn"] == FUNCTION_ARN:
        payload = json.loads(target["Input"])
        return "lambda", payload["job"], payload.get("shard")
    raise AssertionError(f"schedule target {target['Arn']} is neither the cluster nor the function")


def _expected_command(job: str, shard: str | None) -> list[str]:
    command = ["run", job, "--at", PLACEHOLDER, "--trigger", "schedule"]
    return [*command, "--shard", shard] if shard else command


@pytest.mark.parametrize("hot_path", ["none", "elasticache", "external"])
@pytest.mark.parametrize("close_shards", _allowed_close_shards())
def test_schedules_match_the_registry_one_per_job_and_shard(close_shards: str,
                                                            hot_path: str) -> None:
    params = _hot_path_parameters(hot_path, CloseShards=close_shards)
    n = int(close_shards)
    found: dict[str, list[tuple[str, str, str | None]]] = {}
    for name, res in _schedules().items():
        if not _exists(res, params):
            continue
        kind, job, shard = _invocation(res["Properties"])
        assert job in JOBS, f"{name} runs {job!r}, which the registry does not know"
        spec = JOBS[job]
        props = res["Properties"]
        assert props["ScheduleExpression"] == spec.schedule, name
        assert props["ScheduleExpressionTimezone"] == spec.timezone, name
        found.setdefault(job, []).append((name, kind, shard))

    assert sorted(found) == sorted(JOBS), "jobs without a schedule (or schedules without a job)"
    for job, spec in JOBS.items():
        want_kind = "lambda" if job in LAMBDA_JOBS else "ecs"
        assert [kind for _, kind, _ in found[job]] == [want_kind] * len(found[job]), job
        shards = sorted(shard or "" for _, _, shard in found[job])
        if spec.shardable and n > 1:
            assert shards == [f"{i}/{n}" for i in range(n)], (job, close_shards, found[job])
        else:
            assert shards == [""], (job, close_shards, found[job])


def test_close_shards_parameter_defaults_to_one_shard() -> None:
    param = _template()["Parameters"]["CloseShards"]
    assert param["Type"] == "Number"
    assert _allowed_close_shards() == ["1", "2", "4"]
    assert str(param["Default"]) == "1"


def test_every_schedule_fires_on_time_retries_and_dead_letters() -> None:
    (queue, _) = _only("AWS::SQS::Queue")
    (group, _) = _only("AWS::Scheduler::ScheduleGroup")
    assert _schedules()
    for name, res in _schedules().items():
        props = res["Properties"]
        assert props["FlexibleTimeWindow"] == {"Mode": "OFF"}, name
        assert props["State"] == "ENABLED", name
        assert props["GroupName"] == {"Ref": group}, name
        target = props["Target"]
        assert target["RoleArn"] == {"Fn::GetAtt": ["SchedulerRole", "Arn"]}, name
        retry = target["RetryPolicy"]
        assert set(retry) == {"MaximumRetryAttempts", "MaximumEventAgeInSeconds"}, name
        assert 0 < retry["MaximumRetryAttempts"] <= 185, name
        assert 60 <= retry["MaximumEventAgeInSeconds"] <= 86400, name
        assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": [queue, "Arn"]}}, name


def test_a_retry_pass_runs_every_15_minutes_like_the_job_schedules() -> None:
    from jobs.cli.retry import DEFAULT_MAX_ATTEMPTS, retry_failed_cmd

    every = _resources("AWS::Scheduler::Schedule")
    retry = every[RETRY_SCHEDULE]["Properties"]
    job_schedule = next(iter(_schedules().values()))["Properties"]
    assert (retry["ScheduleExpression"], retry["ScheduleExpressionTimezone"]) == (
        "rate(15 minutes)", "UTC")
    for key in ("GroupName", "FlexibleTimeWindow", "State"):
        assert retry[key] == job_schedule[key], key
    target = retry["Target"]
    assert target["Arn"] == CLUSTER_ARN
    assert target["EcsParameters"] == job_schedule["Target"]["EcsParameters"]
    assert target["DeadLetterConfig"] == job_schedule["Target"]["DeadLetterConfig"]
    command = _command(retry)
    assert command == ["retry-failed", "--max-attempts", str(DEFAULT_MAX_ATTEMPTS)]
    parsed = retry_failed_cmd.make_context("retry-failed", command[1:]).params
    assert (parsed["jobs"], parsed["max_attempts"]) == ((), DEFAULT_MAX_ATTEMPTS)


def test_ecs_schedules_run_the_task_with_the_scheduled_time_in_private_subnets() -> None:
    (task_def, _) = _only("AWS::ECS::TaskDefinition")
    ecs = {n: r for n, r in _schedules().items() if r["Properties"]["Target"]["Arn"] == CLUSTER_ARN}
    assert ecs
    for name, res in ecs.items():
        target = res["Properties"]["Target"]
        assert target["EcsParameters"] == {
            "TaskDefinitionArn": {"Ref": task_def},
            "TaskCount": 1,
            "LaunchType": "FARGATE",
            "PlatformVersion": "LATEST",
            "NetworkConfiguration": {"AwsvpcConfiguration": {
                "Subnets": {"Ref": "VpcSubnetIds"},
                "SecurityGroups": TASK_SECURITY_GROUPS,
                "AssignPublicIp": "DISABLED",
            }},
        }, name
        _, job, shard = _invocation(res["Properties"])
        command = _command(res["Properties"])
        assert command == _expected_command(job, shard), name
        # and the real CLI parses it: the job, the time placeholder, trigger, shard
        parsed = run_cmd.make_context("run", command[1:]).params
        assert (parsed["job"], parsed["at"], parsed["trigger"], parsed["shard"]) == (
            job, PLACEHOLDER, "schedule", shard), name


def test_lambda_schedule_sends_a_payload_the_handler_accepts() -> None:
    lam = {n: r for n, r in _schedules().items()
           if r["Properties"]["Target"]["Arn"] == FUNCTION_ARN}
    assert sorted(_invocation(r["Properties"])[1] for r in lam.values()) == sorted(LAMBDA_JOBS)
    for name, res in lam.items():
        target = res["Properties"]["Target"]
        assert "EcsParameters" not in target, name
        payload = json.loads(target["Input"])
        assert payload == {"job": payload["job"], "scheduled_time": PLACEHOLDER}, name
        filled = json.loads(target["Input"].replace(PLACEHOLDER, "2026-10-15T10:05:00Z"))
        request = aws.parse_event(filled)
        assert request.job == payload["job"]
        assert request.trigger == "schedule"
        assert request.scheduled_time == datetime(2026, 10, 15, 10, 5, tzinfo=UTC)


# ---------------------------------------------------------------- task definition and Lambda


def _container() -> dict[str, Any]:
    (_, task_def) = _only("AWS::ECS::TaskDefinition")
    (container,) = task_def["Properties"]["ContainerDefinitions"]
    assert isinstance(container, dict)
    return container


def test_task_definition_is_fargate_with_secrets_from_the_stores_not_the_environment() -> None:
    (_, task_def) = _only("AWS::ECS::TaskDefinition")
    props = task_def["Properties"]
    assert props["RequiresCompatibilities"] == ["FARGATE"]
    assert props["NetworkMode"] == "awsvpc"
    assert props["ExecutionRoleArn"] == {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]}
    assert props["TaskRoleArn"] == {"Fn::GetAtt": ["TaskRole", "Arn"]}
    container = _container()
    assert container["Name"] == CONTAINER
    assert container["Image"] == {"Ref": "ImageUri"}
    assert "EntryPoint" not in container  # the image's ENTRYPOINT is hostmeter
    deployed = _pick(container, _parameters())  # no hot path: see the HotPath tests
    assert {e["Name"]: e["Value"] for e in deployed["Environment"]} == {
        "HOSTMETER_BILLING_TZ": "Asia/Tokyo",
        "HOSTMETER_LOG_DIR": "/tmp/hostmeter-logs",
        "HOSTMETER_MACKEREL_SERVICE": {"Ref": "MackerelService"},
    }
    assert {s["Name"]: s["ValueFrom"] for s in deployed["Secrets"]} == {
        "HOSTMETER_DATABASE_URL": {"Ref": "DatabaseUrlSecretArn"},
        "MACKEREL_API_KEY": SSM_PARAMETER_ARN,
    }
    assert container["LogConfiguration"] == {"LogDriver": "awslogs", "Options": {
        "awslogs-group": {"Ref": "TaskLogGroup"},
        "awslogs-region": {"Ref": "AWS::Region"},
        "awslogs-stream-prefix": "job",
    }}


def test_lambda_function_runs_jobs_aws_handler_from_the_s3_package() -> None:
    (name, function) = _only("AWS::Lambda::Function")
    assert {"Fn::GetAtt": [name, "Arn"]} == FUNCTION_ARN
    props = function["Properties"]
    assert props["Runtime"] == "python3.11"
    assert props["Handler"] == "jobs.triggers.aws_lambda.handler"
    module, _, attr = props["Handler"].rpartition(".")
    assert getattr(importlib.import_module(module), attr) is aws.handler
    assert props["Code"] == {"S3Bucket": {"Ref": "LambdaCodeS3Bucket"},
                             "S3Key": {"Ref": "LambdaCodeS3Key"}}
    assert props["Timeout"] > aws.DEFAULT_LOCK_WAIT_S
    env = props["Environment"]["Variables"]
    assert env["HOSTMETER_BILLING_TZ"] == "Asia/Tokyo"
    assert env["HOSTMETER_LOG_DIR"] == ""  # no log file: stderr, i.e. the function's log group
    assert env["HOSTMETER_MACKEREL_SERVICE"] == {"Ref": "MackerelService"}
    assert props["LoggingConfig"]["LogGroup"] == {"Ref": "LambdaLogGroup"}
    (_, invoke_config) = _only("AWS::Lambda::EventInvokeConfig")
    assert invoke_config["Properties"]["FunctionName"] == {"Ref": name}
    assert invoke_config["Properties"]["DestinationConfig"] == {
        "OnFailure": {"Destination": DLQ_ARN}}


def _resolve(value: Any, params: Mapping[str, str], stack: str) -> str:
    """The few intrinsic functions the function's environment uses, as a deployment would."""
    def ref(name: str) -> str:
        if name in params:
            return params[name]
        res = _template()["Resources"][name]
        assert res["Type"] == "AWS::Logs::LogGroup", name  # Ref of a log group: its name
        return _resolve(res["Properties"]["LogGroupName"], params, stack)

    if isinstance(value, str):
        return value
    ((fn, arg),) = value.items()
    if fn == "Ref":
        return ref(arg)
    if fn == "Fn::Sub":
        assert isinstance(arg, str)
        return re.sub(r"\$\{([^}]+)\}",
                      lambda m: stack if m[1] == "AWS::StackName" else ref(m[1]), arg)
    raise AssertionError(f"{fn} is not understood by this test")


def test_the_lambda_environment_names_its_secrets_and_log_groups_as_the_handler_reads_them(
) -> None:
    """Deployed with real parameter values, the environment makes jobs.triggers.aws_lambda fetch
    the database URL from the secret and the key from the parameter, and
    jobs.monitoring.cloudwatch read both groups;
    no secret value (or deploy-time dynamic reference) is in the function configuration."""
    secret_arn = "arn:aws:secretsmanager:ap-northeast-1:123456789012:secret:hostmeter/db-AbC"
    params = _parameters(DatabaseUrlSecretArn=secret_arn,
                         MackerelApiKeyParameterName="/hostmeter/mackerel-api-key")
    (_, function) = _only("AWS::Lambda::Function")
    env = {k: _resolve(v, params, "prod")
           for k, v in function["Properties"]["Environment"]["Variables"].items()}
    assert not any("{{resolve:" in v for v in env.values())

    class Stores:
        def client(self, service: str) -> Stores:
            self.service = service
            return self

        def get_secret_value(self, SecretId: str) -> dict[str, str]:
            assert (self.service, SecretId) == ("secretsmanager", secret_arn)
            return {"SecretString": "postgresql+psycopg://hostmeter:pw@db/hostmeter"}

        def get_parameter(self, Name: str, WithDecryption: bool) -> dict[str, Any]:
            assert (self.service, Name, WithDecryption) == (
                "ssm", "/hostmeter/mackerel-api-key", True)
            return {"Parameter": {"Value": "mkr-key"}}

    assert aws.resolve_secrets(env, Stores().client) == list(aws.SECRET_SETTINGS)
    assert env["HOSTMETER_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["MACKEREL_API_KEY"] == "mkr-key"
    assert cloudwatch.log_groups_from_env(env) == ["/hostmeter/prod/jobs",
                                                   "/hostmeter/prod/lambda"]


def test_log_groups_keep_logs_for_the_retention_parameter() -> None:
    groups = _resources("AWS::Logs::LogGroup")
    assert sorted(groups) == ["LambdaLogGroup", "TaskLogGroup"]
    for name, group in groups.items():
        assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name
    param = _template()["Parameters"]["LogRetentionDays"]
    assert (param["Type"], str(param["Default"])) == ("Number", "30")


def test_parameters_and_outputs() -> None:
    params = _template()["Parameters"]
    types = {name: p["Type"] for name, p in params.items()}
    assert {
        "ImageUri": "String",
        "VpcSubnetIds": "List<AWS::EC2::Subnet::Id>",
        "SecurityGroupIds": "List<AWS::EC2::SecurityGroup::Id>",
        "DatabaseUrlSecretArn": "String",
        "MackerelApiKeyParameterName": "String",
        "MackerelService": "String",
        "CloseShards": "Number",
        "LogRetentionDays": "Number",
        "TaskCpu": "String",
        "TaskMemory": "String",
        "LambdaCodeS3Bucket": "String",
        "LambdaCodeS3Key": "String",
    }.items() <= types.items()
    assert params["MackerelService"]["Default"] == "hostmeter"
    outputs = {name: o["Value"] for name, o in _template()["Outputs"].items()
               if "Condition" not in o}
    assert outputs == {
        "ClusterName": {"Ref": "Cluster"},
        "TaskDefinitionArn": {"Ref": "TaskDefinition"},
        "DeadLetterQueueUrl": {"Ref": "DeadLetterQueue"},
        "ScheduleGroupName": {"Ref": "ScheduleGroup"},
    }


# ---------------------------------------------------------------- the hot path (HotPath)

HOT_PATH_RESOURCES = {
    "HotPathAuthTokenSecret": "AWS::SecretsManager::Secret",
    "HotPathRedisUrlSecret": "AWS::SecretsManager::Secret",
    "HotPathSubnetGroup": "AWS::ElastiCache::SubnetGroup",
    "HotPathParameterGroup": "AWS::ElastiCache::ParameterGroup",
    "HotPathSecurityGroup": "AWS::EC2::SecurityGroup",
    "HotPathClientSecurityGroup": "AWS::EC2::SecurityGroup",
    "HotPathIngressFromTasks": "AWS::EC2::SecurityGroupIngress",
    "HotPathIngressFromApiServers": "AWS::EC2::SecurityGroupIngress",
    "HotPathReplicationGroup": "AWS::ElastiCache::ReplicationGroup",
}
REDIS_SG = {"Fn::GetAtt": ["HotPathSecurityGroup", "GroupId"]}
CLIENT_SG = {"Fn::GetAtt": ["HotPathClientSecurityGroup", "GroupId"]}
TOKEN_REFERENCE = "{{resolve:secretsmanager:${HotPathAuthTokenSecret}:SecretString:token}}"
URL_SECRETS = {"elasticache": {"Ref": "HotPathRedisUrlSecret"},
               "external": {"Ref": "HotPathRedisUrlSecretArn"}}


def test_hot_path_parameters_default_to_no_hot_path() -> None:
    params = _template()["Parameters"]
    assert (params["HotPath"]["AllowedValues"], params["HotPath"]["Default"]) == (HOT_PATHS, "none")
    mode = params["HotPathClusterMode"]
    assert (mode["AllowedValues"], mode["Default"]) == (["disabled", "enabled"], "disabled")
    # automatic failover needs a replica in every node group
    replicas = params["HotPathReplicas"]
    assert 1 <= int(replicas["MinValue"]) <= int(replicas["Default"])
    node = params["HotPathNodeType"]
    assert re.fullmatch(node["AllowedPattern"], node["Default"])
    assert not re.fullmatch(node["AllowedPattern"], "r7g.large")
    for name, example in (("VpcId", VPC), ("HotPathApiSecurityGroupId", API_SERVERS_SG),
                          ("HotPathRedisUrlSecretArn", EXTERNAL_URL_SECRET)):
        assert params[name]["Default"] == "", name
        assert re.fullmatch(params[name]["AllowedPattern"], ""), name
        assert re.fullmatch(params[name]["AllowedPattern"], example), name


def _rule_failures(params: Mapping[str, str]) -> list[str]:
    """The template Rules whose assertions ``params`` break (CloudFormation refuses the stack)."""
    failures = []
    for name, rule in _template().get("Rules", {}).items():
        if "RuleCondition" in rule and not _evaluate(rule["RuleCondition"], params):
            continue
        failures += [name for a in rule["Assertions"] if not _evaluate(a["Assert"], params)]
    return failures


@pytest.mark.parametrize(("hot_path", "needed"), [("elasticache", "VpcId"),
                                                  ("external", "HotPathRedisUrlSecretArn")])
def test_a_hot_path_option_is_refused_without_what_it_needs(hot_path: str, needed: str) -> None:
    assert _rule_failures(_parameters()) == []
    params = _hot_path_parameters(hot_path)
    assert _rule_failures(params) == []
    assert _rule_failures({**params, needed: ""}) != []


@pytest.mark.parametrize("api_servers", ["", API_SERVERS_SG])
@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_the_replication_group_and_its_parts_exist_only_with_elasticache(
    hot_path: str, api_servers: str
) -> None:
    resources = _template()["Resources"]
    assert {name: resources[name]["Type"] for name in HOT_PATH_RESOURCES} == HOT_PATH_RESOURCES
    # no other resource of these kinds escapes the checks below
    kinds = set(HOT_PATH_RESOURCES.values())
    assert {n for n, r in resources.items() if r["Type"] in kinds} == set(HOT_PATH_RESOURCES)

    deployed = _deployed(_hot_path_parameters(hot_path, HotPathApiSecurityGroupId=api_servers))
    expected = set(HOT_PATH_RESOURCES) if hot_path == "elasticache" else set()
    if not api_servers:
        expected.discard("HotPathIngressFromApiServers")
    assert set(deployed) & set(HOT_PATH_RESOURCES) == expected


@pytest.mark.parametrize("cluster_mode", ["disabled", "enabled"])
def test_the_replication_group_is_redis_7_encrypted_with_a_token_and_failover(
    cluster_mode: str,
) -> None:
    deployed = _deployed(_hot_path_parameters("elasticache", HotPathClusterMode=cluster_mode))
    group = deployed["HotPathReplicationGroup"]
    props = group["Properties"]
    assert props["Engine"] == "redis"
    assert str(props["EngineVersion"]).split(".")[0] == "7"
    assert props["TransitEncryptionEnabled"] is True
    assert props.get("TransitEncryptionMode", "required") == "required"
    assert props["AtRestEncryptionEnabled"] is True
    assert props["AuthToken"] == {"Fn::Sub": TOKEN_REFERENCE}
    assert props["AutomaticFailoverEnabled"] is True
    assert props["MultiAZEnabled"] is True
    assert props["ReplicasPerNodeGroup"] == {"Ref": "HotPathReplicas"}
    assert props["CacheNodeType"] == {"Ref": "HotPathNodeType"}
    assert props["Port"] == 6379
    assert props["SecurityGroupIds"] == [REDIS_SG]
    # it may hold posts not yet flushed: deleting or replacing it keeps a snapshot
    assert (group["DeletionPolicy"], group["UpdateReplacePolicy"]) == ("Snapshot", "Snapshot")

    on = cluster_mode == "enabled"
    assert props["ClusterMode"] == cluster_mode
    assert props["NumNodeGroups"] == ({"Ref": "HotPathShards"} if on else 1)
    assert props["CacheParameterGroupName"] == {"Ref": "HotPathParameterGroup"}
    parameters = deployed["HotPathParameterGroup"]["Properties"]
    assert parameters["CacheParameterGroupFamily"] == "redis7"
    assert parameters["Properties"] == {"cluster-enabled": "yes" if on else "no",
                                        "maxmemory-policy": "noeviction"}

    assert props["CacheSubnetGroupName"] == {"Ref": "HotPathSubnetGroup"}
    assert deployed["HotPathSubnetGroup"]["Properties"]["SubnetIds"] == {"Ref": "VpcSubnetIds"}

    token = deployed["HotPathAuthTokenSecret"]["Properties"]["GenerateSecretString"]
    assert token["GenerateStringKey"] == "token"
    assert json.loads(token["SecretStringTemplate"]) == {}
    # letters and digits: ElastiCache refuses some punctuation, a URL would need the rest escaped
    assert token["ExcludePunctuation"] is True
    assert 16 <= token["PasswordLength"] <= 128  # ElastiCache's AUTH token length


def _ingress(deployed: Mapping[str, dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """Every ingress rule of security group ``group``: inline, and separate resources."""
    rules = list(deployed[group]["Properties"].get("SecurityGroupIngress", []))
    names = ({"Ref": group}, {"Fn::GetAtt": [group, "GroupId"]})
    rules += [r["Properties"] for r in deployed.values()
              if r["Type"] == "AWS::EC2::SecurityGroupIngress"
              and r["Properties"]["GroupId"] in names]
    return rules


@pytest.mark.parametrize("api_servers", ["", API_SERVERS_SG])
def test_redis_admits_6379_only_from_the_tasks_and_the_api_servers(api_servers: str) -> None:
    deployed = _deployed(_hot_path_parameters("elasticache",
                                              HotPathApiSecurityGroupId=api_servers))
    sources = []
    for rule in _ingress(deployed, "HotPathSecurityGroup"):
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 6379, 6379), rule
        assert not {"CidrIp", "CidrIpv6", "SourcePrefixListId", "SourceSecurityGroupName",
                    "SourceSecurityGroupOwnerId"} & set(rule), rule
        sources.append(_canon(rule["SourceSecurityGroupId"]))
    expected = [CLIENT_SG] + ([{"Ref": "HotPathApiSecurityGroupId"}] if api_servers else [])
    assert sorted(sources) == sorted(map(_canon, expected))

    # The tasks' group admits nothing and reaches only Redis, so adding it to a task widens
    # nothing the operator's own groups restrict.
    client = deployed["HotPathClientSecurityGroup"]["Properties"]
    assert _ingress(deployed, "HotPathClientSecurityGroup") == []
    (egress,) = client["SecurityGroupEgress"]
    assert (egress["IpProtocol"], egress["FromPort"], egress["ToPort"]) == ("tcp", 6379, 6379)
    assert egress["DestinationSecurityGroupId"] == REDIS_SG
    assert not {"CidrIp", "CidrIpv6", "DestinationPrefixListId"} & set(egress)
    for name in ("HotPathSecurityGroup", "HotPathClientSecurityGroup"):
        assert deployed[name]["Properties"]["VpcId"] == {"Ref": "VpcId"}, name


def _task_security_groups(value: Any, ids: list[str], client: str) -> list[str]:
    """The deployed list of an ECS schedule's ``SecurityGroups`` (the functions it uses)."""
    def text(expr: Any) -> str:
        if isinstance(expr, str):
            return expr
        ((fn, arg),) = expr.items()
        if fn == "Fn::Join":
            assert arg[0] == "," and arg[1] == {"Ref": "SecurityGroupIds"}, expr
            return ",".join(ids)
        assert fn == "Fn::Sub", expr
        template, variables = arg
        names = {k: text(v) for k, v in variables.items()}
        names["HotPathClientSecurityGroup.GroupId"] = client
        return re.sub(r"\$\{([^}]+)\}", lambda m: names[m[1]], template)

    if value == {"Ref": "SecurityGroupIds"}:
        return ids
    ((fn, (separator, joined)),) = value.items()
    assert (fn, separator) == ("Fn::Split", ","), value
    return text(joined).split(",")


@pytest.mark.parametrize("hot_path", HOT_PATHS)
def test_ecs_tasks_join_the_group_redis_admits_only_with_elasticache(hot_path: str) -> None:
    deployed = _deployed(_hot_path_parameters(hot_path))
    ecs = [r["Properties"] for r in deployed.values()
           if r["Type"] == "AWS::Scheduler::Schedule"
           and r["Properties"]["Target"]["Arn"] == CLUSTER_ARN]
    assert len(ecs) >= len(JOBS) - len(LAMBDA_JOBS)
    ids = ["sg-0000000000000000a", "sg-0000000000000000b"]
    for props in ecs:
        network = props["Target"]["EcsParameters"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        groups = _task_security_groups(network["SecurityGroups"], ids, "sg-client")
        assert groups == ids + (["sg-client"] if hot_path == "elasticache" else []), props["Name"]


def test_flush_usage_runs_on_ecs_every_five_minutes_whatever_the_hot_path() -> None:
    spec = JOBS["flush-usage"]
    assert not spec.catch_up  # the next flush takes everything Redis holds
    for hot_path in HOT_PATHS:
        params = _hot_path_parameters(hot_path)
        (props,) = [r["Properties"] for r in _schedules().values()
                    if _exists(r, params) and _invocation(r["Properties"])[1] == "flush-usage"]
        assert (props["ScheduleExpression"], props["ScheduleExpressionTimezone"]) == (
            spec.schedule, spec.timezone)
        # enabled without a hot path too: the run succeeds doing nothing, and the alerts on
        # "no successful run" (hostmeter_job_last_success_timestamp_seconds) stay quiet
        assert props["State"] == "ENABLED"
        assert props["Target"]["Arn"] == CLUSTER_ARN
        assert _command(props) == _expected_command("flush-usage", None)
        retry = props["Target"]["RetryPolicy"]
        assert retry["MaximumEventAgeInSeconds"] <= 300  # by then the next one is due


@pytest.mark.parametrize(("hot_path", "cluster_mode"), [
    ("none", "disabled"), ("none", "enabled"), ("elasticache", "disabled"),
    ("elasticache", "enabled"), ("external", "disabled"), ("external", "enabled"),
])
def test_the_task_gets_the_redis_url_as_a_secret_exactly_with_a_hot_path(
    hot_path: str, cluster_mode: str
) -> None:
    params = _hot_path_parameters(hot_path, HotPathClusterMode=cluster_mode)
    container = _pick(_container(), params)
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    assert "HOSTMETER_REDIS_URL" not in env  # it carries the AUTH token
    url_secret = URL_SECRETS.get(hot_path)
    assert secrets.get("HOSTMETER_REDIS_URL") == url_secret
    cluster = env.get("HOSTMETER_REDIS_CLUSTER")
    if hot_path == "none":
        assert cluster is None
    else:
        # as the tasks read it
        assert isinstance(cluster, str)
        settings = Settings.from_env({"HOSTMETER_REDIS_URL": "rediss://:t@redis:6379",
                                      "HOSTMETER_REDIS_CLUSTER": cluster})
        assert settings.redis_cluster is (cluster_mode == "enabled")

    # and ECS may read that secret, and only with this option
    role = _pick(_template()["Resources"]["TaskExecutionRole"], params)
    (policy,) = role["Properties"]["Policies"]
    readable = [s["Resource"] for s in _statements(policy["PolicyDocument"])
                if s["Action"] == "secretsmanager:GetSecretValue"]
    assert readable == [{"Ref": "DatabaseUrlSecretArn"}] + ([url_secret] if url_secret else [])


@pytest.mark.parametrize("cluster_mode", ["disabled", "enabled"])
def test_the_redis_url_secret_is_rediss_with_the_token_at_the_groups_endpoint(
    cluster_mode: str,
) -> None:
    from redis.connection import SSLConnection, parse_url

    deployed = _deployed(_hot_path_parameters("elasticache", HotPathClusterMode=cluster_mode))
    template, variables = deployed["HotPathRedisUrlSecret"]["Properties"]["SecretString"]["Fn::Sub"]
    endpoint = "ConfigurationEndPoint" if cluster_mode == "enabled" else "PrimaryEndPoint"
    assert variables == {
        "Host": {"Fn::GetAtt": ["HotPathReplicationGroup", f"{endpoint}.Address"]},
        "Port": {"Fn::GetAtt": ["HotPathReplicationGroup", f"{endpoint}.Port"]},
    }
    # as deployed: CloudFormation resolves the token; the tasks' client reads TLS + password
    assert TOKEN_REFERENCE in template
    url = (template.replace(TOKEN_REFERENCE, "Tok3nOfSixtyFourLettersAndDigits")
           .replace("${Host}", "hm.abc123.apne1.cache.amazonaws.com").replace("${Port}", "6379"))
    assert "${" not in url and "{{" not in url
    assert parse_url(Settings.from_env({"HOSTMETER_REDIS_URL": url}).redis_url or "") == {
        "password": "Tok3nOfSixtyFourLettersAndDigits",
        "host": "hm.abc123.apne1.cache.amazonaws.com",
        "port": 6379,
        "connection_class": SSLConnection,
    }


@pytest.mark.parametrize("cluster_mode", ["disabled", "enabled"])
def test_outputs_give_the_api_servers_the_endpoint_and_the_token_only_with_elasticache(
    cluster_mode: str,
) -> None:
    outputs = _template()["Outputs"]
    hot = {name: o for name, o in outputs.items() if "Condition" in o}
    assert sorted(hot) == ["HotPathAuthTokenSecretArn", "HotPathClientSecurityGroupId",
                           "HotPathEndpoint", "HotPathRedisUrlSecretArn"]
    assert {o["Condition"] for o in hot.values()} == {"HotPathElastiCache"}
    params = _hot_path_parameters("elasticache", HotPathClusterMode=cluster_mode)
    endpoint = "ConfigurationEndPoint" if cluster_mode == "enabled" else "PrimaryEndPoint"
    assert _pick(hot["HotPathEndpoint"]["Value"], params) == {"Fn::Sub": (
        f"${{HotPathReplicationGroup.{endpoint}.Address}}"
        f":${{HotPathReplicationGroup.{endpoint}.Port}}")}
    assert hot["HotPathAuthTokenSecretArn"]["Value"] == {"Ref": "HotPathAuthTokenSecret"}
    assert hot["HotPathRedisUrlSecretArn"]["Value"] == {"Ref": "HotPathRedisUrlSecret"}
    assert hot["HotPathClientSecurityGroupId"]["Value"] == CLIENT_SG
    # outputs are readable by anyone who may describe the stack: no resolved secret there
    assert "{{resolve:" not in json.dumps(outputs)


# ---------------------------------------------------------------- cfn-lint


@pytest.mark.skipif(importlib.util.find_spec("cfnlint") is None,
                    reason="cfn-lint is not installed (pip install 'cfn-lint>=1.0')")
def test_cfn_lint_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from cfnlint.runner import main; sys.exit(main())",
         str(TEMPLATE)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- IAM

Grant = tuple[str, str, str]  # (action, resource, condition) as canonical JSON


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _statements(document: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A policy's statements; both branches of an ``Fn::If`` (the grant exists when it holds)."""
    for statement in _listed(document["Statement"]):
        if isinstance(statement, dict) and set(statement) == {"Fn::If"}:
            _, *branches = statement["Fn::If"]
            yield from (b for b in branches if b != {"Ref": "AWS::NoValue"})
        else:
            yield statement


def _policies() -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, statement) for every identity policy in the template."""
    for kind in ("AWS::IAM::Role", "AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for name, res in _resources(kind).items():
            props = res["Properties"]
            documents = [p["PolicyDocument"] for p in props.get("Policies", [])]
            if "PolicyDocument" in props:
                documents.append(props["PolicyDocument"])
            for document in documents:
                for statement in _statements(document):
                    yield name, statement


def _grants(role: str) -> set[Grant]:
    grants: set[Grant] = set()
    for owner, statement in _policies():
        if owner != role:
            continue
        for action in _listed(statement["Action"]):
            for resource in _listed(statement["Resource"]):
                grants.add((action, _canon(resource), _canon(statement.get("Condition"))))
    return grants


def _grant(action: str, resource: Any, condition: Any = None) -> Grant:
    return action, _canon(resource), _canon(condition)


def test_no_statement_allows_a_wildcard_action_or_uses_not_action() -> None:
    statements = list(_policies())
    assert statements
    for owner, statement in statements:
        assert statement["Effect"] == "Allow", owner
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(statement), owner
        for action in _listed(statement["Action"]):
            assert isinstance(action, str) and "*" not in action, (owner, action)
    for name, role in _resources("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role["Properties"], f"{name}: managed policies are broad"


def test_resource_star_only_for_actions_that_have_no_resource_type() -> None:
    star = {(owner, action) for owner, statement in _policies()
            for action in _listed(statement["Action"]) if "*" in _listed(statement["Resource"])}
    assert star == {
        ("TaskExecutionRole", "ecr:GetAuthorizationToken"),
        # Lambda in a VPC: these Describe calls only work on "*"
        ("LambdaRole", "ec2:DescribeNetworkInterfaces"),
        ("LambdaRole", "ec2:DescribeSubnets"),
    }


def test_roles_are_assumed_only_by_their_service_from_this_account() -> None:
    services = {"TaskExecutionRole": "ecs-tasks.amazonaws.com",
                "TaskRole": "ecs-tasks.amazonaws.com",
                "LambdaRole": "lambda.amazonaws.com",
                "SchedulerRole": "scheduler.amazonaws.com"}
    assert sorted(_resources("AWS::IAM::Role")) == sorted(services)
    for name, service in services.items():
        trust = _resources("AWS::IAM::Role")[name]["Properties"]["AssumeRolePolicyDocument"]
        assert trust["Statement"] == [{
            "Effect": "Allow",
            "Principal": {"Service": service},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}},
        }], name


def test_scheduler_role_runs_only_the_task_definition_and_invokes_only_the_function() -> None:
    assert _grants("SchedulerRole") == {
        _grant("ecs:RunTask", {"Ref": "TaskDefinition"},
               {"ArnEquals": {"ecs:cluster": CLUSTER_ARN}}),
        _grant("iam:PassRole", {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]},
               {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}),
        _grant("iam:PassRole", {"Fn::GetAtt": ["TaskRole", "Arn"]},
               {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}),
        _grant("lambda:InvokeFunction", FUNCTION_ARN),
        _grant("sqs:SendMessage", DLQ_ARN),
    }


def test_task_execution_role_pulls_the_image_writes_its_log_reads_its_secrets() -> None:
    repository = {"Ref": "ImageRepositoryArn"}
    log_group = {"Fn::GetAtt": ["TaskLogGroup", "Arn"]}
    kms_via = {"StringEquals": {"kms:ViaService": [
        {"Fn::Sub": "ssm.${AWS::Region}.amazonaws.com"},
        {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"},
    ]}}
    assert _grants("TaskExecutionRole") == {
        _grant("ecr:GetAuthorizationToken", "*"),
        _grant("ecr:BatchCheckLayerAvailability", repository),
        _grant("ecr:GetDownloadUrlForLayer", repository),
        _grant("ecr:BatchGetImage", repository),
        _grant("logs:CreateLogStream", log_group),
        _grant("logs:PutLogEvents", log_group),
        _grant("secretsmanager:GetSecretValue", {"Ref": "DatabaseUrlSecretArn"}),
        _grant("ssm:GetParameters", SSM_PARAMETER_ARN),
        _grant("kms:Decrypt", {"Ref": "SecretsKmsKeyArn"}, kms_via),
        # HotPath=elasticache / external only (test_the_redis_url_is_read_only_under_its_option)
        _grant("secretsmanager:GetSecretValue", {"Ref": "HotPathRedisUrlSecret"}),
        _grant("secretsmanager:GetSecretValue", {"Ref": "HotPathRedisUrlSecretArn"}),
    }


@pytest.mark.parametrize("role", ["TaskExecutionRole", "LambdaRole"])
def test_kms_decrypt_is_granted_only_when_a_customer_key_is_given(role: str) -> None:
    (policy,) = _resources("AWS::IAM::Role")[role]["Properties"]["Policies"]
    conditional = [s for s in policy["PolicyDocument"]["Statement"] if "Fn::If" in s]
    kms = [s for s in conditional if s["Fn::If"][1]["Action"] == "kms:Decrypt"]
    assert [s["Fn::If"][0] for s in kms] == ["HasKmsKey"]
    assert kms[0]["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    assert _evaluate({"Condition": "HasKmsKey"}, _parameters()) is False
    assert _evaluate({"Condition": "HasKmsKey"},
                     _parameters(SecretsKmsKeyArn="arn:aws:kms:ap-northeast-1:1:key/x")) is True


def test_task_role_grants_nothing() -> None:
    assert _grants("TaskRole") == set()


def test_lambda_role_writes_its_log_reads_the_job_logs_and_its_two_secrets() -> None:
    log_group = {"Fn::GetAtt": ["LambdaLogGroup", "Arn"]}
    enis = {"Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:*/*"}
    kms_via = {"StringEquals": {"kms:ViaService": [
        {"Fn::Sub": "ssm.${AWS::Region}.amazonaws.com"},
        {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"},
    ]}}
    assert _grants("LambdaRole") == {
        _grant("logs:CreateLogStream", log_group),
        _grant("logs:PutLogEvents", log_group),
        _grant("logs:FilterLogEvents", log_group),
        _grant("logs:FilterLogEvents", {"Fn::GetAtt": ["TaskLogGroup", "Arn"]}),
        _grant("secretsmanager:GetSecretValue", {"Ref": "DatabaseUrlSecretArn"}),
        _grant("ssm:GetParameter", SSM_PARAMETER_ARN),
        _grant("kms:Decrypt", {"Ref": "SecretsKmsKeyArn"}, kms_via),
        _grant("sqs:SendMessage", DLQ_ARN),
        _grant("ec2:DescribeNetworkInterfaces", "*"),
        _grant("ec2:DescribeSubnets", "*"),
        _grant("ec2:CreateNetworkInterface", enis),
        _grant("ec2:DeleteNetworkInterface", enis),
        _grant("ec2:AssignPrivateIpAddresses", enis),
        _grant("ec2:UnassignPrivateIpAddresses", enis),
    }
