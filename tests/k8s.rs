//! The Kubernetes manifests under `k8s/`: every overlay renders with `kubectl kustomize`,
//! validates offline against the Kubernetes schemas (custom resources against
//! `scripts/k8s-schemas/`) and keeps its invariants, with the flags checked against this build's
//! `metaloop <role> --help` and the job config with `metaloop validate` (all in
//! `scripts/check-k8s`); and the same checker fails, naming the objects, on a broken copy.
//!
//! Needs kubectl (it has kustomize built in) and Python 3 with venv; `scripts/check-k8s`
//! installs kubernetes-validate from PyPI into the per-user cache on first use.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_metaloop");

fn require_kubectl() {
    let runs = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        runs,
        "kubectl was not found or does not run: install kubectl 1.32 or newer (it has kustomize built in) and put it \
         on PATH; this test renders the manifests in k8s/ with `kubectl kustomize`"
    );
}

/// Runs scripts/check-k8s on `k8s_dir` (default: the repository's k8s/); returns whether it
/// passed and everything it printed.
fn check_k8s(k8s_dir: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(Path::new(ROOT).join("scripts/check-k8s"));
    if let Some(dir) = k8s_dir {
        cmd.arg(dir);
    }
    let out = cmd.env("METALOOP_BIN", BIN).output().expect("start scripts/check-k8s");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_overlay_renders_validates_and_keeps_its_invariants() {
    require_kubectl();
    let (ok, output) = check_k8s(None);
    assert!(ok, "scripts/check-k8s failed:\n{output}");
    for overlay in ["cpu-dev", "gpu", "text-cpu"] {
        assert!(
            output.contains(&format!("ok   {overlay}: rendered")),
            "overlay {overlay} was not checked:\n{output}"
        );
    }
    // The flags and the job config were checked against this build, not skipped.
    assert!(
        output.contains("the job config passes `metaloop validate`") && !output.contains("skip "),
        "the checks against the binary did not run:\n{output}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Replaces `from` by `to` in a file of the broken copy; the text must be there.
fn edit(k8s: &Path, file: &str, from: &str, to: &str) {
    let path = k8s.join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.contains(from),
        "k8s/{file} no longer contains {from:?}: update this test's breakage to the manifests"
    );
    std::fs::write(&path, text.replace(from, to)).expect("write");
}

/// Removes a container's readiness probe (the lines from `readinessProbe:` to `resources:`).
fn drop_readiness_probe(k8s: &Path, file: &str) {
    let path = k8s.join(file);
    let text = std::fs::read_to_string(&path).expect("read");
    let start = text
        .find("          readinessProbe:")
        .unwrap_or_else(|| panic!("k8s/{file} has no readinessProbe: update this test"));
    let end = start
        + text[start..]
            .find("          resources:")
            .expect("resources after the probe");
    std::fs::write(&path, format!("{}{}", &text[..start], &text[end..])).expect("write");
}

#[test]
fn the_checker_fails_on_a_broken_copy_and_names_each_object() {
    require_kubectl();
    let tmp = tempfile::tempdir().expect("tempdir");
    let k8s = tmp.path().join("k8s");
    copy_dir(&Path::new(ROOT).join("k8s"), &k8s);
    // The text overlay loads the text-assets script's ConfigMap from scripts/, next to k8s/.
    let scripts = tmp.path().join("scripts");
    std::fs::create_dir(&scripts).expect("mkdir");
    for f in ["kustomization.yaml", "text_assets.py"] {
        std::fs::copy(Path::new(ROOT).join("scripts").join(f), scripts.join(f)).expect("copy");
    }

    edit(&k8s, "base/coordinator-service.yaml", "protocol: UDP", "protocol: TCP");
    drop_readiness_probe(&k8s, "base/worker-job.yaml");
    edit(
        &k8s,
        "base/coordinator-statefulset.yaml",
        "runAsUser: 10001",
        "runAsUser: 0",
    );
    edit(
        &k8s,
        "base/worker-job.yaml",
        "                mode: 0440",
        "                mode: 0644",
    );
    edit(&k8s, "base/podmonitor.yaml", "interval: 15s", "intervall: 15s");
    edit(
        &k8s,
        "base/coordinator-statefulset.yaml",
        "        - name: coordinator\n",
        "        - name: coordinator\n          imagePullPolicee: Always\n",
    );
    edit(
        &k8s,
        "overlays/gpu/workers.yaml",
        "              nvidia.com/gpu: 1\n",
        "",
    );
    edit(
        &k8s,
        "overlays/cpu-dev/workers.yaml",
        "              memory: 2Gi\n",
        "              memory: 2Gi\n              nvidia.com/gpu: 1\n",
    );
    edit(
        &k8s,
        "overlays/cpu-dev/coordinator.yaml",
        "value: \"2\"",
        "value: \"3\"",
    );

    let (ok, output) = check_k8s(Some(&k8s));
    assert!(!ok, "scripts/check-k8s passed a broken copy:\n{output}");
    for expected in [
        "Service/metaloop-coordinator: port 7070 (QUIC) has protocol TCP, expected UDP",
        "Job/metaloop-worker, container worker: no readinessProbe",
        "StatefulSet/metaloop-coordinator, container coordinator: runAsUser is 0",
        "Job/metaloop-worker, container worker: the private key /etc/metaloop/tls/worker.key has mode 0o644",
        "custom resource PodMonitor/metaloop-coordinator: spec.podMetricsEndpoints.0: Additional properties are not allowed ('intervall' was unexpected)",
        "statefulset/metaloop-coordinator against version 1.32: spec.template.spec.containers.0: Additional properties are not allowed ('imagePullPolicee' was unexpected)",
        "FAIL gpu: GPUs: every worker has nvidia.com/gpu in its limits and --devices: Job/metaloop-worker, container worker: no nvidia.com/gpu in its limits",
        "Job/metaloop-worker, container worker: requests nvidia.com/gpu in a CPU overlay",
        "--min-workers 3 is above Job/metaloop-worker's parallelism 2",
    ] {
        assert!(output.contains(expected), "the checker did not report {expected:?}:\n{output}");
    }
}
