//! What a user gets from a release build and from `scripts/install`: the six real plugins and
//! nothing a test put there, and an installed binary that finds its plugins by itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use embassy_tests::*;
use serde_json::json;

/// The plugins a release build of the workspace ships, by `embassy plugins` name.
const REAL_PLUGINS: &[&str] = &[
    "consul",
    "etcd",
    "file",
    "least-conn",
    "round-robin",
    "source-hash",
];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds tests/")
}

/// The workspace's target directory (the tests run from `target/<profile>/deps`).
fn target_dir() -> &'static Path {
    artifacts()
        .profile_dir
        .parent()
        .expect("target/<profile> has a parent")
}

/// `target/release` after the user's build of the workspace, less the test and bench crates as
/// `scripts/install` and the Dockerfile build it (shared by this file's tests; cargo is a
/// no-op when it is fresh).
fn release_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace())
            .env("CARGO_TARGET_DIR", target_dir())
            .args(["build", "--release", "--locked", "--workspace"])
            .args(["--exclude", "embassy-tests", "--exclude", "embassy-bench"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --release --workspace failed");
        target_dir().join("release")
    })
}

/// The names `embassy plugins --json` lists for `dir`, and its exit code.
fn listed_plugins(embassy: &Path, dir: Option<&Path>) -> (Option<i32>, Vec<String>) {
    let mut command = Command::new(embassy);
    command.env_remove("EMBASSY_PLUGIN_DIR").arg("plugins");
    if let Some(dir) = dir {
        command.arg("--plugin-dir").arg(dir);
    }
    command.arg("--json");
    let output = command.output().expect("run embassy plugins");
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let plugin: serde_json::Value = serde_json::from_str(line).expect("one JSON per line");
            plugin["name"].as_str().expect("a name").to_string()
        })
        .collect();
    names.sort();
    (output.status.code(), names)
}

#[test]
fn a_release_build_puts_exactly_the_real_plugins_in_target_release() {
    let release = release_dir();
    let (code, names) = listed_plugins(&release.join("embassy"), Some(release));
    assert_eq!(names, REAL_PLUGINS, "no test fixture among them");
    assert_eq!(code, Some(0), "every library in target/release loads");
}

#[test]
fn the_installed_binary_finds_its_plugins_and_serves_a_file_service() {
    release_dir(); // the install script's build is then a no-op
    let prefix = tempfile::tempdir().expect("temp dir");
    let status = Command::new(workspace().join("scripts/install"))
        .env("CARGO_TARGET_DIR", target_dir())
        .arg(prefix.path())
        .status()
        .expect("run scripts/install");
    assert!(status.success(), "scripts/install failed");
    let embassy = prefix.path().join("bin/embassy");
    let (code, names) = listed_plugins(&embassy, None);
    assert_eq!(names, REAL_PLUGINS, "found in PREFIX/lib/embassy/plugins");
    assert_eq!(code, Some(0));

    let upstream = Upstream::start("installed");
    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": [upstream.addr.to_string()] }));
    let port = free_port();
    let mut proxy = Embassy::start_binary(
        &embassy,
        [
            "--discovery".to_string(),
            format!("file://{}", services.display()),
            "--service".to_string(),
            format!("web;{port}/tcp"),
        ],
    );
    proxy
        .wait_for_log("listening", Duration::from_secs(20))
        .expect("the installed embassy starts with its default plugin directory");
    assert!(
        eventually(Duration::from_secs(5), || {
            Client::connect(port).is_ok_and(|c| c.upstream == "installed")
        }),
        "a connection reaches the upstream through the installed binary"
    );
}
