//! The deployment files under `deploy/` are checked as the tools that consume them would:
//! example job specs through `JobSpec::from_toml`, the kustomize overlays rendered by
//! `kubectl kustomize` and validated against the Kubernetes schemas (`kubernetes-validate`,
//! installed by `scripts/setup.sh` into `.cache/k8s-venv`), the scrape configuration by
//! `promtool check config`, and the Grafana dashboard against the metric names of
//! `deploy/metrics.txt`.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use endofm_shared::{DeviceKind, JobSpec};
use serde_json::Value;

/// The Kubernetes version whose schemas the manifests must satisfy (kubernetes-validate 1.32.0
/// ships them; kubectl here is 1.32).
const KUBERNETES_VERSION: &str = "1.32.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Files of `dir` whose names end with `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// Whether `program` is on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- job specs -----------------------------------------------------------------------------

#[test]
fn example_jobs_parse_and_validate() {
    let files = files_ending(&deploy().join("jobs"), ".toml");
    assert!(
        files.len() >= 2,
        "expected the example jobs in deploy/jobs, found {files:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        match JobSpec::from_toml(&read(file)) {
            Ok(spec) => println!(
                "{}: {} ({} x {}, preset {})",
                file.display(),
                spec.name,
                spec.resources.world_size,
                spec.resources.device.name(),
                spec.model.preset
            ),
            // The error names the field (`resources.world_size: ...`).
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "invalid job specs:\n{}",
        failures.join("\n")
    );

    let vitb = JobSpec::from_toml(&read(&deploy().join("jobs/pretrain-vitb.toml"))).unwrap();
    assert_eq!(vitb.model.preset, "vit_b");
    assert_eq!(vitb.resources.world_size, 8);
    assert_eq!(vitb.resources.device, DeviceKind::Cuda);
    assert!(vitb.data.uri.starts_with("s3://"), "{}", vitb.data.uri);
    let tiny = JobSpec::from_toml(&read(&deploy().join("jobs/pretrain-tiny-cpu.toml"))).unwrap();
    assert_eq!(tiny.model.preset, "tiny");
    assert_eq!(tiny.resources.world_size, 2);
    assert_eq!(tiny.resources.device, DeviceKind::Cpu);
    assert!(!tiny.data.uri.contains("://"), "{}", tiny.data.uri);
    assert!(tiny.max_steps.is_some_and(|s| s <= 100));
}

// --- Kubernetes manifests ------------------------------------------------------------------

/// The kubernetes-validate of `.cache/k8s-venv`, and that venv's python (PyYAML comes with it).
fn k8s_venv() -> (PathBuf, PathBuf) {
    let venv = repo().join(".cache/k8s-venv/bin");
    let validate = venv.join("kubernetes-validate");
    assert!(
        validate.is_file(),
        "{} is missing: run scripts/setup.sh (it installs scripts/k8s-requirements.txt there)",
        validate.display()
    );
    (validate, venv.join("python"))
}

/// Validates one YAML file (one or more documents) against the Kubernetes schemas, rejecting
/// unknown fields.
fn validate_manifests(validate: &Path, file: &Path, what: &str) {
    let out = run(Command::new(validate).args([
        "--strict",
        "--quiet",
        "-k",
        KUBERNETES_VERSION,
        &file.to_string_lossy(),
    ]));
    assert!(
        out.status.success(),
        "{what} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{}",
        text(&out)
    );
    println!("{what}: valid against Kubernetes {KUBERNETES_VERSION} (strict)");
}

