//! `roomwire check-config` (issue 14): `--print` shows the effective configuration with secrets masked, and a secret
//! source that does not resolve is an error naming its key.

use std::process::Command;

fn check_config(config: &str, env: Option<(&str, &str)>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roomwire"));
    cmd.args(["check-config", "--print", "--config", path.to_str().unwrap()])
        .env_remove("ROOMWIRE_CLI_TEST_SECRET")
        .env("RUST_BACKTRACE", "0");
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn print_masks_secrets_and_unresolved_sources_are_errors() {
    let config = r#"
[tls]
enabled = false
[nats]
user = "gateway"
password = { env = "ROOMWIRE_CLI_TEST_SECRET" }
[auth]
allow_anonymous = true
"#;
    let (ok, text) = check_config(config, None);
    assert!(!ok, "a missing variable must fail: {text}");
    assert!(
        text.contains("nats.password") && text.contains("ROOMWIRE_CLI_TEST_SECRET"),
        "{text}"
    );

    let (ok, text) = check_config(config, Some(("ROOMWIRE_CLI_TEST_SECRET", "hunter2-secret")));
    assert!(ok, "{text}");
    assert!(!text.contains("hunter2-secret"), "the secret was printed: {text}");
    // The effective configuration, defaults included.
    for expected in [
        "max_connections: 50000",
        "max_recover: 1000",
        "ROOMWIRE_CLI_TEST_SECRET",
        "user: Some(",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in: {text}");
    }

    let file_config = config.replace(
        r#"{ env = "ROOMWIRE_CLI_TEST_SECRET" }"#,
        r#"{ file = "/nonexistent/secret" }"#,
    );
    let (ok, text) = check_config(&file_config, None);
    assert!(!ok && text.contains("nats.password"), "{text}");
}
