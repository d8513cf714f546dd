"""The TrainJobs pxpo writes, checked against the released Kubeflow Trainer CRDs (tests/k8s/, vendored unchanged).

An API server prunes every field its CRD's structural schema does not declare (or rejects it under
strict field validation), so a manifest written for another Trainer release loses its volumes without
an error. :func:`violations` walks a manifest along the CRD's ``openAPIV3Schema`` as the API server
does on create and reports every field it would prune, plus wrong types, missing required fields,
enums, bounds, patterns, list-map keys and the CEL rules that apply on create; a schema construct it
does not know fails the test rather than passing unchecked. ``jsonschema`` (when installed) checks the
same manifests as a second, independent implementation of the standard keywords.

The patch must also name a replicated job and a container that the ``torch-distributed`` runtime
declares: the runtime merges patches by name, so a wrong name adds an image-less container instead
of patching the trainer's.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

import prereq
from pxpo.kubeflow.trainjob import NODE_JOB, TRAINER_APIS, run_multinode_train, train_command, trainjob_manifest

K8S = Path(__file__).parent / "k8s"
GOLDEN = Path(__file__).parent / "golden" / "trainjob.yaml"
CRD_FILES = {"v2.1": "trainer.kubeflow.org_trainjobs-v2.1.0.yaml", "v2.3": "trainer.kubeflow.org_trainjobs-v2.3.0.yaml"}
RUNTIME_FILE = "runtime-torch-distributed-v2.3.0.yaml"

# ---------------------------------------------------------------------------------------------------
# The CRD, the runtime, and a structural-schema validator


@cache
def crd(release: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / CRD_FILES[release]).read_text()) if d]
    (found,) = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert found["spec"]["names"]["kind"] == "TrainJob"
    return found


def schema_of(release: str, version: str = "v1alpha1") -> dict:
    (v,) = [v for v in crd(release)["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{version} is not served by Trainer {release}"
    return v["schema"]["openAPIV3Schema"]


@cache
def runtime() -> dict:
    """The v2.3.0 torch-distributed ClusterTrainingRuntime (a Helm template: its ``{{ ... }}`` lines only add labels)."""
    text = "\n".join(line for line in (K8S / RUNTIME_FILE).read_text().splitlines() if "{{" not in line)
    return yaml.safe_load(text)


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# Keywords a structural schema node may carry that the walker implements (or that do not constrain a create).
_KNOWN = {
    "type", "properties", "additionalProperties", "items", "required", "enum", "format", "pattern",
    "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "minProperties", "maxProperties",
    "anyOf", "nullable", "default", "description", "example",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def _cel(validation: dict, value, path: str) -> str | None:
    """The CEL rules of these CRDs that apply on create, evaluated; None when the rule holds or is a transition rule."""
    rule = validation["rule"]
    if "oldSelf" in rule:  # immutability: compares an update with the stored object, nothing on create
        return None
    if m := re.fullmatch(r"self\.metadata\.name\.matches\('(.+)'\)", rule):
        ok = re.search(m[1], str(value.get("metadata", {}).get("name", ""))) is not None
    elif m := re.fullmatch(r"size\(self\.metadata\.name\) <= (\d+)", rule):
        ok = len(str(value.get("metadata", {}).get("name", ""))) <= int(m[1])
    elif m := re.fullmatch(r"self == '' \|\| self\.matches\('(.+)'\)", rule):
        ok = value == "" or re.search(m[1], value) is not None
    elif m := re.fullmatch(r"self in \[(.*)\]", rule):
        ok = value in [s.strip().strip("'") for s in m[1].split(",")]
    else:
        return f"{path}: CEL rule this test cannot evaluate: {rule!r} (teach _cel)"
    return None if ok else f"{path}: {validation.get('message', 'invalid')} (fails the rule {rule!r})"


def violations(value, schema: dict, path: str = "") -> list[str]:
    """What an API server would prune or reject in ``value`` under the structural ``schema`` node (empty: accepted)."""
    where = path or "<root>"
    errors = [f"{where}: schema keyword {k!r} not implemented by this test" for k in schema if k not in _KNOWN]
    if value is None:
        return errors if schema.get("nullable") else [*errors, f"{where}: null (pruned: the field is not nullable)"]
    if schema.get("x-kubernetes-int-or-string"):
        if schema.get("anyOf", _INT_OR_STRING) != _INT_OR_STRING or not (_TYPES["integer"](value) or _TYPES["string"](value)):
            return [*errors, f"{where}: {value!r} is not an int-or-string"]
    elif "anyOf" in schema:
        errors.append(f"{where}: anyOf outside x-kubernetes-int-or-string is not implemented by this test")
    elif "type" in schema and not _TYPES[schema["type"]](value):
        return [*errors, f"{where}: {type(value).__name__} {value!r} where the schema says {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    for rule in schema.get("x-kubernetes-validations", []):
        if e := _cel(rule, value, where):
            errors.append(e)
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errors.append(f"{where}: length {len(value)} outside [{schema.get('minLength', 0)}, {schema.get('maxLength', 'inf')}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = _INT_RANGE.get(schema.get("format"), (float("-inf"), float("inf")))
        if not max(lo, schema.get("minimum", lo)) <= value <= min(hi, schema.get("maximum", hi)):
            errors.append(f"{where}: {value} outside the schema's range")
    elif isinstance(value, dict):
        errors += _object(value, schema, path)
    elif isinstance(value, list):
        errors += _array(value, schema, path)
    return errors


def _object(value: dict, schema: dict, path: str) -> list[str]:
    errors = [f"{path or '<root>'}: required field {k!r} missing" for k in schema.get("required", []) if k not in value]
    if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", float("inf")):
        errors.append(f"{path}: {len(value)} fields outside the schema's bounds")
    props, extra = schema.get("properties", {}), schema.get("additionalProperties", False)
    for key, item in value.items():
        sub = f"{path}.{key}" if path else key
        if key in props:
            errors += violations(item, props[key], sub)
        elif isinstance(extra, dict):
            errors += violations(item, extra, sub)
        elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
            continue
        else:
            errors.append(f"{sub}: not declared by the schema (the API server prunes it)")
    return errors


def _array(value: list, schema: dict, path: str) -> list[str]:
    errors = []
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", float("inf")):
        errors.append(f"{path}: {len(value)} items outside [{schema.get('minItems', 0)}, {schema.get('maxItems', 'inf')}]")
    if "items" not in schema:
        return [*errors, f"{path}: array schema without items"]
    for i, item in enumerate(value):
        errors += violations(item, schema["items"], f"{path}[{i}]")
    kind = schema.get("x-kubernetes-list-type")
    if kind == "map":
        keys = schema["x-kubernetes-list-map-keys"]
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
        errors += [f"{path}: list-map key {keys} missing in an item" for s in seen if None in s]
        if len(set(seen)) != len(seen):
            errors.append(f"{path}: duplicate list-map keys {keys}: {seen}")
    elif kind == "set" and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
        errors.append(f"{path}: duplicate items in a set")
    return errors


def trainjob_violations(manifest: dict, release: str) -> list[str]:
    """What Trainer ``release``'s API server would prune or reject in a TrainJob manifest."""
    spec = crd(release)["spec"]
    group, version = manifest.get("apiVersion", "/").split("/", 1)
    errors = [] if (group, manifest.get("kind")) == (spec["group"], spec["names"]["kind"]) else ["apiVersion / kind is not the CRD's"]
    # metadata is an ObjectMeta, validated by the API server itself (the CRD only says `type: object`)
    meta = manifest.get("metadata", {})
    if not isinstance(meta.get("name"), str) or not all(isinstance(v, str) for v in (meta.get("labels") or {}).values()):
        errors.append("metadata: name and label values must be strings")
    rest = {k: v for k, v in manifest.items() if k != "metadata"}
    schema = schema_of(release, version)
    root = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "metadata"}}
    checked = violations(rest, {k: v for k, v in root.items() if k != "x-kubernetes-validations"})
    return errors + checked + [e for r in schema.get("x-kubernetes-validations", []) if (e := _cel(r, manifest, "<root>"))]


