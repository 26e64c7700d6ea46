//! The Kubernetes manifests of `deploy/k8s/<region>/`, checked three ways, since no cluster runs
//! here:
//!
//! - against the Kubernetes API's schemas, by `kubernetes-validate` (PyPI, offline, strict: an
//!   unknown field or a kind without a schema fails), for the oldest and the newest Kubernetes
//!   version the manifests claim;
//! - against the binary they run: the node configuration in the ConfigMap, with the pod's
//!   environment, is what `roomwire --print-config` accepts; its ports are the container's, the
//!   Services' and the probes'; the files it names are mounted; the user is the image's; the
//!   stop budget covers a drain; the nodes' NATS address, the JetStream placement and the NATS
//!   servers' cluster and gateway names agree across the regions;
//! - by running them: the three regions' NATS configurations with the real nats-server (three
//!   servers per region, as the StatefulSet has them, only addresses and directories rewritten
//!   to this machine), joined by their gateways with JetStream; a node of `eu` and one of `ap`
//!   started by the container's own command with the ConfigMap's configuration, TLS and JWT
//!   from the files the Secrets would mount; the probes' paths answering on the probes' port; a
//!   user in each region chatting; the SIGTERM that follows the preStop draining the `eu` node
//!   within the grace period; and the NATS preStop putting a server in lame duck mode.
//!
//! The manifests are YAML; they are read through the validator's own Python (PyYAML comes with
//! it), so the lockfile carries no YAML crate.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::{TempDir, free_port, nats_server_bin};
use common::{DEADLINE, next_message, try_http_request};
use roomwire::DevCa;
use roomwire::client::{Client, ClientOptions, Event};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_roomwire");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The regions of `deploy/k8s/` (one directory each), as the NATS gateways name them.
const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// The Kubernetes versions the manifests are validated against: the oldest they claim and the
/// newest the pinned validator knows (scripts/kubernetes-validate.sh).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
/// What the Secrets hold in these tests (the operator creates them; docs/OPERATIONS.md).
const API_KEYS: &str = r#"["k8s-test-api-key-0123456789"]"#;
const JWT_SECRET: &str = "a-k8s-test-hs256-secret-of-32-bytes-or-more";

