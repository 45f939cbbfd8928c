//! Tests of the configuration: layers, validation, defaults by store, the example file.

use super::*;

#[test]
fn defaults_are_safe() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.listen, "127.0.0.1:11211");
    assert_eq!(c.cull_frequency, 3);
    assert_eq!(c.default_acl, "private");
    assert!(!c.uses_s3());
}

#[test]
fn bounds_default_by_backend_and_explicit_values_are_kept() {
    let dir = Config::from_toml("").unwrap();
    assert_eq!((dir.max_entries, dir.max_bytes), (0, DEFAULT_DIR_MAX_BYTES));
    let s3 = Config::from_toml("storage_bucket_name = \"b\"").unwrap();
    assert_eq!((s3.max_entries, s3.max_bytes), (DEFAULT_S3_MAX_ENTRIES, 0));
    let set =
        Config::from_toml("storage_bucket_name = \"b\"\nmax_entries = 300\nmax_bytes = 5").unwrap();
    assert_eq!((set.max_entries, set.max_bytes), (300, 5));
    let dir = Config::from_toml("max_entries = 300\nmax_bytes = 0").unwrap();
    assert_eq!((dir.max_entries, dir.max_bytes), (300, 0));
}

#[test]
fn unknown_keys_and_bad_values_are_rejected() {
    assert!(Config::from_toml("no_such_key = 1").is_err());
    assert!(Config::from_toml("listen = \"nowhere\"").is_err());
    assert!(Config::from_toml("default_acl = \"everyone\"").is_err());
    assert!(Config::from_toml("access_key_id = \"AKIA\"").is_err());
    assert!(Config::from_toml("tls_cert = \"c.pem\"").is_err());
    assert!(Config::from_toml("tls_ca = \"ca.pem\"").is_err());
    let missing = Config::from_toml("tls_cert = \"/no/c.pem\"\ntls_key = \"/no/k.pem\"");
    let err = missing.unwrap_err().to_string();
    assert!(err.starts_with("TLS: /no/c.pem:"), "{err}");
    assert!(Config::from_toml("").unwrap().tls_files().is_none());
    assert!(Config::from_toml("admin_listen = \"localhost\"").is_err());
    assert!(Config::from_toml("server_side_encryption = \"aes\"").is_err());
    assert!(Config::from_toml("sse_kms_key_id = \"k\"").is_err());
    assert!(Config::from_toml("s3_price_get_per_1000 = -1.0").is_err());
    let ok = "server_side_encryption = \"aws:kms\"\nsse_kms_key_id = \"k\"\n\
              admin_listen = \"127.0.0.1:9211\"\ns3_price_put_per_1000 = 0.0055";
    let c = Config::from_toml(ok).unwrap();
    assert_eq!(c.admin_addr(), Some("127.0.0.1:9211".parse().unwrap()));
    assert_eq!(c.s3_prices().put_per_1000, 0.0055);
    assert_eq!(Config::from_toml("").unwrap().admin_addr(), None);
}

#[test]
fn the_memory_budget_must_hold_the_largest_requests() {
    assert!(Config::from_toml("memory_limit_bytes = 8388607").is_err());
    assert!(Config::from_toml("memory_limit_bytes = 8388608").is_ok());
    let big_items = "max_item_size = 4194304\nmemory_limit_bytes = 16777216";
    assert!(Config::from_toml(big_items).is_err());
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.memory_limit_bytes, 256 * 1024 * 1024);
    assert_eq!((c.request_timeout_secs, c.write_timeout_secs), (30, 30));
}

#[test]
fn items_go_to_a_gib_and_longer_values_stream_within_a_budget_that_holds_them() {
    let gib = 1024 * 1024 * 1024;
    let with = |extra: &str| Config::from_toml(extra);
    assert!(with(&format!("max_item_size = {gib}")).is_ok());
    assert!(with(&format!("max_item_size = {}", gib + 1)).is_err());
    assert!(with("stream_above_bytes = 262143").is_err());
    assert!(with("stream_above_bytes = 262144").is_ok());
    let c = with(&format!("max_item_size = {gib}")).unwrap();
    assert_eq!(
        c.whole_value_bytes(),
        1024 * 1024,
        "held whole: up to stream_above_bytes"
    );
    // Streaming needs room for 8 streamed writes' parts: 256 MiB, the default budget.
    let small = format!("max_item_size = {gib}\nmemory_limit_bytes = 268435455");
    assert!(with(&small).unwrap_err().to_string().contains("streamed"));
    let enough = format!("max_item_size = {gib}\nmemory_limit_bytes = 268435456");
    assert!(with(&enough).is_ok());
    // Nothing streams while items fit stream_above_bytes: the old bound holds.
    assert!(with("max_item_size = 1048576\nmemory_limit_bytes = 8388608").is_ok());
}

