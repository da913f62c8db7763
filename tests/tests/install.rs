//! What a user gets from a release build and from `scripts/install`: the seven real plugins and
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
    "dns",
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
    let proxy = Embassy::start_binary(
        &embassy,
        [
            "--discovery".to_string(),
            format!("file://{}", services.display()),
            "--service".to_string(),
            format!("web;{port}/tcp"),
        ],
    );
    proxy
        .wait_for_services(1, Duration::from_secs(20))
        .expect("the installed embassy starts with its default plugin directory");
    assert!(
        eventually(Duration::from_secs(5), || {
            Client::connect(port).is_ok_and(|c| c.upstream == "installed")
        }),
        "a connection reaches the upstream through the installed binary"
    );
}

/// Copies the plugin template `examples/discovery-plugin` to `to`, leaving out build outputs,
/// with its `embassy-plugin-api` dependency pointed at this tree's `plugin-api` by absolute
/// path, as a third party points it at a version.
fn copy_template(to: &Path) {
    let from = workspace().join("examples/discovery-plugin");
    for entry in walk(&from) {
        let relative = entry.strip_prefix(&from).expect("inside the template");
        if relative.starts_with("target") || relative == Path::new("Cargo.lock") {
            continue;
        }
        let destination = to.join(relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&destination).expect("create dir");
        } else {
            std::fs::copy(&entry, &destination).expect("copy file");
        }
    }
    let manifest = to.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("read the template's manifest");
    let relative = r#"path = "../../plugin-api""#;
    assert!(
        text.contains(relative),
        "the template depends on plugin-api by {relative}"
    );
    let absolute = format!(
        "path = {:?}",
        workspace().join("plugin-api").display().to_string()
    );
    std::fs::write(&manifest, text.replace(relative, &absolute)).expect("write manifest");
}

/// `dir` and everything under it, directories before their contents.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut index = 0;
    while index < found.len() {
        if found[index].is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(&found[index])
                .expect("read dir")
                .map(|entry| entry.expect("dir entry").path())
                .collect();
            children.sort();
            found.extend(children);
        }
        index += 1;
    }
    found
}

/// A third party's path: the template copied out of the tree, its own tests run and its
/// library built there, then loaded by the unmodified release host, which serves through it.
#[test]
fn the_plugin_template_builds_out_of_the_tree_and_serves_through_the_release_host() {
    let release = release_dir();
    let outside = tempfile::tempdir().expect("temp dir");
    let crate_dir = outside.path().join("my-discovery");
    copy_template(&crate_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Its own target directory (kept between runs, for speed): nothing of the workspace's.
    let template_target = target_dir().join("template");
    for command in ["test", "build"] {
        let status = Command::new(&cargo)
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &template_target)
            .args([command, "--offline"])
            .status()
            .expect("run cargo");
        assert!(
            status.success(),
            "cargo {command} in the copied template failed"
        );
    }
    let plugins = tempfile::tempdir().expect("temp dir");
    for library in [
        template_target.join("debug/libembassy_plugin_lines.so"),
        release.join("libembassy_plugin_round_robin.so"),
    ] {
        let name = library.file_name().expect("a file name");
        std::fs::copy(&library, plugins.path().join(name)).expect("copy library");
    }
    let embassy = release.join("embassy");
    let (code, names) = listed_plugins(&embassy, Some(plugins.path()));
    assert_eq!(names, ["lines", "round-robin"]);
    assert_eq!(code, Some(0));

    let upstream = Upstream::start("template");
    let list = plugins.path().join("services.txt");
    std::fs::write(
        &list,
        format!(
            "# the template's format\nweb {} tags=prod\nweb 127.0.0.1:9 proto=udp\n",
            upstream.addr
        ),
    )
    .expect("write the list");
    let port = free_port();
    let proxy = Embassy::start_binary(
        &embassy,
        [
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            format!("lines://{}", list.display()),
            "--discovery-opt".to_string(),
            "interval=50ms".to_string(),
            "--service".to_string(),
            format!("web[prod];{port}/tcp"),
        ],
    );
    proxy
        .wait_for_endpoints(
            &format!("tcp-{port}"),
            &[upstream.addr],
            Duration::from_secs(20),
        )
        .expect("the template's set reaches the host");
    assert_eq!(
        Client::connect(port)
            .expect("served through the template")
            .upstream,
        "template"
    );
}

/// `cargo package` checks what crates.io would: metadata, and that the packaged crate builds
/// on its own.
#[test]
fn the_plugin_api_crate_packages_for_publishing() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", target_dir())
        .args([
            "package",
            "-p",
            "embassy-plugin-api",
            "--offline",
            "--allow-dirty",
        ])
        .output()
        .expect("run cargo package");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