/// `kubernetes-validate`, or a panic that says how to get it.
fn validator() -> PathBuf {
    let path = std::env::var_os("ROOMWIRE_K8S_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(".venv-k8s/bin/kubernetes-validate"));
    assert!(
        path.is_file(),
        "no kubernetes-validate at {}: run scripts/kubernetes-validate.sh (scripts/test.sh does, \
         and exports ROOMWIRE_K8S_VALIDATE)",
        path.display()
    );
    path
}

/// Every document of a YAML file, as JSON, read by the validator venv's PyYAML.
fn load_yaml(path: &Path) -> Vec<Value> {
    let python = validator().with_file_name("python");
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("run the validator venv's python");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// One region's manifests.
struct Region {
    name: &'static str,
    files: Vec<PathBuf>,
    docs: Vec<Value>,
}

impl Region {
    fn load(name: &'static str) -> Region {
        let dir = Path::new(ROOT).join("deploy/k8s").join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        let docs = files.iter().flat_map(|f| load_yaml(f)).collect();
        Region { name, files, docs }
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    /// The pod template's spec and its one container, of StatefulSet `name`.
    fn pod(&self, name: &str) -> (&Value, &Value) {
        let spec = &self.get("StatefulSet", name)["spec"]["template"]["spec"];
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(
            containers.len(),
            1,
            "{}: one container in {name}",
            self.name
        );
        (spec, &containers[0])
    }

    /// The node configuration (the ConfigMap's TOML).
    fn node_toml(&self) -> &str {
        self.get("ConfigMap", "roomwire-config")["data"]["roomwire.toml"]
            .as_str()
            .unwrap()
    }

    fn nats_conf(&self) -> &str {
        self.get("ConfigMap", "nats-config")["data"]["nats.conf"]
            .as_str()
            .unwrap()
    }
}

fn all_regions() -> Vec<Region> {
    let mut dirs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut expected: Vec<&str> = REGIONS.to_vec();
    expected.sort();
    assert_eq!(dirs, expected, "deploy/k8s/ holds one directory per region");
    REGIONS.iter().map(|r| Region::load(r)).collect()
}

/// The container's environment as the kubelet sets it for pod `pod_name`: `$(VAR)` expanded
/// from the variables before it, the pod's name from its field, the Secrets' keys from the test
/// values.
fn container_env(container: &Value, pod_name: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for item in container["env"].as_array().into_iter().flatten() {
        let name = item["name"].as_str().unwrap().to_string();
        let value = if let Some(value) = item["value"].as_str() {
            let mut value = value.to_string();
            for (k, v) in &env {
                value = value.replace(&format!("$({k})"), v);
            }
            value
        } else if item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            pod_name.to_string()
        } else if let Some(secret) = item["valueFrom"].get("secretKeyRef") {
            match (secret["name"].as_str(), secret["key"].as_str()) {
                (Some("roomwire-secrets"), Some("api-keys")) => API_KEYS.to_string(),
                other => panic!("a Secret key this test does not know: {other:?}"),
            }
        } else {
            panic!("an environment entry this test does not know: {item}");
        };
        env.push((name, value));
    }
    env
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A container port by name or number: (number, protocol).
fn container_port(container: &Value, port: &Value) -> (u16, String) {
    let found = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| match port {
            Value::String(name) => p["name"] == name.as_str(),
            number => p["containerPort"] == *number,
        })
        .unwrap_or_else(|| panic!("no container port {port} in {}", container["ports"]));
    (
        found["containerPort"].as_u64().unwrap() as u16,
        found["protocol"].as_str().unwrap_or("TCP").to_string(),
    )
}

/// The Dockerfile's instructions `keyword` (rest of the line each).
fn dockerfile(keyword: &str) -> Vec<String> {
    std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{keyword} ")))
        .map(|rest| rest.trim().to_string())
        .collect()
}

/// Runs `roomwire --print-config` with exactly `env`, `ROOMWIRE_CONFIG` pointing at `file`.
fn print_config(env: &[(String, String)], file: &Path) -> toml::Value {
    let out = Command::new(BIN)
        .arg("--print-config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("ROOMWIRE_CONFIG", file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the binary refuses the ConfigMap's configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let regions = all_regions();
    let files: Vec<&PathBuf> = regions.iter().flat_map(|r| &r.files).collect();
    let documents: usize = regions.iter().map(|r| r.docs.len()).sum();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(validator())
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "Kubernetes {version}:\n{report}");
        // A kind without a schema is only a warning to the validator: not here.
        let passed = report
            .lines()
            .filter(|l| l.contains(" passed for "))
            .count();
        assert!(
            passed == documents && !report.contains("WARN") && !report.contains("ERROR"),
            "Kubernetes {version}: {passed} of {documents} documents validated:\n{report}"
        );
    }
}

#[test]
fn each_region_runs_the_binary_as_configured_and_its_ports_agree() {
    let dir = TempDir::new("k8s-config");
    let user = dockerfile("USER");
    let image_config = dockerfile("ENV")
        .into_iter()
        .find_map(|e| e.strip_prefix("ROOMWIRE_CONFIG=").map(str::to_string))
        .expect("the Dockerfile sets ROOMWIRE_CONFIG");
    let image_bin = dockerfile("COPY")
        .into_iter()
        .filter(|c| c.starts_with("--from="))
        .find_map(|c| c.split_whitespace().last().map(str::to_string))
        .expect("the Dockerfile copies the binary");
    let regions = all_regions();
    for region in &regions {
        let r = region.name;
        let (spec, container) = region.pod("roomwire");
        let env = container_env(container, "roomwire-0");

        // The configuration file: the ConfigMap mounted where the image and the pod say.
        let config_path = env_value(&env, "ROOMWIRE_CONFIG").unwrap_or(&image_config);
        assert_eq!(config_path, image_config, "{r}: the image's config path");
        let config_volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["configMap"]["name"] == "roomwire-config")
            .expect("a volume of the ConfigMap")["name"]
            .clone();
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == config_volume)
            .expect("the ConfigMap is mounted");
        assert_eq!(
            format!("{}/roomwire.toml", mount["mountPath"].as_str().unwrap()),
            config_path,
            "{r}: the ConfigMap's roomwire.toml is the file the node reads"
        );
        let file = dir.path().join(format!("{r}.toml"));
        std::fs::write(&file, region.node_toml()).unwrap();
        let config = print_config(&env, &file);
        assert_eq!(
            config["node"]["region"].as_str(),
            Some(r),
            "{r}: node.region"
        );
        assert_eq!(
            config["node"]["id"].as_str(),
            Some(format!("{r}-roomwire-0").as_str()),
            "{r}: node.id is unique across regions and stable per pod"
        );

        // Ports: the node's, the container's, the Services' and the probes'.
        let http = common::listen_addrs(&config, "server");
        let quic = common::listen_addrs(&config, "webtransport");
        assert!(
            http.iter().chain(&quic).all(|a| a.ip().is_unspecified()),
            "{r}: a pod listens on every interface: {http:?} {quic:?}"
        );
        let (http_port, proto) = container_port(container, &"http".into());
        assert_eq!((http[0].port(), proto.as_str()), (http_port, "TCP"), "{r}");
        let (quic_port, proto) = container_port(container, &"quic".into());
        assert_eq!((quic[0].port(), proto.as_str()), (quic_port, "UDP"), "{r}");
        let pod_labels =
            &region.get("StatefulSet", "roomwire")["spec"]["template"]["metadata"]["labels"];
        for (service, protocol, port) in [
            ("roomwire", "TCP", http_port),
            ("roomwire-quic", "UDP", quic_port),
            ("roomwire-pods", "TCP", http_port),
        ] {
            let svc = &region.get("Service", service)["spec"];
            for (k, v) in svc["selector"].as_object().unwrap() {
                assert_eq!(&pod_labels[k], v, "{r}: Service {service} selects the pods");
            }
            let ports = svc["ports"].as_array().unwrap();
            assert!(!ports.is_empty());
            for p in ports {
                let (target, proto) = container_port(container, &p["targetPort"]);
                assert_eq!(
                    (
                        target,
                        proto.as_str(),
                        p["protocol"].as_str().unwrap_or("TCP")
                    ),
                    (port, protocol, protocol),
                    "{r}: Service {service} port {p}"
                );
            }
        }
        // Browsers open WebTransport on the page's host at the port /webtransport/certhash
        // names, the node's own: the UDP Service must publish that number.
        let quic_svc = &region.get("Service", "roomwire-quic")["spec"]["ports"][0];
        assert_eq!(quic_svc["port"].as_u64(), Some(quic_port as u64), "{r}");
        let tls = config["tls"]["enabled"].as_bool() == Some(true);
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{r}: {probe}");
            assert_eq!(
                container_port(container, &get["port"]).0,
                http_port,
                "{r}: {probe} port"
            );
            assert_eq!(
                get["scheme"].as_str().unwrap_or("HTTP"),
                if tls { "HTTPS" } else { "HTTP" },
                "{r}: {probe} scheme follows tls.enabled"
            );
        }

        // Every file the configuration names is mounted from a Secret that holds it.
        let mut files = vec![
            config["tls"]["cert_file"].as_str().unwrap(),
            config["tls"]["key_file"].as_str().unwrap(),
            config["webtransport"]["cert_file"].as_str().unwrap(),
            config["webtransport"]["key_file"].as_str().unwrap(),
        ];
        if let Some(secret) = config["auth"]["jwt"].get("secret_file") {
            files.push(secret.as_str().unwrap());
        }
        for file in files {
            let (dir, name) = file.rsplit_once('/').unwrap();
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == dir)
                .unwrap_or_else(|| panic!("{r}: nothing mounted at {dir} for {file}"));
            let volume = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            let secret = &volume["secret"];
            let holds = match secret["items"].as_array() {
                Some(items) => items.iter().any(|i| i["path"] == name),
                // A kubernetes.io/tls Secret has exactly these keys.
                None => ["tls.crt", "tls.key"].contains(&name),
            };
            assert!(holds, "{r}: {file} is not in the Secret mounted at {dir}");
        }

        // The image's user, and the restricted Pod Security Standard.
        assert_eq!(
            spec["securityContext"]["runAsUser"]
                .as_u64()
                .map(|u| u.to_string()),
            user.first().cloned(),
            "{r}: the pod runs as the image's user"
        );
        for (spec, container) in [region.pod("roomwire"), region.pod("nats")] {
            assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{r}");
            assert_eq!(
                spec["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            let sc = &container["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{r}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{r}"
            );
        }
        // The container's command ends by running the image's binary (test
        // three_regions_from_the_manifests_mesh_chat_and_drain runs the command itself).
        let command = container["command"].as_array().unwrap();
        let script = command.last().unwrap().as_str().unwrap();
        assert!(
            script.ends_with(&format!("exec {image_bin}")),
            "{r}: the command runs {image_bin} as the container's process: {script}"
        );

        // The stop budget: preStop, then SIGTERM: hand-off (at most route_deadline_ms), then
        // sessions (at most drain_grace_ms), then leaving the mesh, before the SIGKILL.
        let pre_stop: Vec<&str> = container["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let pre_stop_s: u64 = match pre_stop.as_slice() {
            ["sleep", seconds] => seconds.parse().unwrap(),
            other => panic!("{r}: a preStop this test cannot time: {other:?}"),
        };
        let drain_ms = config["mesh"]["route_deadline_ms"].as_integer().unwrap()
            + config["server"]["drain_grace_ms"].as_integer().unwrap();
        let grace_s = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace_s * 1000 >= pre_stop_s * 1000 + drain_ms as u64 + 3000,
            "{r}: terminationGracePeriodSeconds {grace_s} < preStop {pre_stop_s} s + drain \
             {drain_ms} ms + 3 s"
        );

        // The mesh: the nodes' NATS URL is the region's NATS client Service, and the NATS
        // servers listen there.
        let nats = region.pod("nats").1;
        let (nats_client_port, _) = container_port(nats, &"client".into());
        for url in config["mesh"]["nats_urls"].as_array().unwrap() {
            let url = url::Url::parse(url.as_str().unwrap()).unwrap();
            let svc = &region.get("Service", url.host_str().unwrap())["spec"];
            let p = svc["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["port"].as_u64() == url.port().map(u64::from))
                .unwrap_or_else(|| panic!("{r}: the NATS Service has no port for {url}"));
            assert_eq!(container_port(nats, &p["targetPort"]).0, nats_client_port);
        }
        let conf = region.nats_conf();
        assert!(
            conf.contains(&format!("listen: 0.0.0.0:{nats_client_port}\n")),
            "{r}: NATS listens for clients on its container port"
        );
        let placement = config["mesh"]["jetstream_placement"].as_str().unwrap();
        assert!(REGIONS.contains(&placement), "{r}: placement {placement}");
        let placement_replicas = regions
            .iter()
            .find(|x| x.name == placement)
            .unwrap()
            .get("StatefulSet", "nats")["spec"]["replicas"]
            .as_i64()
            .unwrap();
        assert!(
            config["mesh"]["jetstream_replicas"].as_integer().unwrap() <= placement_replicas,
            "{r}: more JetStream replicas than NATS servers in {placement}"
        );
        // JetStream across gateways needs each region's cluster named like its gateway.
        let names: Vec<&str> = conf
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name: "))
            .collect();
        assert_eq!(names, [r, r], "{r}: cluster and gateway names");
        for peer in REGIONS {
            assert!(
                conf.contains(&format!(
                    "{{ name: {peer}, urls: [\"nats://gateway.{peer}.nats.example.com:7222\"] }}"
                )),
                "{r}: a gateway to {peer}"
            );
        }
        assert!(conf.contains(&format!("advertise: gateway.{r}.nats.example.com:7222\n")));
        let nats_env = container_env(nats, "nats-0");
        assert_eq!(
            env_value(&nats_env, "SERVER_NAME"),
            Some(format!("{r}-nats-0").as_str()),
            "{r}: NATS server names are unique across regions"
        );

        // Disruption budgets select their pods and leave the others running.
        for name in ["roomwire", "nats"] {
            let pdb = &region.get("PodDisruptionBudget", name)["spec"];
            let sts = &region.get("StatefulSet", name)["spec"];
            assert_eq!(
                pdb["selector"], sts["selector"],
                "{r}: PodDisruptionBudget {name}"
            );
            assert!(pdb["maxUnavailable"].as_i64().unwrap() < sts["replicas"].as_i64().unwrap());
        }
    }
}

