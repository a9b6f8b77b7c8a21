"""The chart refuses wrong values, naming the key: the JSON schema, and the cross-field rules of
`helm template`."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.helm.rendered import (
    GROUP,
    RunHelm,
    ValuesFile,
    rejected,
)


@pytest.mark.parametrize(("values", "key", "why"), [
    ({"experts": {"groups": [{**GROUP, "replicas": -1}]}}, "/experts/groups/0/replicas", "minimum"),
    ({"router": {"replicas": -2}}, "/router/replicas", "minimum"),
    ({"ray": {"mode": "ray-on-vms"}}, "/ray/mode", "kuberay"),
    ({"model": {"path": None}}, "/model", "path"),
    ({"model": {"path": ""}}, "/model/path", "minLength"),
    ({"experts": {"groups": [{**GROUP, "gpusPerPod": 1.5}]}}, "/experts/groups/0/gpusPerPod", "integer"),
    ({"router": {"port": 70000}}, "/router/port", "maximum"),
    ({"metrics": {"port": 0}}, "/metrics/port", "minimum"),
    ({"router": {"service": {"port": "grpc"}}}, "/router/service/port", "integer"),
    ({"image": {"digest": "sha256:1234"}}, "/image/digest", "pattern"),
    ({"model": {"source": "huggingface"}}, "/model/source", "pvc"),
    ({"experts": {"placementStrategy": "RANDOM"}}, "/experts/placementStrategy", "SPREAD"),
    ({"experts": {"groups": [{**GROUP, "name": "GPU_Pool"}]}}, "/experts/groups/0/name", "pattern"),
    ({"router": {"replica": 2}}, "/router", "replica"),
    ({"experts": {"groups": []}}, "/experts/groups", "minItems"),
    ({"tls": {"enabled": "yes"}}, "/tls/enabled", "boolean"),
])
def test_schema_rejects_a_wrong_value_naming_the_key_when_it_is_given(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], key: str, why: str) -> None:
    message = rejected(run_helm, values_file, values)
    assert "schema" in message
    assert re.search(rf"at '{re.escape(key)}'", message), message
    assert why in message, message


@pytest.mark.parametrize(("values", "message"), [
    ({"model": {"source": "image"}}, "model.image.repository is empty"),
    ({"model": {"source": "image", "image": {"repository": "w"}}}, "model.image.tag and model.image.digest"),
    ({"model": {"source": "pvc", "pvc": {"claimName": ""}}}, "model.pvc.claimName is empty"),
    ({"model": {"path": "../etc"}}, 'model.path="../etc"'),
    ({"experts": {"groups": [{**GROUP, "minReplicas": 3}]}}, "experts.groups[0].minReplicas=3"),
    ({"experts": {"groups": [{**GROUP, "replicas": 2, "maxReplicas": 1}]}}, "experts.groups[0].maxReplicas=1"),
    ({"experts": {"groups": [GROUP, GROUP]}}, 'experts.groups[1].name="cpu" is used twice'),
    ({"experts": {"gpusPerHost": 1}}, "experts.gpusPerHost=1 needs 2 GPUs"),
    ({"experts": {"hosts": 4}}, "experts.hosts=4 x experts.cpusPerHost=1 needs 4 CPUs"),
    ({"experts": {"replicas": 3}}, "experts.replicas=3 is more than experts.hosts=2"),
    ({"tls": {"enabled": True}}, "tls.existingSecret is empty"),
    ({"tls": {"clientCA": {"existingSecret": "ca"}}}, 'tls.clientCA.existingSecret="ca" needs tls.enabled=true'),
    ({"auth": {"enabled": True}}, "auth.existingSecret is empty"),
    ({"metrics": {"port": 50051}}, "metrics.port=50051 is also router.port"),
    ({"router": {"port": 6379}}, "router.port=6379 is also a Ray port"),
    ({"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
     "router.autoscaling.minReplicas=5"),
    ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "metrics.serviceMonitor.enabled"),
])
def test_validate_fails_naming_key_and_value_when_values_contradict(
        run_helm: RunHelm, values_file: ValuesFile, values: dict[str, Any], message: str) -> None:
    assert message in rejected(run_helm, values_file, values)
