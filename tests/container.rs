//! The container image (`Dockerfile`) checked against the binary it ships, since no container
//! engine runs here (podman is installable, but the registry the base images come from is not
//! reachable): the build stage runs CI's build command (locked dependencies); the image's
//! environment, read by the real binary, listens on every interface on the ports the image
//! exposes (TCP for HTTP/WebSocket, UDP for WebTransport); its health check asks the HTTP port's
//! /healthz; and with the empty configuration the image ships, the node refuses to start open
//! (insecure auth on a public address) with exit code 64 and says why.

mod common;

use std::collections::BTreeMap;

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_roomwire");

/// The Dockerfile's instructions: (keyword, rest of the line), continuation lines joined.
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (keyword, rest) = current
                .trim()
                .split_once(' ')
                .unwrap_or((current.trim(), ""));
            out.push((keyword.to_string(), rest.trim().to_string()));
            current.clear();
        }
    }
    out
}

/// `ENV KEY=VALUE` lines, single quotes removed as Docker does.
fn image_env() -> BTreeMap<String, String> {
    instructions()
        .into_iter()
        .filter(|(k, _)| k == "ENV")
        .map(|(_, rest)| {
            let (key, value) = rest.split_once('=').expect("ENV KEY=VALUE");
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            (key.to_string(), value.to_string())
        })
        .collect()
}

async fn print_config(config_file: &std::path::Path) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.arg("--print-config").env_clear();
    for (key, value) in image_env() {
        command.env(key, value);
    }
    command.env("ROOMWIRE_CONFIG", config_file);
    command.output().await.unwrap()
}

#[tokio::test]
async fn the_container_image_matches_the_binary_it_ships() {
    let all = instructions();
    let run_build = all
        .iter()
        .find(|(k, rest)| k == "RUN" && rest.contains("cargo build"))
        .expect("a build stage");
    assert_eq!(
        run_build.1, "cargo build --release --locked --bin roomwire",
        "the image builds the way CI does (locked dependencies)"
    );
    assert!(
        all.iter()
            .any(|(k, rest)| k == "USER" && rest != "root" && rest != "0"),
        "runs as a non-root user"
    );
    let env = image_env();
    assert_eq!(
        env.get("ROOMWIRE_CONFIG").map(String::as_str),
        Some("/etc/roomwire/roomwire.toml")
    );

    let dir = std::env::temp_dir().join(format!("roomwire-image-{}", roomwire::random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    // The configuration the image ships is empty: the node must refuse to run open.
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let refused = print_config(&empty).await;
    assert_eq!(refused.status.code(), Some(64));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("auth.mode = \"insecure\""), "{why}");

    // With JWT configured, the image's environment listens on every interface.
    let jwt = dir.join("jwt.toml");
    std::fs::write(
        &jwt,
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nsecret = \"an-hs256-secret-of-at-least-32-bytes\"\n",
    )
    .unwrap();
    let output = print_config(&jwt).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    let (http, quic) = (
        common::listen_addrs(&config, "server"),
        common::listen_addrs(&config, "webtransport"),
    );
    assert!(
        http.iter().chain(&quic).all(|a| a.ip().is_unspecified()),
        "{http:?} {quic:?}"
    );
    let exposed: Vec<String> = all
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, rest)| rest.split_whitespace().map(str::to_string))
        .collect();
    for addr in &http {
        assert!(
            exposed.contains(&format!("{}/tcp", addr.port())),
            "{exposed:?}"
        );
    }
    for addr in &quic {
        assert!(
            exposed.contains(&format!("{}/udp", addr.port())),
            "{exposed:?}"
        );
    }
    let health = all
        .iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .expect("a health check");
    assert!(
        health
            .1
            .contains(&format!("http://127.0.0.1:{}/healthz", http[0].port())),
        "{}",
        health.1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
