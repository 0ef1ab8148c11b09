#!/usr/bin/env python3
"""Checks the invariants of metaloop's rendered Kubernetes manifests (run by scripts/check-k8s).

    k8s_invariants.py --quickstart configs/quickstart.toml --text-config configs/text-domain-weights.toml \
        cpu-dev=RENDERED.yaml gpu=RENDERED.yaml text-cpu=RENDERED.yaml

Each argument is an overlay's name and the output of `kubectl kustomize` for it. An overlay whose
name starts with "gpu" must give every worker an NVIDIA GPU; every other overlay must give none.
An overlay whose name starts with "text" runs the --text-config job, its model and text files
installed by an init container (scripts/text_assets.py) under /var/lib/metaloop-text/text-v2;
every other overlay runs the quickstart from the image.
Every check is printed, "ok" or "FAIL" with the object it concerns; the exit status is 1 when
any check failed.

What is checked, and why (the program's side is in README.md and docs/kubernetes.md):
- every container has a liveness probe on /healthz and a readiness probe on /readyz, on a
  declared TCP port. Workers too: no Service routes to them, so their readiness gates no
  traffic, but it is what `kubectl get pods` and `kubectl wait` show. Init containers (other
  than sidecars) are exempt: Kubernetes refuses probes on them;
- every container, init containers included, has cpu and memory requests and limits, requests
  not above limits;
- pods run as a non-root, non-zero user, without privilege escalation or privileged mode, with a
  read-only root filesystem, every capability dropped, the runtime's seccomp profile, no host
  namespaces or hostPath volumes, and no service account token (they never call the API);
- every pod sets terminationGracePeriodSeconds; the coordinator's leaves it time to checkpoint;
- the coordinator's Service exposes 7070/UDP (QUIC) and 9090/TCP (metrics), on the ports the
  container declares with the same protocols, and selects the coordinator's pod;
- the coordinator is a one-replica StatefulSet governed by that Service, with a
  volumeClaimTemplate mounted at its --run-dir (or a parent of it), and runs with --resume;
- its --config is a file of a mounted ConfigMap that exists, and that file is
  configs/quickstart.toml with its data paths made absolute under the image's /opt/metaloop
  (a text overlay: the --text-config job, its ../data/text/ paths under
  /var/lib/metaloop-text/text-v2, the rest under /opt/metaloop);
- the coordinator and the worker run one image with a fixed tag (init containers may use
  another image, also with a fixed tag);
- text overlays: every path under /var/lib/metaloop-text of the job is on a volume that the
  coordinator and the worker mount read-only and that an init container of the same pod fills
  by running text_assets.py from a mounted ConfigMap with METALOOP_CACHE at that volume; the
  main containers' METALOOP_CACHE (tokenized text) is on a writable volume;
- --min-workers is at least 1 and at most the worker Job's parallelism (else it waits forever);
- the workers are an Indexed Job with completions = parallelism, dialling the coordinator
  Service's DNS name in their own namespace on its UDP port, with --reconnect-for >= 300 s so
  they outlive a coordinator restart;
- both roles take --ca/--cert/--key (or METALOOP_CA/_CERT/_KEY) from the same Secret, each
  mounting only its own certificate and key (never the other role's key), the key with mode
  0400 or 0440, readable through fsGroup; the Secret itself is not in the output (private keys
  stay out of the repository);
- GPU overlays request nvidia.com/gpu in every worker's limits and pass --devices; others
  request no GPU anywhere and pass no --devices;
- metrics: the two roles' pods are selected by a PodMonitor (or ServiceMonitor) on their metrics
  port; the Grafana dashboard ConfigMap carries grafana_dashboard: "1" and valid JSON; the
  alert rules ConfigMap carries a rule file with groups;
- everything lives in one Namespace that enforces the "restricted" Pod Security Standard;
- with --metaloop-bin (scripts/check-k8s passes $METALOOP_BIN; tests/k8s.rs always sets it):
  every flag and METALOOP_* variable the manifests give a role is in that role's `--help`
  (flags the program is known not to have yet are listed in PENDING_FLAGS and only reported;
  variables read outside the flags, ENV_OUTSIDE_FLAGS, must appear in the binary instead),
  and the job config passes `metaloop validate` with its data paths pointed at this repository
  (a text job's at data/text, which scripts/text-assets installs).
"""

import argparse
import json
import pathlib
import posixpath
import re
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

IMAGE_ROOT = "/opt/metaloop"  # where the Dockerfile puts configs/ and data/
# Text overlays: where the init container installs the text assets (scripts/text_assets.py with
# METALOOP_CACHE=/var/lib/metaloop-text); in a checkout, data/text links to the same text-v2.
TEXT_VOLUME = "/var/lib/metaloop-text"
TEXT_ROOT = TEXT_VOLUME + "/text-v2"
TEXT_RELATIVE = "data/text"  # ... which the text configs name as ../data/text/
TEXT_ASSETS_SCRIPT = "text_assets.py"
# METALOOP_* variables the program reads outside its flags (so not in `--help`), with where.
ENV_OUTSIDE_FLAGS = {
    "METALOOP_CACHE": "the tokenized-text cache, common/src/data.rs text_cache_dir()",
}
QUIC_PORT = 7070
METRICS_PORT = 9090
SECRET_KEYS = {
    "coordinator": {"ca.pem", "coordinator.pem", "coordinator.key", "crl.pem"},
    "worker": {"ca.pem", "worker.pem", "worker.key"},
}
TLS_ENV = {"--ca": "METALOOP_CA", "--cert": "METALOOP_CERT", "--key": "METALOOP_KEY"}
BOOLEAN_FLAGS = {"--resume"}
# Flags the manifests pass that the program does not have yet, with why; reported, not failed.
# (None now: `--devices`, which the gpu overlay passes, is in `metaloop worker --help`.)
PENDING_FLAGS = {}
MIN_COORDINATOR_GRACE = 45
MIN_RECONNECT_FOR = 300
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