def patch_targets(manifest: dict) -> list[tuple[str, list[str], list[str]]]:
    """(replicated job, container names, initContainer names) each pod-level override of ``manifest`` patches."""
    spec, out = manifest["spec"], []
    for patch in spec.get("runtimePatches", []):
        for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pod = job.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            out.append((job["name"], [c["name"] for c in pod.get("containers", [])], [c["name"] for c in pod.get("initContainers", [])]))
    for override in spec.get("podTemplateOverrides", []):
        pod = override.get("spec", {})
        for job in override["targetJobs"]:
            out.append((job["name"], [c["name"] for c in pod.get("containers", [])], [c["name"] for c in pod.get("initContainers", [])]))
    return out


def runtime_mismatches(manifest: dict) -> list[str]:
    """Names the manifest patches that the v2.3.0 torch-distributed runtime does not declare."""
    jobs = {j["name"]: j["template"]["spec"]["template"]["spec"] for j in runtime()["spec"]["template"]["spec"]["replicatedJobs"]}
    errors = []
    for job, containers, inits in patch_targets(manifest):
        if job not in jobs:
            errors.append(f"replicated job {job!r} is not in the runtime ({sorted(jobs)})")
            continue
        for names, field in ((containers, "containers"), (inits, "initContainers")):
            declared = {c["name"] for c in jobs[job].get(field, [])}
            errors += [f"{job}: {field} {n!r} is not in the runtime ({sorted(declared)})" for n in names if n not in declared]
    return errors