/// The documents of a YAML text as JSON values (converted by the venv's PyYAML).
fn yaml_documents(python: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; \
             print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the k8s venv's python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("writing YAML to python");
    let out = child.wait_with_output().expect("python's output");
    assert!(out.status.success(), "YAML did not parse:\n{}", text(&out));
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The one object of `kind` named `name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Which worker devices an overlay configures.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Workers {
    Gpu,
    Cpu,
}

/// The properties the service depends on, checked on the objects a render produced.
fn check_objects(docs: &[Value], workers: Workers, what: &str) {
    let namespaced = docs
        .iter()
        .filter(|d| !matches!(d["kind"].as_str(), Some("Namespace")));
    for d in namespaced {
        // The plain base files carry no namespace: kustomize sets it.
        let ns = &d["metadata"]["namespace"];
        assert!(
            ns.is_null() || ns == "endofm",
            "{what}: {} {} is in namespace {ns}",
            d["kind"],
            d["metadata"]["name"]
        );
    }
    object(docs, "Namespace", "endofm");
    for name in ["endofm-config", "endofm-nccl"] {
        object(docs, "ConfigMap", name);
    }
    let nccl = &object(docs, "ConfigMap", "endofm-nccl")["data"];
    assert_eq!(nccl["NCCL_DEBUG"], "WARN", "{what}");
    assert!(nccl["NCCL_SOCKET_IFNAME"].is_string(), "{what}");
    let storage = &object(docs, "Secret", "endofm-storage")["stringData"];
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        assert!(
            storage[key].is_string(),
            "{what}: endofm-storage lacks {key}"
        );
    }
    let tokens = &object(docs, "Secret", "endofm-tokens")["stringData"];
    for key in ["ENDOFM_USER_TOKEN", "ENDOFM_WORKER_TOKEN"] {
        assert!(tokens[key].is_string(), "{what}: endofm-tokens lacks {key}");
    }

    // Coordinator: one replica, never two writers of the store, which lives on a PVC.
    let deployment = object(docs, "Deployment", "endofm-coordinator");
    assert_eq!(deployment["spec"]["replicas"], 1, "{what}");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate", "{what}");
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9090");
    let container = &pod["spec"]["containers"][0];
    let command: Vec<&str> = strings(&container["command"])
        .into_iter()
        .chain(strings(&container["args"]))
        .collect();
    assert_eq!(
        command.join(" "),
        "endofm coordinator --listen 0.0.0.0:7070 --metrics-listen 0.0.0.0:9090 --state /var/lib/endofm",
        "{what}"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"], 7070, "{what}: {probe}");
    }
    let claim = pod["spec"]["volumes"]
        .as_array()
        .expect("coordinator volumes")
        .iter()
        .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .unwrap_or_else(|| panic!("{what}: the coordinator has no PVC volume"));
    object(docs, "PersistentVolumeClaim", claim);
    assert!(
        container["volumeMounts"]
            .as_array()
            .expect("coordinator mounts")
            .iter()
            .any(|m| m["mountPath"] == "/var/lib/endofm"),
        "{what}: nothing mounted at /var/lib/endofm"
    );
    let service = object(docs, "Service", "endofm-coordinator");
    let ports: BTreeSet<(String, i64)> = service["spec"]["ports"]
        .as_array()
        .expect("service ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["port"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert!(ports.contains(&("grpc".into(), 7070)), "{what}: {ports:?}");
    assert!(
        ports.contains(&("metrics".into(), 9090)),
        "{what}: {ports:?}"
    );

    // Workers.
    let statefulset = object(docs, "StatefulSet", "endofm-worker");
    let pod = &statefulset["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9091");
    let container = &pod["spec"]["containers"][0];
    let command: Vec<&str> = strings(&container["command"])
        .into_iter()
        .chain(strings(&container["args"]))
        .collect();
    let devices = match workers {
        Workers::Gpu => "cuda",
        Workers::Cpu => "cpu:4",
    };
    assert_eq!(
        command.join(" "),
        format!(
            "endofm-worker agent --coordinator http://endofm-coordinator:7070 \
             --devices {devices} --metrics-listen 0.0.0.0:9091"
        ),
        "{what}"
    );
    let resources = &container["resources"];
    let gpus = [&resources["requests"], &resources["limits"]].map(|r| r["nvidia.com/gpu"].clone());
    match workers {
        Workers::Gpu => {
            for g in &gpus {
                assert!(
                    g.as_i64() == Some(1) || g.as_str() == Some("1"),
                    "{what}: the worker must request and limit nvidia.com/gpu: 1, got {resources}"
                );
            }
        }
        Workers::Cpu => assert!(
            gpus.iter().all(Value::is_null),
            "{what}: CPU workers must not request GPUs: {resources}"
        ),
    }
    let shm_volume = container["volumeMounts"]
        .as_array()
        .expect("worker mounts")
        .iter()
        .find(|m| m["mountPath"] == "/dev/shm")
        .and_then(|m| m["name"].as_str())
        .unwrap_or_else(|| panic!("{what}: nothing mounted at /dev/shm"));
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("worker volumes")
        .iter()
        .find(|v| v["name"] == shm_volume)
        .unwrap_or_else(|| panic!("{what}: no volume {shm_volume}"));
    assert_eq!(
        volume["emptyDir"]["medium"], "Memory",
        "{what}: /dev/shm must be a memory-backed emptyDir"
    );
}

/// Kustomize-only files (not Kubernetes objects) in a kustomization folder.
fn is_kustomize_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

#[test]
fn kustomize_overlays_render_and_validate() {
    let (validate, python) = k8s_venv();
    if !on_path("kubectl") {
        if std::env::var("ENDOFM_SKIP_K8S").as_deref() != Ok("1") {
            panic!(
                "kubectl is not installed: it renders deploy/k8s (`kubectl kustomize`). Install \
                 kubectl, or set ENDOFM_SKIP_K8S=1 to check only the plain base manifests"
            );
        }
        println!("SKIPPED kustomize render: kubectl not installed");
        let base = deploy().join("k8s/base");
        let mut docs = Vec::new();
        for file in files_ending(&base, ".yaml") {
            if is_kustomize_file(&file) {
                continue;
            }
            validate_manifests(&validate, &file, &file.display().to_string());
            docs.extend(yaml_documents(&python, &read(&file)));
        }
        check_objects(&docs, Workers::Gpu, "deploy/k8s/base");
        return;
    }
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (overlay, workers) in [("gpu", Workers::Gpu), ("cpu", Workers::Cpu)] {
        let dir = deploy().join("k8s/overlays").join(overlay);
        let what = format!("deploy/k8s/overlays/{overlay}");
        let out = run(Command::new("kubectl").arg("kustomize").arg(&dir));
        assert!(
            out.status.success(),
            "kubectl kustomize {what} failed:\n{}",
            text(&out)
        );
        let rendered = String::from_utf8(out.stdout).expect("UTF-8 manifests");
        let file = tmp.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).expect("writing the rendered manifests");
        validate_manifests(&validate, &file, &what);
        let docs = yaml_documents(&python, &rendered);
        check_objects(&docs, workers, &what);
        // The generated monitoring ConfigMaps carry the files as they are in deploy/.
        let prometheus = object(&docs, "ConfigMap", "endofm-prometheus-config");
        assert_eq!(
            prometheus["data"]["prometheus.yml"].as_str(),
            Some(read(&deploy().join("prometheus/prometheus.yml")).as_str()),
            "{what}"
        );
        let dashboard = object(&docs, "ConfigMap", "endofm-grafana-dashboard");
        assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
        assert!(
            dashboard["data"]["endofm-dashboard.json"].is_string(),
            "{what}"
        );
        println!("{what}: {} objects checked", docs.len());
    }
}

// --- Prometheus ----------------------------------------------------------------------------

/// `text` with every `kubernetes_sd_configs:` block replaced by a static target at the same
/// indentation.
fn without_kubernetes_sd(text: &str) -> String {
    let mut out = Vec::new();
    let mut skipping: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(block) = skipping {
            if line.trim().is_empty() || indent > block {
                continue;
            }
            skipping = None;
        }
        if line.trim_start().starts_with("kubernetes_sd_configs:") {
            let pad = " ".repeat(indent);
            out.push(format!("{pad}static_configs:"));
            out.push(format!("{pad}  - targets: [\"127.0.0.1:9090\"]"));
            skipping = Some(indent);
            continue;
        }
        out.push(line.to_string());
    }
    out.join("\n") + "\n"
}

#[test]
fn prometheus_config_passes_promtool() {
    assert!(
        on_path("promtool"),
        "promtool is not installed: run scripts/setup.sh (Debian package `prometheus`)"
    );
    let config = deploy().join("prometheus/prometheus.yml");
    let original = read(&config);
    for needle in [
        "kubernetes_sd_configs",
        "job_name: endofm-coordinator",
        "job_name: endofm-worker",
        "__meta_kubernetes_pod_annotation_prometheus_io_port",
    ] {
        assert!(original.contains(needle), "prometheus.yml lacks `{needle}`");
    }
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&config));
    if out.status.success() {
        println!("promtool check config: {}", text(&out).trim());
        return;
    }
    let report = text(&out);
    assert!(
        report.contains("field kubernetes_sd_configs not found"),
        "promtool check config {} failed:\n{report}",
        config.display()
    );
    // Debian's promtool is built without Kubernetes service discovery: check the rest.
    println!(
        "NOTE: this promtool has no Kubernetes service discovery; checking prometheus.yml with \
         each kubernetes_sd_configs block replaced by a static target"
    );
    let tmp = tempfile::tempdir().expect("temporary folder");
    let copy = tmp.path().join("prometheus.yml");
    std::fs::write(&copy, without_kubernetes_sd(&original)).expect("writing the copy");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&copy));
    assert!(
        out.status.success(),
        "promtool check config failed on prometheus.yml (kubernetes_sd_configs replaced):\n{}",
        text(&out)
    );
    println!("promtool check config: {}", text(&out).trim());
}

#[test]
fn kubernetes_sd_blocks_are_replaced_whole() {
    let text = "scrape_configs:\n  - job_name: a\n    kubernetes_sd_configs:\n      - role: pod\n        namespaces:\n          names: [x]\n    relabel_configs:\n      - action: keep\n";
    assert_eq!(
        without_kubernetes_sd(text),
        "scrape_configs:\n  - job_name: a\n    static_configs:\n      - targets: [\"127.0.0.1:9090\"]\n    relabel_configs:\n      - action: keep\n"
    );
}

// --- Grafana -------------------------------------------------------------------------------

/// The metric names of the contract (`deploy/metrics.txt`).
fn contract_metrics() -> BTreeSet<String> {
    let text = read(&deploy().join("metrics.txt"));
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let set: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        set.len(),
        names.len(),
        "deploy/metrics.txt lists a name twice"
    );
    for name in &set {
        assert!(
            name.starts_with("endofm_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "deploy/metrics.txt: `{name}` is not an endofm_ metric name"
        );
    }
    set
}

/// Every `endofm_*` metric named in a PromQL expression, histogram series suffixes stripped.
/// `$endofm_...` (a dashboard variable) is not a metric.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while let Some(pos) = expr[i..].find("endofm_") {
        let start = i + pos;
        let end = start + expr[start..].bytes().take_while(|&b| ident(b)).count();
        let preceded = start > 0 && (ident(bytes[start - 1]) || bytes[start - 1] == b'$');
        if !preceded {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            found.insert(base.to_string());
        }
        i = end;
    }
    found
}

/// Every panel, rows' nested panels included.
fn all_panels(panels: &Value, into: &mut Vec<Value>) {
    for p in panels.as_array().into_iter().flatten() {
        into.push(p.clone());
        all_panels(&p["panels"], into);
    }
}

#[test]
fn dashboard_uses_exactly_the_contract_metrics() {
    let path = deploy().join("grafana/endofm-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let schema = dashboard["schemaVersion"].as_i64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "the dashboard needs a Prometheus data-source variable named `datasource`"
    );

    let contract = contract_metrics();
    let mut panels = Vec::new();
    all_panels(&dashboard["panels"], &mut panels);
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_i64()),
            "panel id of `{title}` repeats"
        );
        let targets = panel["targets"].as_array().into_iter().flatten();
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel `{title}` must use the data-source variable"
            );
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "panel `{title}` has a target without expr"
            );
            for name in metrics_in(expr) {
                if !contract.contains(&name) {
                    unknown.push(format!("`{name}` in panel `{title}`"));
                }
                used.insert(name);
            }
        }
    }
    for variable in variables {
        for name in metrics_in(&variable["definition"].to_string())
            .into_iter()
            .chain(metrics_in(&variable["query"].to_string()))
        {
            if !contract.contains(&name) {
                unknown.push(format!("`{name}` in variable {}", variable["name"]));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics not in deploy/metrics.txt: {}",
        unknown.join(", ")
    );
    let unused: Vec<&String> = contract.difference(&used).collect();
    assert!(unused.is_empty(), "metrics no panel shows: {unused:?}");
    println!(
        "dashboard: {} panels over {} metrics",
        panels.len(),
        used.len()
    );
}

#[test]
fn metric_names_are_found_in_expressions() {
    let found = metrics_in(
        "histogram_quantile(0.95, sum by (le) (rate(endofm_step_seconds_bucket{job=~\"$endofm_job\"}[5m]))) / endofm_loss + my_endofm_x",
    );
    assert_eq!(
        found,
        BTreeSet::from(["endofm_loss".to_string(), "endofm_step_seconds".to_string()])
    );
}