class Report:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, overlay, what, problems):
        if problems:
            self.failed += 1
            for p in problems:
                print(f"FAIL {overlay}: {what}: {p}")
        else:
            self.passed += 1
            print(f"ok   {overlay}: {what}")


def ref(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_spec(obj):
    kind = obj.get("kind")
    if kind in POD_TEMPLATE_KINDS:
        return obj.get("spec", {}).get("template", {}).get("spec", {})
    if kind == "CronJob":
        return obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    if kind == "Pod":
        return obj.get("spec", {})
    return None


def pod_labels(obj):
    if obj.get("kind") == "Pod":
        return obj.get("metadata", {}).get("labels", {}) or {}
    return obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def containers(spec):
    return list(spec.get("initContainers", []) or []) + list(spec.get("containers", []) or [])


def long_running(spec):
    """The containers that run alongside the program: the containers and sidecars (init
    containers with restartPolicy Always). Other init containers run to completion first and
    may have no probes."""
    sidecars = [c for c in spec.get("initContainers", []) or [] if c.get("restartPolicy") == "Always"]
    return sidecars + list(spec.get("containers", []) or [])


def where(obj, c=None):
    return f"{ref(obj)}, container {c.get('name')}" if c else ref(obj)


# ---------------------------------------------------------------------------------------------
# Values.

CPU = re.compile(r"^([0-9.]+)(m?)$")
MEM_SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 1e-3}
MEM = re.compile(r"^([0-9.]+(?:[eE][0-9]+)?)([a-zA-Z]*)$")


def quantity(resource, value):
    """A Kubernetes quantity as a float (cores for cpu, bytes otherwise), or None if malformed."""
    s = str(value)
    if resource == "cpu":
        m = CPU.match(s)
        if not m:
            return None
        return float(m.group(1)) / (1000 if m.group(2) else 1)
    m = MEM.match(s)
    if not m or m.group(2) not in MEM_SUFFIX:
        return None
    return float(m.group(1)) * MEM_SUFFIX[m.group(2)]


def env_value(obj, c, name):
    """The value a container's environment gives `name` (literal, or a pod field), or None."""
    for e in c.get("env", []) or []:
        if e.get("name") != name:
            continue
        if "value" in e:
            return str(e["value"])
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field == "metadata.namespace":
            return obj.get("metadata", {}).get("namespace", "default")
        if field == "metadata.name":
            return "POD-NAME"
        return None
    return None


def expand(obj, c, s):
    """Kubernetes' $(VAR) expansion of a command-line argument."""
    def sub(m):
        v = env_value(obj, c, m.group(1))
        return v if v is not None else m.group(0)
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def flags(obj, c):
    """(subcommand, {flag: value or True}) from a container's args (command, then args)."""
    argv = [expand(obj, c, str(a)) for a in (c.get("command", []) or []) + (c.get("args", []) or [])]
    positional = [a for a in argv if not a.startswith("-")]
    sub = None
    for a in positional:
        if a in ("coordinator", "worker", "local", "validate", "certs"):
            sub = a
            break
    out = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out.setdefault(k, v)
            elif a in BOOLEAN_FLAGS or i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                out.setdefault(a, True)
            else:
                out.setdefault(a, argv[i + 1])
                i += 1
        i += 1
    return sub, out


def host_port(value):
    if not isinstance(value, str) or ":" not in value:
        return None, None
    host, port = value.rsplit(":", 1)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return host, None


def container_port(c, port, protocol=None):
    """The container port a probe or Service targetPort refers to (by name or number)."""
    for p in c.get("ports", []) or []:
        proto = p.get("protocol", "TCP")
        if (port == p.get("name") or port == p.get("containerPort")) and (protocol is None or proto == protocol):
            return p
    return None


# ---------------------------------------------------------------------------------------------
# Volumes: which file comes from where.

def mounted_files(obj, c):
    """{path in the container: (source kind, source name, key, mode)} for ConfigMap and Secret
    volumes (plain or projected) that the container mounts."""
    spec = pod_spec(obj)
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    files = {}

    def add(mount_path, kind, source, default_mode):
        name = source.get("name") or source.get("secretName")
        items = source.get("items")
        if items:
            for it in items:
                files[posixpath.join(mount_path, it["path"])] = (kind, name, it["key"], it.get("mode", default_mode))
        else:
            files[posixpath.join(mount_path, "*")] = (kind, name, "*", default_mode)

    for m in c.get("volumeMounts", []) or []:
        v = volumes.get(m.get("name"))
        if not v:
            continue
        base = m.get("mountPath", "")
        if m.get("subPath"):
            continue  # not used by these manifests; a subPath mount is a single file or folder
        if "configMap" in v:
            add(base, "ConfigMap", v["configMap"], v["configMap"].get("defaultMode", 0o644))
        elif "secret" in v:
            add(base, "Secret", v["secret"], v["secret"].get("defaultMode", 0o644))
        elif "projected" in v:
            dm = v["projected"].get("defaultMode", 0o644)
            for src in v["projected"].get("sources", []) or []:
                if "configMap" in src:
                    add(base, "ConfigMap", src["configMap"], dm)
                elif "secret" in src:
                    add(base, "Secret", src["secret"], dm)
    return files


def file_source(files, path):
    if path in files:
        return files[path]
    star = posixpath.join(posixpath.dirname(path), "*")
    if star in files:
        kind, name, _, mode = files[star]
        return kind, name, posixpath.basename(path), mode
    return None