/// One process started from a manifest; killed on drop, its output in `log`.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn");
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `condition` holds, for at most `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `text` with `from` replaced by `to`; `from` must occur (the manifest changed otherwise).
fn rewrite(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the manifest no longer names {from:?}");
    text.replace(from, to)
}

/// Ports of one NATS server on this machine.
#[derive(Clone, Copy)]
struct NatsPorts {
    client: u16,
    http: u16,
    cluster: u16,
    gateway: u16,
}

/// GET `path` over HTTPS from `addr`, trusting `ca`: the status, or `None` when the node does
/// not answer (the kubelet counts both as a failed probe).
async fn https_status(addr: SocketAddr, path: &str, ca: &str) -> Option<u16> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let request = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .ok()?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let head = String::from_utf8_lossy(&response);
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(3), request)
        .await
        .ok()
        .flatten()
}

/// This process's hard limit on open files (what a container's runtime would set).
fn hard_open_files() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().to_string()
}

/// A roomwire node started the way its pod starts it.
struct PodNode {
    process: Process,
    http: SocketAddr,
    config: PathBuf,
}

impl PodNode {
    async fn status(&self, path: &str, ca: &str) -> Option<u16> {
        https_status(self.http, path, ca).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_from_the_manifests_mesh_chat_and_drain() {
    let regions = all_regions();
    let dir = TempDir::new("k8s-run");
    let nats_bin = nats_server_bin();

    // The NATS servers of every region, as many as each StatefulSet has.
    let replicas = |region: &Region| {
        region.get("StatefulSet", "nats")["spec"]["replicas"]
            .as_u64()
            .unwrap() as usize
    };
    let ports: BTreeMap<&str, Vec<NatsPorts>> = regions
        .iter()
        .map(|region| {
            let ports = (0..replicas(region))
                .map(|_| NatsPorts {
                    client: free_port(),
                    http: free_port(),
                    cluster: free_port(),
                    gateway: free_port(),
                })
                .collect();
            (region.name, ports)
        })
        .collect();
    let mut servers: Vec<(String, Process, NatsPorts, PathBuf)> = Vec::new();
    for region in &regions {
        let r = region.name;
        let (_, container) = region.pod("nats");
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let conf_mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .unwrap()["mountPath"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            args,
            ["--config", &format!("{conf_mount}/nats.conf")],
            "{r}: nats-server reads the mounted ConfigMap"
        );
        for (i, own) in ports[r].iter().enumerate() {
            let pod = format!("nats-{i}");
            let base = dir.path().join(format!("{r}-{pod}"));
            std::fs::create_dir_all(&base).unwrap();
            // The pod's addresses and paths, moved to this machine.
            let moved = [
                (
                    "listen: 0.0.0.0:4222\n",
                    format!("listen: 127.0.0.1:{}\n", own.client),
                ),
                (
                    "http: 0.0.0.0:8222\n",
                    format!("http: 127.0.0.1:{}\n", own.http),
                ),
                (
                    "listen: 0.0.0.0:6222\n",
                    format!("listen: 127.0.0.1:{}\n", own.cluster),
                ),
                (
                    "listen: 0.0.0.0:7222\n",
                    format!("listen: 127.0.0.1:{}\n", own.gateway),
                ),
                (
                    "/var/run/nats/nats.pid",
                    base.join("nats.pid").display().to_string(),
                ),
                (
                    "/data/jetstream",
                    base.join("jetstream").display().to_string(),
                ),
            ];
            let mut conf = moved
                .iter()
                .fold(region.nats_conf().to_string(), |conf, (from, to)| {
                    rewrite(&conf, from, to)
                });
            for (j, peer) in ports[r].iter().enumerate() {
                conf = rewrite(
                    &conf,
                    &format!("nats://nats-{j}.nats-headless:6222"),
                    &format!("nats://127.0.0.1:{}", peer.cluster),
                );
            }
            // A region's gateway address (its LoadBalancer) reaches one of its servers.
            for peer in REGIONS {
                conf = rewrite(
                    &conf,
                    &format!("gateway.{peer}.nats.example.com:7222"),
                    &format!("127.0.0.1:{}", ports[peer][0].gateway),
                );
            }
            let conf_file = base.join("nats.conf");
            std::fs::write(&conf_file, conf).unwrap();
            let mut command = Command::new(&nats_bin);
            command
                .arg("--config")
                .arg(&conf_file)
                .envs(container_env(container, &pod));
            let log = base.join("nats.log");
            servers.push((
                format!("{r}-{pod}"),
                Process::spawn(command, log),
                *own,
                base.join("nats.pid"),
            ));
        }
    }
    // Up, the gateways joined, then JetStream's meta leader elected across the regions.
    for (name, process, ports, _) in &servers {
        let monitor = SocketAddr::from(([127, 0, 0, 1], ports.http));
        wait_for(
            &format!("nats-server {name} with its gateways\n{}", process.tail()),
            Duration::from_secs(60),
            || async move {
                let Ok((200, body)) =
                    try_http_request(monitor, "GET", "/gatewayz", None, None).await
                else {
                    return false;
                };
                let gatewayz: Value = serde_json::from_str(&body).unwrap_or_default();
                let outbound = gatewayz["outbound_gateways"]
                    .as_object()
                    .map(|g| g.values().filter(|c| c["connection"].is_object()).count())
                    .unwrap_or(0);
                outbound == REGIONS.len() - 1
            },
        )
        .await;
    }
    for (name, process, ports, _) in &servers {
        let monitor = SocketAddr::from(([127, 0, 0, 1], ports.http));
        wait_for(
            &format!("JetStream of {name}\n{}", process.tail()),
            Duration::from_secs(90),
            || async move {
                matches!(
                    try_http_request(monitor, "GET", "/healthz", None, None).await,
                    Ok((200, _))
                )
            },
        )
        .await;
    }

    // What the Secrets would mount: one certificate for both ports, the JWT key.
    let ca = DevCa::new("k8s test CA").unwrap();
    let issued = ca.node(&["localhost".into()]).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let etc = dir.path().join("etc-roomwire");
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    std::fs::write(etc.join("tls/tls.crt"), &issued.cert_pem).unwrap();
    std::fs::write(etc.join("tls/tls.key"), &issued.key_pem).unwrap();
    std::fs::write(etc.join("secrets/jwt-secret"), JWT_SECRET).unwrap();

    // A node of eu and one of ap, started by the container's command.
    let mut nodes: BTreeMap<&str, PodNode> = BTreeMap::new();
    for r in ["eu", "ap"] {
        let region = regions.iter().find(|x| x.name == r).unwrap();
        let (_, container) = region.pod("roomwire");
        let (http, quic) = (free_port(), free_port());
        let mut toml = region.node_toml().to_string();
        toml = rewrite(
            &toml,
            "listen = [\"0.0.0.0:8080\"]",
            &format!("listen = [\"127.0.0.1:{http}\"]"),
        );
        toml = rewrite(
            &toml,
            "listen = [\"0.0.0.0:4433\"]",
            &format!("listen = [\"127.0.0.1:{quic}\"]"),
        );
        toml = rewrite(&toml, "\"/etc/roomwire/", &format!("\"{}/", etc.display()));
        let urls: Vec<String> = ports[r]
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{}\"", p.client))
            .collect();
        toml = rewrite(&toml, "\"nats://nats:4222\"", &urls.join(", "));
        let config = dir.path().join(format!("{r}-roomwire.toml"));
        std::fs::write(&config, toml).unwrap();
        let command_line: Vec<String> = container["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("/usr/local/bin/roomwire", BIN))
            .collect();
        // Started with the soft limit on open files some container runtimes give (1024), which
        // the command must raise.
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile=1024:{}", hard_open_files()))
            .args(&command_line)
            .env_clear()
            .envs(container_env(container, "roomwire-0"))
            .env("ROOMWIRE_CONFIG", &config)
            .env("RUST_LOG", "info");
        let process = Process::spawn(command, dir.path().join(format!("{r}-roomwire.log")));
        nodes.insert(
            r,
            PodNode {
                process,
                http: SocketAddr::from(([127, 0, 0, 1], http)),
                config,
            },
        );
    }
    let ca_pem = ca.cert_pem();
    for (r, node) in &nodes {
        let region = regions.iter().find(|x| x.name == *r).unwrap();
        let (_, container) = region.pod("roomwire");
        for probe in ["livenessProbe", "readinessProbe"] {
            let path = container[probe]["httpGet"]["path"].as_str().unwrap();
            wait_for(
                &format!("{r}: {probe} {path} answers 200\n{}", node.process.tail()),
                Duration::from_secs(60),
                || async { node.status(path, &ca_pem).await == Some(200) },
            )
            .await;
        }
        // The command raised the open-files limit to the hard limit, and exec made the node
        // the shell's process (the one that gets the SIGTERM).
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", node.process.child.id())).unwrap();
        let files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
        assert_eq!(numbers[0], numbers[1], "{r}: soft = hard: {files}");
        let exe = std::fs::read_link(format!("/proc/{}/exe", node.process.child.id())).unwrap();
        assert_eq!(
            exe,
            Path::new(BIN),
            "{r}: the container's process is the node"
        );
    }

    // A user in each region, in one room, through the gateways; tokens minted from the same
    // configuration (`roomwire token`).
    let token = |node: &PodNode, user: &str| {
        common::stdout_of(
            Command::new(BIN)
                .args([
                    "token",
                    "--sub",
                    user,
                    "--join",
                    "lobby",
                    "--publish",
                    "lobby",
                ])
                .args(["--ttl", "1h"])
                .env_clear()
                .env("ROOMWIRE_CONFIG", &node.config),
        )
    };
    let connect = |node: &PodNode, token: String| {
        let url = format!("wss://localhost:{}/ws", node.http.port());
        let options = ClientOptions {
            token,
            ca_file: Some(ca_file.clone()),
            ..Default::default()
        };
        async move { Client::connect(&url, options).await.expect("wss client") }
    };
    let mut alice = connect(&nodes["eu"], token(&nodes["eu"], "alice")).await;
    let mut bob = connect(&nodes["ap"], token(&nodes["ap"], "bob")).await;
    alice.join("lobby").await.expect("alice joins");
    bob.join("lobby").await.expect("bob joins");
    let id = alice.next_message_id();
    alice
        .publish("lobby", "hello from eu", &id)
        .await
        .expect("publish");
    let got = next_message(&mut bob).await;
    assert_eq!(&got.payload[..], b"hello from eu");
    assert_eq!(got.publisher, "alice");

    // The pod is deleted: the preStop runs, then the kubelet's SIGTERM drains the node, which
    // must be done within what is left of the grace period.
    let eu = regions.iter().find(|x| x.name == "eu").unwrap();
    let (spec, _) = eu.pod("roomwire");
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap());
    let mut node = nodes.remove("eu").unwrap();
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &node.process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("eu not ready once draining", DEADLINE, || async {
        node.status("/readyz", &ca_pem).await != Some(200)
    })
    .await;
    // Her own message may come first.
    loop {
        match tokio::time::timeout(DEADLINE, alice.next_event()).await {
            Ok(Some(Event::GoAway(_))) => break,
            Ok(Some(Event::Message(_))) => continue,
            other => panic!("alice was not told to go away: {other:?}"),
        }
    }
    drop(alice);
    let exit = loop {
        if let Some(exit) = node.process.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < grace,
            "the node still runs {grace:?} after SIGTERM\n{}",
            node.process.tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}\n{}", node.process.tail());
    eprintln!(
        "eu drained and exited {:?} after SIGTERM",
        started.elapsed()
    );
    // The room lives on in ap.
    let bob2 = connect(&nodes["ap"], token(&nodes["ap"], "bob2")).await;
    bob2.join("lobby").await.expect("bob2 joins");
    let id = bob2.next_message_id();
    bob2.publish("lobby", "still here", &id)
        .await
        .expect("publish after the drain");
    let got = next_message(&mut bob).await;
    assert_eq!(&got.payload[..], b"still here");

    // The NATS preStop: lame duck mode, through the pid file of the configuration.
    let us = regions.iter().find(|x| x.name == "us").unwrap();
    let (_, nats) = us.pod("nats");
    let pre_stop: Vec<&str> = nats["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let (name, server, _, pid_file) = servers
        .iter()
        .find(|(name, ..)| name == "us-nats-0")
        .unwrap();
    assert_eq!(pre_stop[0], "nats-server");
    let args: Vec<String> = pre_stop[1..]
        .iter()
        .map(|a| a.replace("/var/run/nats/nats.pid", &pid_file.display().to_string()))
        .collect();
    let out = Command::new(&nats_bin).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&format!("{name} in lame duck mode"), DEADLINE, || async {
        server.log().contains("Entering lame duck mode")
    })
    .await;
}