#[test]
fn the_disk_tier_is_off_by_default_and_must_hold_eight_blocks() {
    let c = Config::from_toml("").unwrap();
    assert!(c.disk_tier().is_none());
    assert_eq!(c.disk_cache_bytes, 1024 * 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let on = |extra: &str| {
        Config::from_toml(&format!(
            "disk_cache_dir = {:?}\n{extra}",
            dir.path().display().to_string()
        ))
    };
    let tier = on("").unwrap().disk_tier().unwrap();
    // The default 1 MiB items need blocks of 1 MiB + 64 KiB.
    assert_eq!(tier.block_bytes(), 1024 * 1024 + 64 * 1024);
    assert!(on("disk_cache_bytes = 8912895").is_err());
    assert!(on("disk_cache_bytes = 8912896").is_ok());
    let small_items = "max_item_size = 4096\ndisk_cache_bytes = 8388608";
    assert_eq!(
        on(small_items).unwrap().disk_tier().unwrap().block_bytes(),
        1 << 20
    );
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let text = format!("disk_cache_dir = {:?}", file.display().to_string());
    assert!(
        Config::from_toml(&text).is_err(),
        "a file is not a directory"
    );
}

#[test]
fn secrets_never_print() {
    let c =
        Config::from_toml("access_key_id = \"AKIAXXXX\"\nsecret_access_key = \"hunter2\"").unwrap();
    let shown = format!("{c:?} {:?}", c.rows());
    assert!(!shown.contains("hunter2") && !shown.contains("AKIAXXXX"));
}

#[test]
fn to_toml_is_typed_reads_back_the_same_and_covers_every_key() {
    let c = Config::from_toml(
        "max_connections = 9\nflush_enabled = false\nlocation = \"it's \\\"here\\\"\"\n\
         data_dir = \"/tmp/x y\"\ns3_max_attempts = 7\naccess_key_id = \"AKIAXXXX\"\n\
         secret_access_key = \"hunter2\"\n",
    )
    .unwrap();
    let text = c.to_toml();
    assert!(text.contains("\nmax_connections = 9\n"), "{text}");
    assert!(text.contains("\nflush_enabled = false\n"), "{text}");
    assert!(text.contains("\ns3_max_attempts = 7\n"), "{text}");
    assert!(
        text.contains("\n# access_key_id = <redacted: set>\n"),
        "{text}"
    );
    assert!(!text.contains("hunter2") && !text.contains("AKIAXXXX"));
    let back = Config::from_toml(&text).unwrap();
    assert_eq!(back.location, "it's \"here\"");
    assert_eq!(back.data_dir, PathBuf::from("/tmp/x y"));
    let mut expected = c.rows();
    for (key, value) in &mut expected {
        if ["access_key_id", "secret_access_key"].contains(&key.as_str()) {
            *value = "unset".into();
        }
    }
    assert_eq!(back.rows(), expected);
    for (key, _) in KEYS {
        let row = format!("\n{key} = ");
        let secret = format!("\n# {key} = <redacted: ");
        assert!(
            text.contains(&row) || text.contains(&secret),
            "{key} missing"
        );
    }
}

#[test]
fn example_file_lists_every_key_and_parses() {
    let text = include_str!("../../config.example.toml");
    Config::from_toml(text).expect("config.example.toml is valid");
    for (key, _) in KEYS {
        assert!(
            text.contains(&format!("\n# {key} =")) || text.contains(&format!("\n{key} =")),
            "config.example.toml lacks {key}"
        );
    }
}

#[test]
fn numbers_that_would_fail_later_are_refused_at_check_config() {
    // Each passed validation once and then failed in the running server: the accept task
    // panicked, every connection panicked, the clock overflowed, the disk tier could not
    // be sized.
    for (line, name) in [
        ("max_connections = 2305843009213693952", "max_connections"),
        (
            "idle_timeout_secs = 4611686018427387904",
            "idle_timeout_secs",
        ),
        ("clock_offset_ms = 9223372036854775807", "clock_offset_ms"),
        (
            "disk_cache_bytes = 18446744073709551615",
            "disk_cache_bytes",
        ),
        (
            "request_timeout_secs = 18446744073709551615",
            "request_timeout_secs",
        ),
        ("s3_operation_timeout_ms = 0", "s3_operation_timeout_ms"),
        ("max_tls_handshakes = 0", "max_tls_handshakes"),
        ("max_tls_handshakes = 65537", "max_tls_handshakes"),
    ] {
        let err = Config::from_toml(line).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("between"),
            "{line}: {err}"
        );
    }
    assert!(Config::from_toml("max_connections = 1000000").is_ok());
}

#[test]
fn a_device_as_the_config_or_users_file_is_refused_at_once() {
    let err = Config::load(Some(Path::new("/dev/zero")), Options::default()).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let err = Config::from_toml("sasl_users_file = \"/dev/zero\"").unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn a_directory_bucket_is_addressed_by_name_and_not_culled() {
    let bucket = "storage_bucket_name = \"cache--use1-az4--x-s3\"\n";
    let c = Config::from_toml(bucket).unwrap();
    assert!(c.directory_bucket());
    assert_eq!(
        (c.max_entries, c.max_bytes),
        (0, 0),
        "no culling by default"
    );
    for (extra, refused) in [
        ("force_path_style = true", "virtual-hosted-style"),
        ("max_entries = 1000", "culler cannot list"),
        ("max_bytes = 1000000", "culler cannot list"),
    ] {
        let err = Config::from_toml(&format!("{bucket}{extra}")).unwrap_err();
        assert!(err.0.contains(refused), "{extra}: {err}");
    }
    let express = Config::from_toml(&format!("{bucket}storage_class = \"EXPRESS_ONEZONE\"\n"));
    assert!(express.is_ok());
    // A general purpose bucket keeps the usual defaults.
    let general = Config::from_toml("storage_bucket_name = \"cache-x-s3\"").unwrap();
    assert!(!general.directory_bucket());
    assert_eq!(general.max_entries, 1_000_000);
}