def is_under(path, parent):
    path, parent = posixpath.normpath(path), posixpath.normpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def covering_mount(c, path):
    """The volumeMount of container `c` that `path` is on (the deepest one), or None."""
    found = None
    for m in c.get("volumeMounts", []) or []:
        if is_under(path, m.get("mountPath", "")) and (found is None or len(m["mountPath"]) > len(found["mountPath"])):
            found = m
    return found


WRITABLE_VOLUMES = ("emptyDir", "persistentVolumeClaim", "ephemeral")


def writable(spec, c, path):
    """Whether `path` is on a writable volume of container `c` (the root filesystem is read-only)."""
    m = covering_mount(c, path)
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    if m is None or m.get("readOnly"):
        return False
    if m.get("name") in volumes:
        return any(k in volumes[m["name"]] for k in WRITABLE_VOLUMES)
    # a volumeClaimTemplate of a StatefulSet
    return True


def strings(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)
    elif isinstance(v, str):
        yield v


# ---------------------------------------------------------------------------------------------
# The checks.

def check_overlay(report, overlay, docs, quickstart, text_config, metaloop_bin=None, repo_root=None):
    gpu = overlay.startswith("gpu")
    is_text = overlay.startswith("text")
    job_config = text_config if is_text else quickstart
    job_name = pathlib.Path(job_config).name
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    workloads = [d for d in docs if pod_spec(d) is not None]

    def role_of(obj):
        spec = pod_spec(obj)
        subs = {flags(obj, c)[0] for c in spec.get("containers", []) or []}
        return next((s for s in ("coordinator", "worker") if s in subs), None)

    coordinators = [w for w in workloads if role_of(w) == "coordinator"]
    workers = [w for w in workloads if role_of(w) == "worker"]
    report.check(overlay, "one coordinator workload and one worker workload", [
        p for p in [
            None if len(coordinators) == 1 else f"found {len(coordinators)} workloads running `metaloop coordinator`: {[ref(w) for w in coordinators]}",
            None if len(workers) == 1 else f"found {len(workers)} workloads running `metaloop worker`: {[ref(w) for w in workers]}",
        ] if p
    ])
    if len(coordinators) != 1 or len(workers) != 1:
        return
    coord, work = coordinators[0], workers[0]
    coord_c = next(c for c in pod_spec(coord)["containers"] if flags(coord, c)[0] == "coordinator")
    work_c = next(c for c in pod_spec(work)["containers"] if flags(work, c)[0] == "worker")
    _, cflags = flags(coord, coord_c)
    _, wflags = flags(work, work_c)

    # -- probes --------------------------------------------------------------------------------
    problems = []
    for w in workloads:
        for c in long_running(pod_spec(w)):
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
                p = c.get(probe)
                if p is None:
                    if probe != "startupProbe":
                        problems.append(f"{where(w, c)}: no {probe}")
                    continue
                get = p.get("httpGet")
                if not get:
                    problems.append(f"{where(w, c)}: {probe} is not an HTTP GET of {path}")
                    continue
                if get.get("path") != path:
                    problems.append(f"{where(w, c)}: {probe} asks {get.get('path')!r}, expected {path!r}")
                if container_port(c, get.get("port"), "TCP") is None:
                    problems.append(f"{where(w, c)}: {probe} port {get.get('port')!r} is not a TCP port the container declares")
    report.check(overlay, "every container (init containers aside) has a liveness (/healthz) and a readiness (/readyz) probe on a declared port", problems)

    # -- resources -----------------------------------------------------------------------------
    problems = []
    for w in workloads:
        for c in containers(pod_spec(w)):
            res = c.get("resources", {}) or {}
            for r in ("cpu", "memory"):
                req = (res.get("requests") or {}).get(r)
                lim = (res.get("limits") or {}).get(r)
                if req is None:
                    problems.append(f"{where(w, c)}: no {r} request")
                if lim is None:
                    problems.append(f"{where(w, c)}: no {r} limit")
                if req is not None and lim is not None:
                    qr, ql = quantity(r, req), quantity(r, lim)
                    if qr is None or ql is None:
                        problems.append(f"{where(w, c)}: {r} quantity {req!r} or {lim!r} is malformed")
                    elif qr > ql:
                        problems.append(f"{where(w, c)}: {r} request {req} is above its limit {lim}")
    report.check(overlay, "every container requests and limits cpu and memory (requests <= limits)", problems)

    # -- security ------------------------------------------------------------------------------
    problems = []
    for w in workloads:
        spec = pod_spec(w)
        psc = spec.get("securityContext", {}) or {}
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(k):
                problems.append(f"{where(w)}: {k} is set")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where(w)}: automountServiceAccountToken is not false (nothing here calls the Kubernetes API)")
        for v in spec.get("volumes", []) or []:
            if "hostPath" in v:
                problems.append(f"{where(w)}: volume {v.get('name')} is a hostPath")
        for c in containers(spec):
            sc = c.get("securityContext", {}) or {}
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            if non_root is not True:
                problems.append(f"{where(w, c)}: runAsNonRoot is not true")
            if not isinstance(uid, int) or uid == 0:
                problems.append(f"{where(w, c)}: runAsUser is {uid!r}, expected a non-zero user id")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where(w, c)}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where(w, c)}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where(w, c)}: readOnlyRootFilesystem is not true")
            caps = sc.get("capabilities", {}) or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{where(w, c)}: capabilities.drop does not contain ALL")
            if caps.get("add"):
                problems.append(f"{where(w, c)}: adds capabilities {caps['add']}")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where(w, c)}: seccompProfile is {seccomp!r}, expected RuntimeDefault")
    report.check(overlay, "pods run as non-root (non-zero runAsUser), no privilege escalation, read-only root filesystem, capabilities dropped, seccomp RuntimeDefault", problems)

    # -- grace periods -------------------------------------------------------------------------
    problems = []
    for w in workloads:
        g = pod_spec(w).get("terminationGracePeriodSeconds")
        if not isinstance(g, int):
            problems.append(f"{where(w)}: terminationGracePeriodSeconds is not set")
    g = pod_spec(coord).get("terminationGracePeriodSeconds")
    if isinstance(g, int) and g < MIN_COORDINATOR_GRACE:
        problems.append(f"{where(coord)}: terminationGracePeriodSeconds {g} leaves too little time to write a checkpoint and stop the workers (want >= {MIN_COORDINATOR_GRACE})")
    report.check(overlay, "terminationGracePeriodSeconds set on every pod (coordinator >= %d s)" % MIN_COORDINATOR_GRACE, problems)

    # -- images --------------------------------------------------------------------------------
    images = {c.get("image") for w in workloads for c in pod_spec(w).get("containers", []) or []}
    problems = []
    if len(images) != 1:
        problems.append(f"the containers use different images {sorted(map(str, images))}; coordinator and workers must run the same build")
    for img in images | {c.get("image") for w in workloads for c in containers(pod_spec(w))}:
        if not img or img.endswith(":latest") or (":" not in img.rsplit("/", 1)[-1] and "@" not in img):
            problems.append(f"image {img!r} has no fixed tag or digest")
    report.check(overlay, "coordinator and workers run one image with a fixed tag (every image has one)", problems)

    # -- the coordinator's Service -------------------------------------------------------------
    problems = []
    labels = pod_labels(coord)
    services = [s for s in by_kind.get("Service", [])
                if s.get("spec", {}).get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
    dial_host, dial_port = host_port(wflags.get("--coordinator"))
    svc_name = (dial_host or "").split(".")[0]
    service = next((s for s in services if s["metadata"]["name"] == svc_name), None)
    if service is None:
        problems.append(f"no Service named {svc_name!r} (the host workers dial) selects the coordinator pod {ref(coord)}; Services selecting it: {[ref(s) for s in services]}")
    else:
        ports = service["spec"].get("ports", []) or []
        for number, proto, what in ((QUIC_PORT, "UDP", "QUIC"), (METRICS_PORT, "TCP", "metrics")):
            p = next((p for p in ports if p.get("port") == number), None)
            if p is None:
                problems.append(f"{ref(service)}: no port {number} ({what})")
                continue
            if p.get("protocol", "TCP") != proto:
                problems.append(f"{ref(service)}: port {number} ({what}) has protocol {p.get('protocol', 'TCP')}, expected {proto}")
            target = p.get("targetPort", number)
            cp = container_port(coord_c, target, proto)
            if cp is None:
                problems.append(f"{ref(service)}: port {number} targets {target!r}, which {where(coord, coord_c)} does not declare with protocol {proto}")
    report.check(overlay, f"the coordinator Service exposes {QUIC_PORT}/UDP (QUIC) and {METRICS_PORT}/TCP (metrics) on the container's ports", problems)

    # -- the StatefulSet and its volume --------------------------------------------------------
    problems = []
    if coord.get("kind") != "StatefulSet":
        problems.append(f"{ref(coord)}: the coordinator should be a StatefulSet (stable identity and volume)")
    else:
        if coord["spec"].get("replicas", 1) != 1:
            problems.append(f"{ref(coord)}: replicas is {coord['spec'].get('replicas')}, must be 1")
        if service is not None and coord["spec"].get("serviceName") != service["metadata"]["name"]:
            problems.append(f"{ref(coord)}: serviceName {coord['spec'].get('serviceName')!r} is not the coordinator Service {service['metadata']['name']!r}")
        vcts = {t.get("metadata", {}).get("name"): t for t in coord["spec"].get("volumeClaimTemplates", []) or []}
        run_dir = cflags.get("--run-dir")
        if not vcts:
            problems.append(f"{ref(coord)}: no volumeClaimTemplates (checkpoints would die with the pod)")
        if not isinstance(run_dir, str):
            problems.append(f"{where(coord, coord_c)}: no --run-dir")
        elif vcts:
            mounts = [m for m in coord_c.get("volumeMounts", []) or [] if m.get("name") in vcts]
            if not any(is_under(run_dir, m.get("mountPath", "")) for m in mounts):
                problems.append(f"{where(coord, coord_c)}: --run-dir {run_dir} is not on a volumeClaimTemplate mount ({[m.get('mountPath') for m in mounts]})")
            for name, t in vcts.items():
                if not (t.get("spec", {}).get("resources", {}).get("requests", {}) or {}).get("storage"):
                    problems.append(f"{ref(coord)}: volumeClaimTemplate {name} requests no storage")
        if cflags.get("--resume") is not True:
            problems.append(f"{where(coord, coord_c)}: no --resume (a restarted pod would start the job over)")
    report.check(overlay, "the coordinator is a 1-replica StatefulSet with a volumeClaimTemplate at its --run-dir, run with --resume", problems)

    # -- coordinator flags and the job config --------------------------------------------------
    problems = []
    files = mounted_files(coord, coord_c)
    config_path = cflags.get("--config")
    config_map = None
    if not isinstance(config_path, str):
        problems.append(f"{where(coord, coord_c)}: no --config")
    else:
        src = file_source(files, config_path)
        if src is None or src[0] != "ConfigMap":
            problems.append(f"{where(coord, coord_c)}: --config {config_path} is not a file of a mounted ConfigMap")
        else:
            _, cm_name, key, _ = src
            config_map = next((m for m in by_kind.get("ConfigMap", []) if m["metadata"]["name"] == cm_name), None)
            if config_map is None:
                problems.append(f"{where(coord, coord_c)}: mounts ConfigMap/{cm_name}, which is not in the output")
            elif key not in (config_map.get("data") or {}):
                problems.append(f"ConfigMap/{cm_name} has no key {key!r} for --config {config_path}")
            else:
                problems += compare_job_config(f"ConfigMap/{cm_name} {key}", config_map["data"][key], job_config, is_text)
    _, listen_port = host_port(cflags.get("--listen"))
    if container_port(coord_c, listen_port, "UDP") is None:
        problems.append(f"{where(coord, coord_c)}: --listen {cflags.get('--listen')!r} is not on a UDP port the container declares")
    _, metrics_port = host_port(cflags.get("--metrics-listen"))
    probe_port = container_port(coord_c, ((coord_c.get("livenessProbe") or {}).get("httpGet") or {}).get("port"), "TCP")
    if metrics_port is None or probe_port is None or probe_port.get("containerPort") != metrics_port:
        problems.append(f"{where(coord, coord_c)}: --metrics-listen {cflags.get('--metrics-listen')!r} is not the port its probes use")
    if cflags.get("--log-format") != "json":
        problems.append(f"{where(coord, coord_c)}: --log-format is {cflags.get('--log-format')!r}, expected json for a cluster")
    try:
        min_workers = int(cflags.get("--min-workers"))
    except (TypeError, ValueError):
        min_workers = None
        problems.append(f"{where(coord, coord_c)}: --min-workers {cflags.get('--min-workers')!r} is not a number (after $(VAR) expansion)")
    parallelism = work.get("spec", {}).get("parallelism")
    if min_workers is not None:
        if min_workers < 1:
            problems.append(f"{where(coord, coord_c)}: --min-workers {min_workers} < 1")
        if isinstance(parallelism, int) and min_workers > parallelism:
            problems.append(f"{where(coord, coord_c)}: --min-workers {min_workers} is above {ref(work)}'s parallelism {parallelism}: the first round would never start")
    report.check(overlay, f"coordinator flags: --config from the job ConfigMap (= {job_name}, absolute paths), --listen on the UDP port, --metrics-listen on the probes' port, --log-format json, 1 <= --min-workers <= worker parallelism", problems)

    # -- the worker Job ------------------------------------------------------------------------
    problems = []
    spec = work.get("spec", {})
    if work.get("kind") != "Job":
        problems.append(f"{ref(work)}: the workers should be a Job")
    else:
        if spec.get("completionMode") != "Indexed":
            problems.append(f"{ref(work)}: completionMode is {spec.get('completionMode')!r}, expected Indexed")
        if not isinstance(spec.get("parallelism"), int) or spec.get("parallelism") < 1:
            problems.append(f"{ref(work)}: parallelism is {spec.get('parallelism')!r}")
        if spec.get("completions") != spec.get("parallelism"):
            problems.append(f"{ref(work)}: completions {spec.get('completions')!r} != parallelism {spec.get('parallelism')!r} (one worker per index)")
    if pod_spec(work).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{ref(work)}: restartPolicy {pod_spec(work).get('restartPolicy')!r}")
    report.check(overlay, "the workers are an Indexed Job with completions = parallelism", problems)

    problems = []
    ns = work.get("metadata", {}).get("namespace", "default")
    if service is not None:
        svc_ns = service["metadata"].get("namespace", "default")
        accepted = {f"{svc_name}.{svc_ns}.svc.cluster.local"} | ({svc_name, f"{svc_name}.{svc_ns}", f"{svc_name}.{svc_ns}.svc"} if svc_ns == ns else set())
        if dial_host not in accepted:
            problems.append(f"{where(work, work_c)}: --coordinator host {dial_host!r} is not the Service's DNS name {svc_name}.{svc_ns}.svc.cluster.local")
        udp = [p.get("port") for p in service["spec"].get("ports", []) if p.get("protocol", "TCP") == "UDP"]
        if dial_port not in udp:
            problems.append(f"{where(work, work_c)}: --coordinator port {dial_port!r} is not a UDP port of {ref(service)} ({udp})")
    else:
        problems.append(f"{where(work, work_c)}: --coordinator {wflags.get('--coordinator')!r} names no Service that selects the coordinator")
    try:
        reconnect = int(wflags.get("--reconnect-for", 60))
    except (TypeError, ValueError):
        reconnect = 0
    if reconnect < MIN_RECONNECT_FOR:
        problems.append(f"{where(work, work_c)}: --reconnect-for {wflags.get('--reconnect-for', '60 (default)')} is shorter than {MIN_RECONNECT_FOR} s: workers would give up during a coordinator restart")
    _, wmetrics = host_port(wflags.get("--metrics-listen"))
    wprobe = container_port(work_c, ((work_c.get("livenessProbe") or {}).get("httpGet") or {}).get("port"), "TCP")
    if wmetrics is None or wprobe is None or wprobe.get("containerPort") != wmetrics:
        problems.append(f"{where(work, work_c)}: --metrics-listen {wflags.get('--metrics-listen')!r} is not the port its probes use")
    if wflags.get("--log-format") != "json":
        problems.append(f"{where(work, work_c)}: --log-format is {wflags.get('--log-format')!r}, expected json")
    report.check(overlay, f"worker flags: --coordinator is the Service's DNS name and UDP port, --reconnect-for >= {MIN_RECONNECT_FOR}, --metrics-listen on the probes' port, --log-format json", problems)

    # -- TLS -----------------------------------------------------------------------------------
    problems = []
    secret_names = {}
    for role, obj, c, fl in (("coordinator", coord, coord_c, cflags), ("worker", work, work_c, wflags)):
        files = mounted_files(obj, c)
        fs_group = (pod_spec(obj).get("securityContext") or {}).get("fsGroup")
        for flag, env in TLS_ENV.items():
            path = fl.get(flag)
            if path is None:
                path = env_value(obj, c, env)
            if not isinstance(path, str):
                problems.append(f"{where(obj, c)}: neither {flag} nor {env} is set")
                continue
            src = file_source(files, path)
            if src is None or src[0] != "Secret":
                problems.append(f"{where(obj, c)}: {flag} {path} is not a file of a mounted Secret")
                continue
            _, name, key, mode = src
            secret_names.setdefault(name, set()).add(role)
            want = {"--ca": "ca.pem", "--cert": f"{role}.pem", "--key": f"{role}.key"}[flag]
            if key != want:
                problems.append(f"{where(obj, c)}: {flag} {path} is Secret/{name} key {key!r}, expected {want!r}")
            if flag == "--key":
                if mode not in (0o400, 0o440):
                    problems.append(f"{where(obj, c)}: the private key {path} has mode {oct(mode) if isinstance(mode, int) else mode}, expected 0400 or 0440")
                if not isinstance(fs_group, int):
                    problems.append(f"{ref(obj)}: no fsGroup: the non-root user could not read the root-owned key {path}")
        for f, (kind, name, key, _) in files.items():
            if kind != "Secret":
                continue
            if key == "*":
                problems.append(f"{where(obj, c)}: mounts every key of Secret/{name} at {posixpath.dirname(f)}; list the items it needs")
            elif key not in SECRET_KEYS[role]:
                problems.append(f"{where(obj, c)}: mounts Secret/{name} key {key!r}, which the {role} does not need")
    if len(secret_names) > 1:
        problems.append(f"the roles take their certificates from different Secrets: {secret_names}")
    elif len(secret_names) == 1:
        name, roles = next(iter(secret_names.items()))
        if roles != {"coordinator", "worker"}:
            problems.append(f"Secret/{name} is used by {roles} only")
    for s in by_kind.get("Secret", []):
        problems.append(f"{ref(s)} is in the output: private keys must not live in the repository; create the Secret from `metaloop certs init` instead")
    report.check(overlay, "both roles take CA, certificate and key from one Secret (created outside kustomize), each only its own key, mode 0400/0440 with fsGroup", problems)

    # -- references ----------------------------------------------------------------------------
    problems = []
    if config_map is None:
        problems.append("no ConfigMap with the job config is referenced")
    if not secret_names:
        problems.append("no Secret with certificates is referenced")
    report.check(overlay, "references the Secret %s and the ConfigMap %s" % (
        "/".join(sorted(secret_names)) or "-", config_map["metadata"]["name"] if config_map else "-"), problems)

    # -- GPUs ----------------------------------------------------------------------------------
    problems = []
    for w in workloads:
        for c in containers(pod_spec(w)):
            res = c.get("resources", {}) or {}
            lim = (res.get("limits") or {}).get("nvidia.com/gpu")
            req = (res.get("requests") or {}).get("nvidia.com/gpu")
            is_worker = w is work and c is work_c
            if gpu and is_worker:
                try:
                    n = int(lim)
                except (TypeError, ValueError):
                    n = 0
                if n < 1:
                    problems.append(f"{where(w, c)}: no nvidia.com/gpu in its limits")
                if req is not None and str(req) != str(lim):
                    problems.append(f"{where(w, c)}: nvidia.com/gpu request {req} differs from its limit {lim}")
            elif lim is not None or req is not None:
                problems.append(f"{where(w, c)}: requests nvidia.com/gpu" + ("" if gpu else " in a CPU overlay"))
    has_devices = "--devices" in wflags
    if gpu and not has_devices:
        problems.append(f"{where(work, work_c)}: no --devices (the GPU overlay passes --devices auto)")
    if not gpu and has_devices:
        problems.append(f"{where(work, work_c)}: --devices in a CPU overlay")
    report.check(overlay, "GPUs: every worker has nvidia.com/gpu in its limits and --devices" if gpu
                 else "no GPU requested anywhere and no --devices (CPU overlay)", problems)

    # -- monitoring ----------------------------------------------------------------------------
    problems = []
    for role, obj, c in (("coordinator", coord, coord_c), ("worker", work, work_c)):
        labels = pod_labels(obj)
        found = False
        for pm in by_kind.get("PodMonitor", []):
            sel = (pm.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
            if pm["metadata"].get("namespace") != obj["metadata"].get("namespace"):
                continue
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                for ep in pm["spec"].get("podMetricsEndpoints", []) or []:
                    port = ep.get("port", ep.get("portNumber"))
                    if container_port(c, port, "TCP") is not None:
                        found = True
        if role == "coordinator" and service is not None:
            for sm in by_kind.get("ServiceMonitor", []):
                sel = (sm.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
                svc_labels = service["metadata"].get("labels", {}) or {}
                if sel and all(svc_labels.get(k) == v for k, v in sel.items()):
                    names = {p.get("name") for p in service["spec"].get("ports", [])}
                    if any(ep.get("port") in names for ep in sm["spec"].get("endpoints", []) or []):
                        found = True
        if not found:
            problems.append(f"no PodMonitor or ServiceMonitor scrapes the metrics port of {where(obj, c)}")
    dash = [m for m in by_kind.get("ConfigMap", []) if (m["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    if not dash:
        problems.append('no ConfigMap labelled grafana_dashboard: "1" (the Grafana dashboard)')
    for m in dash:
        keys = [k for k in (m.get("data") or {}) if k.endswith(".json")]
        if not keys:
            problems.append(f"{ref(m)}: no .json key")
        for k in keys:
            try:
                json.loads(m["data"][k])
            except ValueError as e:
                problems.append(f"{ref(m)}: {k} is not JSON: {e}")
    rules = [m for m in by_kind.get("ConfigMap", []) if "alerts.yml" in (m.get("data") or {})]
    if not rules:
        problems.append("no ConfigMap carries alerts.yml (the alert rules)")
    for m in rules:
        try:
            doc = yaml.safe_load(m["data"]["alerts.yml"])
            if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
                problems.append(f"{ref(m)}: alerts.yml has no list of groups")
        except yaml.YAMLError as e:
            problems.append(f"{ref(m)}: alerts.yml is not YAML: {e}")
    report.check(overlay, "metrics: a PodMonitor scrapes each role's metrics port; dashboard ConfigMap (grafana_dashboard=1) and alert rules ConfigMap", problems)

    # -- namespace -----------------------------------------------------------------------------
    problems = []
    namespaces = by_kind.get("Namespace", [])
    if len(namespaces) != 1:
        problems.append(f"expected one Namespace object, found {len(namespaces)}")
    else:
        nsobj = namespaces[0]
        name = nsobj["metadata"]["name"]
        if (nsobj["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            problems.append(f"{ref(nsobj)}: does not enforce the restricted Pod Security Standard")
        for d in docs:
            if d.get("kind") in CLUSTER_SCOPED:
                continue
            if d.get("metadata", {}).get("namespace") != name:
                problems.append(f"{ref(d)}: namespace {d.get('metadata', {}).get('namespace')!r}, expected {name!r}")
    report.check(overlay, "one Namespace (Pod Security Standard restricted) holds every object", problems)

    # -- text assets ---------------------------------------------------------------------------
    if is_text:
        problems = []
        try:
            job = tomllib.loads((config_map.get("data") or {}).get(posixpath.basename(config_path), "")) \
                if config_map is not None and isinstance(config_path, str) else {}
        except tomllib.TOMLDecodeError:
            job = {}  # reported above
        text_paths = sorted({v for v in strings(job) if is_under(v, TEXT_ROOT)})
        if not text_paths:
            problems.append(f"the job config names no file under {TEXT_ROOT} (the text assets)")
        script = pathlib.Path(__file__).resolve().parent / TEXT_ASSETS_SCRIPT
        for obj, c in ((coord, coord_c), (work, work_c)):
            spec = pod_spec(obj)
            volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
            m = covering_mount(c, TEXT_ROOT)
            if m is None:
                problems.append(f"{where(obj, c)}: mounts no volume at {TEXT_ROOT} (or above), where the job's text files are")
                continue
            if not m.get("readOnly"):
                problems.append(f"{where(obj, c)}: mounts the text assets at {m['mountPath']} writable; mount them readOnly")
            if not any(k in volumes.get(m.get("name"), {}) for k in WRITABLE_VOLUMES):
                problems.append(f"{where(obj, c)}: the text assets' volume {m.get('name')!r} is not an emptyDir or a PersistentVolumeClaim")
            want = posixpath.relpath(TEXT_VOLUME, m["mountPath"])
            fillers = []
            for init in spec.get("initContainers", []) or []:
                if init.get("restartPolicy") == "Always":
                    continue  # a sidecar runs alongside, it cannot fill the volume first
                cache = env_value(obj, init, "METALOOP_CACHE")
                im = covering_mount(init, cache) if cache else None
                if not im or im.get("name") != m.get("name") or im.get("readOnly") or im.get("subPath") != m.get("subPath"):
                    continue
                if posixpath.relpath(cache, im["mountPath"]) != want:
                    continue
                fillers.append(init)
                argv = [expand(obj, init, str(a)) for a in (init.get("command") or []) + (init.get("args") or [])]
                runs = [a for a in argv if posixpath.basename(a) == TEXT_ASSETS_SCRIPT]
                if not runs:
                    problems.append(f"{where(obj, init)}: fills the text assets' volume without running {TEXT_ASSETS_SCRIPT}")
                    continue
                src = file_source(mounted_files(obj, init), runs[0])
                if src is None or src[0] != "ConfigMap":
                    problems.append(f"{where(obj, init)}: {runs[0]} is not a file of a mounted ConfigMap")
                    continue
                cm = next((x for x in by_kind.get("ConfigMap", []) if x["metadata"]["name"] == src[1]), None)
                body = ((cm or {}).get("data") or {}).get(src[2])
                if body is None:
                    problems.append(f"{where(obj, init)}: ConfigMap/{src[1]} with key {src[2]!r} is not in the output")
                elif script.is_file() and body != script.read_text():
                    problems.append(f"ConfigMap/{src[1]} {src[2]} differs from {script}: generate it from the script (scripts/kustomization.yaml)")
                if not writable(spec, init, "/tmp"):
                    problems.append(f"{where(obj, init)}: /tmp is not writable (pip needs it; the root filesystem is read-only)")
            if not fillers:
                problems.append(f"{where(obj, c)}: no init container of the pod installs the text assets into volume {m.get('name')!r} "
                                f"(one that mounts it writable and runs {TEXT_ASSETS_SCRIPT} with METALOOP_CACHE at {TEXT_VOLUME} as this container sees it)")
            env = {k: env_value(obj, c, k) for k in ("METALOOP_CACHE", "XDG_CACHE_HOME", "HOME")}
            cache = env["METALOOP_CACHE"] or (env["XDG_CACHE_HOME"] and env["XDG_CACHE_HOME"] + "/metaloop") \
                or (env["HOME"] and env["HOME"] + "/.cache/metaloop")
            if not cache or not writable(spec, c, cache + "/tokenized"):
                problems.append(f"{where(obj, c)}: the tokenized-text cache {cache or '(no METALOOP_CACHE or HOME)'}/tokenized is not on a writable volume")
        report.check(overlay, f"text assets: the job's files under {TEXT_ROOT} are on a volume both roles mount read-only, filled by an init container running {TEXT_ASSETS_SCRIPT} from a ConfigMap; the tokenized cache is writable", problems)

    # -- against the program itself ------------------------------------------------------------
    if metaloop_bin is None:
        print(f"skip {overlay}: the manifests' flags against `metaloop --help` and `metaloop validate` of the job config (set METALOOP_BIN to a built metaloop)")
        return
    problems = []
    for role, obj, c in (("coordinator", coord, coord_c), ("worker", work, work_c)):
        run = subprocess.run([metaloop_bin, role, "--help"], capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"`metaloop {role} --help` failed ({run.returncode}): {run.stderr.strip()}")
            continue
        _, fl = flags(obj, c)
        for flag in fl:
            if not re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", run.stdout):
                if flag in PENDING_FLAGS:
                    print(f"note {overlay}: {where(obj, c)} passes {flag}, which `metaloop {role} --help` does not list yet ({PENDING_FLAGS[flag]})")
                else:
                    problems.append(f"{where(obj, c)}: passes {flag}, which `metaloop {role} --help` does not know")
        for e in c.get("env", []) or []:
            name = e.get("name", "")
            if name.startswith("METALOOP_") and f"env: {name}=" not in run.stdout:
                if name not in ENV_OUTSIDE_FLAGS:
                    problems.append(f"{where(obj, c)}: sets {name}, which `metaloop {role} --help` does not read")
                elif name.encode() not in binary_bytes(metaloop_bin):
                    problems.append(f"{where(obj, c)}: sets {name} ({ENV_OUTSIDE_FLAGS[name]}), which {metaloop_bin} does not contain")
    if config_map is not None and isinstance(config_path, str):
        key = posixpath.basename(config_path)
        text = (config_map.get("data") or {}).get(key, "")
        root = pathlib.Path(repo_root).resolve()
        local = text.replace(TEXT_ROOT + "/", f"{root / TEXT_RELATIVE}/").replace(IMAGE_ROOT + "/", f"{root}/")
        if is_text and not (root / TEXT_RELATIVE).exists():
            problems.append(f"the text job cannot be validated: {root / TEXT_RELATIVE} does not exist; install the text assets with scripts/text-assets")
        with tempfile.TemporaryDirectory() as d:
            path = pathlib.Path(d) / "job.toml"
            path.write_text(local)
            run = subprocess.run([metaloop_bin, "validate", str(path)], capture_output=True, text=True)
            if run.returncode != 0:
                problems.append(f"ConfigMap/{config_map['metadata']['name']} {key} (data paths under this repository) fails `metaloop validate`: {(run.stdout + run.stderr).strip()}")
    report.check(overlay, "every flag and METALOOP_* variable is in `metaloop <role> --help`; the job config passes `metaloop validate`", problems)


_BINARIES = {}


def binary_bytes(path):
    if path not in _BINARIES:
        _BINARIES[path] = pathlib.Path(path).read_bytes()
    return _BINARIES[path]


def compare_job_config(what, text, config_path, text_job=False):
    """The job config must be `config_path` (configs/quickstart.toml, or a text overlay's
    configs/text-*.toml) with its relative data paths made absolute under IMAGE_ROOT (where the
    image keeps configs/ and data/); for a text job, paths into data/text (the text assets) under
    TEXT_ROOT instead, where the init container installs them."""
    try:
        job = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"{what} is not TOML: {e}"]
    quick = tomllib.loads(pathlib.Path(config_path).read_text())
    config_dir = posixpath.join(IMAGE_ROOT, "configs")
    text_dir = posixpath.join(IMAGE_ROOT, TEXT_RELATIVE)
    where_to = f"{TEXT_ROOT} for the text assets, else under {IMAGE_ROOT}" if text_job else f"under {IMAGE_ROOT}"

    def absolute(v, key):
        if isinstance(v, dict):
            return {k: absolute(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [absolute(x, key) for x in v]
        if isinstance(v, str) and (v.endswith(".safetensors") or v.startswith("../")) and not v.startswith("/"):
            path = posixpath.normpath(posixpath.join(config_dir, v))
            if text_job and is_under(path, text_dir):
                path = TEXT_ROOT + path[len(text_dir):]
            return path
        return v

    expected = absolute(quick, None)
    problems = []

    def diff(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                p = f"{path}.{k}" if path else k
                if k not in a:
                    problems.append(f"{what}: key {p} is not in {config_path}")
                elif k not in b:
                    problems.append(f"{what}: key {p} of {config_path} is missing")
                else:
                    diff(a[k], b[k], p)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                diff(x, y, f"{path}[{i}]")
        elif a != b:
            problems.append(f"{what}: {path} = {b!r}, expected {a!r} ({pathlib.Path(config_path).name}'s value, data paths {where_to})")

    diff(expected, job, "")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", required=True, help="configs/quickstart.toml")
    ap.add_argument("--text-config", required=True,
                    help="configs/text-domain-weights.toml: the job of the overlays named text*")
    ap.add_argument("--metaloop-bin", help="a built metaloop, to check flags and the job config against")
    ap.add_argument("--repo-root", default=".", help="where configs/ and data/ are (for --metaloop-bin)")
    ap.add_argument("overlays", nargs="+", metavar="NAME=RENDERED.yaml")
    args = ap.parse_args()
    report = Report()
    for spec in args.overlays:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"{spec!r} is not NAME=FILE")
        docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        check_overlay(report, name, docs, args.quickstart, args.text_config, args.metaloop_bin, args.repo_root)
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