# ---------------------------------------------------------------------------------------------------
# The manifests


def _manifest(nodes: int, pvc: str | None, placement: bool, trainer_api: str) -> dict:
    root = "/pxpo-shared/pxpo/run-1-1"
    cmd = train_command(f"{root}/params.yaml", ["--rounds", "1", "--out", f"{root}/policy"], ["model.path=/models/sd15"])
    extra = {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]} if placement else {}
    return trainjob_manifest("pxpo-train-run-1-1", image="ghcr.io/pxpo/pxpo-cuda:1.0.0", command=cmd, num_nodes=nodes, gpus_per_node=8,
                             pvc=pvc, cpu="16", memory="128Gi", trainer_api=trainer_api, **extra)


VARIANTS = [(n, pvc, placement) for n in (1, 2, 4) for pvc in ("pxpo-shared", None) for placement in (False, True)]


@pytest.mark.parametrize(("nodes", "pvc", "placement"), VARIANTS)
def test_default_trainjob_is_valid_for_the_current_trainer_release(nodes, pvc, placement):
    m = _manifest(nodes, pvc, placement, "v2.3")
    assert trainjob_violations(m, "v2.3") == []
    assert runtime_mismatches(m) == []
    assert "podTemplateOverrides" not in m["spec"]
    (patch,) = m["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == NODE_JOB and m["spec"]["trainer"]["numNodes"] == nodes
    assert [v["name"] for v in pod["volumes"]] == (["pxpo-shared"] if pvc else []) + ["dshm"]
    assert [v["mountPath"] for v in pod["containers"][0]["volumeMounts"]] == (["/pxpo-shared"] if pvc else []) + ["/dev/shm"]
    assert ("nodeSelector" in pod, "tolerations" in pod) == (placement, placement)
    # the same manifest against v2.1 loses its patch: that release's server prunes runtimePatches
    assert any("spec.runtimePatches: not declared" in e for e in trainjob_violations(m, "v2.1"))


@pytest.mark.parametrize(("nodes", "pvc", "placement"), VARIANTS)
def test_v21_option_is_valid_for_trainer_v21_and_pruned_by_v23(nodes, pvc, placement):
    m = _manifest(nodes, pvc, placement, "v2.1")
    assert trainjob_violations(m, "v2.1") == []
    assert runtime_mismatches(m) == []
    assert "runtimePatches" not in m["spec"] and m["spec"]["podTemplateOverrides"][0]["targetJobs"] == [{"name": NODE_JOB}]
    assert trainjob_violations(m, "v2.3") == ["spec.podTemplateOverrides: not declared by the schema (the API server prunes it)"]


def test_no_volume_no_placement_means_no_patch():
    m = trainjob_manifest("pxpo-train-x", image="i", command=["c"], num_nodes=2, gpus_per_node=1, pvc=None, shm_size=None)
    assert "runtimePatches" not in m["spec"] and "podTemplateOverrides" not in m["spec"]
    assert trainjob_violations(m, "v2.3") == []


def test_v22_is_the_same_api_as_v23_and_unknown_releases_are_refused():
    assert _manifest(2, "pvc", True, "v2.2") == _manifest(2, "pvc", True, "v2.3")
    assert set(TRAINER_APIS) == {"v2.1", "v2.2", "v2.3"}
    with pytest.raises(ValueError, match="v2.1, v2.2, v2.3"):
        _manifest(2, "pvc", True, "v2.0")


def test_golden_trainjob_is_valid_for_the_current_trainer_release():
    golden = yaml.safe_load(GOLDEN.read_text())
    assert trainjob_violations(golden, "v2.3") == []
    assert runtime_mismatches(golden) == []


@pytest.mark.parametrize("trainer_api", ["v2.3", "v2.1"])
def test_pipeline_settings_reach_the_submitted_trainjob(tmp_path, trainer_api):
    """PipelineOptions -> trainjob_settings (JSON, as the train task gets it) -> run_multinode_train -> the created body."""
    from pipelines.pxpo_pipeline import PipelineOptions, trainjob_settings

    options = PipelineOptions(train_nodes=4, accelerator_limit=8, train_shared_pvc="pxpo-shared", train_trainer_api=trainer_api,
                              node_selector={"pool": "h100"}, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    settings = {**json.loads(json.dumps(trainjob_settings(options))), "mount_path": str(tmp_path / "pvc")}
    created = []

    class Api:
        def create_namespaced_custom_object(self, group, version, ns, plural, body, field_validation=None):
            assert field_validation == "Strict"
            created.append(body)
            cmd = body["spec"]["trainer"]["command"]
            Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True)

        def get_namespaced_custom_object(self, *a):
            return {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}

    traj = tmp_path / "t"
    traj.mkdir()
    run_multinode_train(settings, {"train": "train: {}\n"}, {"trajectories": str(traj)}, str(tmp_path / "out"), [],
                        run_id="01HZX-Run_7", rounds=1, api=Api())
    (body,) = created
    release = "v2.1" if trainer_api == "v2.1" else "v2.3"
    assert trainjob_violations(body, release) == [] and runtime_mismatches(body) == []
    assert body["spec"]["trainer"]["numNodes"] == 4
    assert TRAINER_APIS[trainer_api] in body["spec"]


def test_unknown_trainer_api_option_fails_at_compile_time():
    from pipelines.pxpo_pipeline import PipelineOptions, trainjob_settings
    from pxpo.errors import PxpoInputError

    with pytest.raises(PxpoInputError, match="train_trainer_api"):
        trainjob_settings(PipelineOptions(train_nodes=2, train_shared_pvc="p", train_trainer_api="v2.0"))


# ---------------------------------------------------------------------------------------------------
# The checks themselves catch what they are for


def test_the_validator_reports_what_the_server_prunes_or_rejects():
    good = _manifest(2, "pxpo-shared", True, "v2.3")
    pod = lambda m: m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]  # noqa: E731
    cases = {
        "spec.trainer.numNodes: str": lambda m: m["spec"]["trainer"].update(numNodes="2"),
        "spec.trainer.resourcesPerNode.limits.nvidia.com/gpu: 1.5 is not an int-or-string": lambda m: m["spec"]["trainer"]["resourcesPerNode"]["limits"].update({"nvidia.com/gpu": 1.5}),
        "does not match": lambda m: m["spec"]["trainer"]["resourcesPerNode"]["limits"].update(memory="lots"),
        "spec.trainer.nodes: not declared": lambda m: m["spec"]["trainer"].update(nodes=2),
        "required field 'manager' missing": lambda m: m["spec"]["runtimePatches"][0].pop("manager"),
        "required field 'claimName' missing": lambda m: pod(m)["volumes"][0]["persistentVolumeClaim"].pop("claimName"),
        "containers[0].resources: not declared": lambda m: pod(m)["containers"][0].update(resources={}),  # a patch cannot set resources
        "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec.hostNetwork: not declared":
            lambda m: pod(m).update(hostNetwork=True),
        "duplicate list-map keys": lambda m: pod(m)["volumes"].append(dict(pod(m)["volumes"][0])),
        "RFC 1035": lambda m: m["metadata"].update(name="Pxpo_Train"),
        "fails the rule \"size(self.metadata.name) <= 63\"": lambda m: m["metadata"].update(name="p" * 64),
        "null (pruned": lambda m: m["spec"]["trainer"].update(image=None),
        "length 0": lambda m: m["spec"]["runtimePatches"][0].update(manager=""),
        "spec.managedBy: ManagedBy must be": lambda m: m["spec"].update(managedBy="pxpo"),
        "not one of": lambda m: m.update(status={"conditions": [{"type": "Complete", "status": "Yes", "lastTransitionTime": "t", "message": "", "reason": "r"}]}),
        "apiVersion / kind": lambda m: m.update(kind="PyTorchJob"),
    }
    for expected, break_it in cases.items():
        bad = copy.deepcopy(good)
        break_it(bad)
        found = trainjob_violations(bad, "v2.3")
        assert any(expected in e or expected.replace('"', "'") in e for e in found), (expected, found)


