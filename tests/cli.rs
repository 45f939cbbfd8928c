//! The binary's configuration handling: bad configs stop it before any port is bound,
//! `--check-config` validates and prints without secrets.

use std::process::Command;

fn s3cached() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3cached"));
    for (key, _) in std::env::vars() {
        if key.starts_with("S3CACHED_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn an_invalid_config_exits_with_a_clear_message() {
    let out = s3cached()
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid configuration") && err.contains("listen"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max_entreis = 5\n").unwrap();
    let out = s3cached().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_entreis"));
}

#[test]
fn check_config_merges_layers_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "max_entries = 10\ncull_frequency = 4\nsecret_access_key = \"hunter2\"\naccess_key_id = \"AKIAEXAMPLE\"\n").unwrap();
    let out = s3cached()
        .arg("--config")
        .arg(&file)
        .args(["--check-config", "--max-entries", "20"])
        .env("S3CACHED_CULL_FREQUENCY", "5")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_entries = \"20\""), "{text}");
    assert!(text.contains("cull_frequency = \"5\""), "{text}");
    assert!(text.contains("secret_access_key = \"set\""));
    assert!(!text.contains("hunter2") && !text.contains("AKIAEXAMPLE"));
}