def test_the_runtime_check_catches_a_patch_that_targets_nothing():
    """The upstream migration example patches a container named ``trainer``; the torch-distributed runtime's is ``node``."""
    jobs = runtime()["spec"]["template"]["spec"]["replicatedJobs"]
    (node,) = [j for j in jobs if j["name"] == NODE_JOB]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"  # the trainer's job
    assert [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]] == [NODE_JOB]
    m = _manifest(2, "pxpo-shared", False, "v2.3")
    job = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert runtime_mismatches(m) == ["node: containers 'trainer' is not in the runtime (['node'])"]
    job["name"] = "worker"
    assert runtime_mismatches(m) == ["replicated job 'worker' is not in the runtime (['node'])"]
    assert trainjob_violations(m, "v2.3") == []  # schema-valid all the same: only the runtime check sees it


def _strict(schema):
    """A copy for jsonschema: objects with declared properties allow no others (the API server's pruning)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if k not in ("properties", "x-kubernetes-validations")}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.mark.parametrize(("trainer_api", "release"), [("v2.3", "v2.3"), ("v2.1", "v2.1"), ("v2.1", "v2.3"), ("v2.3", "v2.1")])
def test_jsonschema_agrees(trainer_api, release):
    """A second implementation of the standard keywords (types, required, enums, bounds, patterns) agrees."""
    jsonschema = prereq.import_module("jsonschema")
    validator = jsonschema.Draft7Validator(_strict(schema_of(release)))
    for nodes, pvc, placement in VARIANTS:
        m = _manifest(nodes, pvc, placement, trainer_api)
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(m)]
        assert (errors == []) == (trainjob_violations(m, release) == []) == (trainer_api == release), errors
        if trainer_api != release:
            assert any("Additional properties are not allowed" in e for e in errors)
