//! Loading plugin libraries: bad files are refused one by one with a clear error naming them,
//! and the host goes on with the rest.

use std::time::Duration;

use embassy_tests::*;
use serde_json::json;

/// A plugin dir with the standard plugins plus: a text file named like a library, a real
/// shared library that is no plugin, and a plugin built against a changed contract.
fn mixed_plugin_dir() -> tempfile::TempDir {
    let a = artifacts();
    let dir = standard_plugin_dir(&[
        a.fixture_library("changed-contract-plugin"),
        a.fixture_library("not-a-plugin"),
    ]);
    std::fs::write(dir.path().join("libgarbage.so"), "this is not an ELF file")
        .expect("write garbage");
    std::fs::write(
        dir.path().join("README.txt"),
        "not a library: skipped silently",
    )
    .expect("write readme");
    dir
}

#[test]
fn bad_libraries_get_one_clear_error_each_and_the_host_serves() {
    let plugins = mixed_plugin_dir();
    let upstream = Upstream::start("a");
    let port = free_port();
    let proxy = FileBacked::start(
        &json!({ "web": [upstream.addr.to_string()] }),
        plugins.path(),
        &service_arg(format!("web;{port}/tcp")),
    );
    let embassy = &proxy.embassy;

    let changed = embassy.log_lines("libchanged_contract_plugin.so");
    assert_eq!(
        changed.len(),
        1,
        "one line for the incompatible plugin: {changed:?}"
    );
    assert!(
        changed[0].contains("incompatible plugin: built against plugin-api 1.0.0"),
        "{}",
        changed[0]
    );
    assert!(
        changed[0].contains("mismatched type (expected PluginMetadata, found RString)"),
        "{}",
        changed[0]
    );
    let not_plugin = embassy.log_lines("libnot_a_plugin.so");
    assert_eq!(not_plugin.len(), 1, "{not_plugin:?}");
    assert!(
        not_plugin[0].contains("not an Embassy plugin"),
        "{}",
        not_plugin[0]
    );
    let garbage = embassy.log_lines("libgarbage.so");
    assert_eq!(garbage.len(), 1, "{garbage:?}");
    assert!(
        garbage[0].contains("not a loadable shared library"),
        "{}",
        garbage[0]
    );
    assert!(
        embassy.log_lines("README.txt").is_empty(),
        "non-library files are not errors"
    );

    let client = Client::connect(port).expect("served through the valid plugins");
    assert_eq!(client.upstream, "a");
}

#[test]
fn plugins_lists_one_line_per_plugin_and_fails_on_bad_files() {
    let plugins = mixed_plugin_dir();
    let (code, stdout, stderr) = run_embassy([
        "plugins",
        "--plugin-dir",
        &plugins.path().display().to_string(),
    ]);
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let summary: Vec<String> = lines.iter().map(|f| f[..4].join(" ")).collect();
    assert_eq!(
        summary,
        vec![
            "dns discovery 0.1.0 dns",
            "etcd discovery 0.1.0 etcd,etcds,etcd2,etcd2s",
            "file discovery 0.1.0 file",
            "least-conn balancer 0.1.0 -",
            "round-robin balancer 0.1.0 -"
        ],
        "{stdout}"
    );
    assert_eq!(code, 1, "bad files make the listing fail");
    assert!(stderr.contains("libgarbage.so"), "{stderr}");
}

#[test]
fn plugins_json() {
    let plugins = standard_plugin_dir(&[]);
    let (code, stdout, _) = run_embassy([
        "plugins",
        "--json",
        "--plugin-dir",
        &plugins.path().display().to_string(),
    ]);
    assert_eq!(code, 0);
    let file: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON object per line"))
        .find(|v| v["name"] == "file")
        .expect("file plugin listed");
    assert_eq!(file["kind"], "discovery");
    assert_eq!(file["schemes"], json!(["file"]));
    assert!(file["path"]
        .as_str()
        .is_some_and(|p| p.ends_with("libembassy_plugin_file.so")));
}

#[test]
fn two_libraries_of_one_kind_load_side_by_side_and_a_duplicate_name_is_refused() {
    let a = artifacts();
    let plugins = standard_plugin_dir(&[a.fixture_library("embassy-fixture-panicking-balancer")]);
    // The same round-robin library under a second file name: same plugin name.
    std::fs::copy(
        a.library("embassy-plugin-round-robin"),
        plugins.path().join("libzz_copy.so"),
    )
    .expect("copy");
    let (_, stdout, stderr) = run_embassy([
        "plugins",
        "--plugin-dir",
        &plugins.path().display().to_string(),
    ]);
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        vec![
            "panicking",
            "dns",
            "etcd",
            "file",
            "least-conn",
            "round-robin"
        ],
        "{stdout}"
    );
    assert!(
        stderr.contains("libzz_copy.so: plugin name 'round-robin' is already taken by"),
        "{stderr}"
    );
}

#[test]
fn a_second_plugin_claiming_a_scheme_is_refused_naming_both_files() {
    let a = artifacts();
    // File-name order decides: the fixture sorts before the real file plugin and wins.
    let plugins = standard_plugin_dir(&[a.fixture_library("embassy-fixture-scheme-clash")]);
    let (code, stdout, stderr) = run_embassy([
        "plugins",
        "--plugin-dir",
        &plugins.path().display().to_string(),
    ]);
    assert_eq!(code, 1);
    assert!(
        stdout.lines().any(|l| l.starts_with("scheme-clash ")),
        "{stdout}"
    );
    assert!(!stdout.lines().any(|l| l.starts_with("file ")), "{stdout}");
    let line = stderr
        .lines()
        .find(|l| {
            l.contains("libembassy_plugin_file.so: URI scheme 'file://' is already served by")
        })
        .unwrap_or_else(|| panic!("no clash error in:\n{stderr}"));
    assert!(
        line.contains("libembassy_fixture_scheme_clash.so"),
        "{line}"
    );
}

/// Plugins a third party built against plugin-api 1.0 (a frozen copy, `tests/fixtures/
/// contract-1.0`) keep loading into this 1.1 host and serve: a balancer and a discovery plugin.
#[test]
fn plugins_built_against_contract_1_0_load_into_this_host_and_serve() {
    let a = artifacts();
    let plugins = standard_plugin_dir(&[
        a.fixture_library("v1-balancer"),
        a.fixture_library("v1-discovery"),
    ]);
    let (code, stdout, stderr) = run_embassy([
        "plugins",
        "--json",
        "--plugin-dir",
        &plugins.path().display().to_string(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let contracts: Vec<(String, String, String)> = stdout
        .lines()
        .map(|line| {
            let plugin: serde_json::Value = serde_json::from_str(line).expect("json");
            let field = |key: &str| plugin[key].as_str().unwrap_or_default().to_string();
            (field("name"), field("contract"), field("plugin_api"))
        })
        .collect();
    for (name, contract, plugin_api) in &contracts {
        let expected = if name.starts_with("v1-") {
            "1.0"
        } else {
            "1.1"
        };
        assert_eq!(contract, expected, "{name}: {stdout}");
        assert!(plugin_api.starts_with(expected), "{name}: {plugin_api}");
    }
    assert_eq!(contracts.len(), 7, "{stdout}");

    let (one, two) = (Upstream::start("one"), Upstream::start("two"));
    let port = free_port();
    let embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        format!("static1://{},{}", one.addr, two.addr),
        "--balancer".to_string(),
        "v1-rotate".to_string(),
        "--service".to_string(),
        format!("web;{port}/tcp"),
    ]);
    embassy
        .wait_for_endpoints(
            &format!("tcp-{port}"),
            &[one.addr, two.addr],
            Duration::from_secs(20),
        )
        .expect("the 1.0 discovery plugin delivers its set");
    let served: Vec<String> = (0..4)
        .map(|_| Client::connect(port).expect("served").upstream)
        .collect();
    assert_eq!(
        served,
        ["one", "two", "one", "two"],
        "the 1.0 balancer rotates"
    );
    assert!(embassy.log_lines("ERROR").is_empty(), "{:?}", embassy.log());
}

/// The other direction: plugins built against 1.1 in a host built against 1.0 (`v1-host`,
/// the 1.0 host's loader and calls). abi_stable lets a library carry more members than the
/// host knows; the new sink method falls back to its 1.0 default.
#[test]
fn plugins_built_against_contract_1_1_work_in_a_1_0_host() {
    let a = artifacts();
    let v1_host = |args: &[&str]| {
        let output = std::process::Command::new(a.v1_host())
            .args(args)
            .output()
            .expect("run v1-host");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let round_robin = a.library("embassy-plugin-round-robin");
    let (code, picks, stderr) =
        v1_host(&[&round_robin.display().to_string(), "balancer", "3", "6"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(picks, "0 1 2 0 1 2");

    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("services.json");
    write_services(
        &services,
        &json!({ "web": ["127.0.0.1:7001", "127.0.0.1:7002"] }),
    );
    let file = a.library("embassy-plugin-file");
    let (code, set, stderr) = v1_host(&[
        &file.display().to_string(),
        "discovery",
        &format!("file://{}", services.display()),
        "web",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(set, "127.0.0.1:7001\n127.0.0.1:7002");
}

#[test]
fn a_missing_plugin_dir_is_a_usage_error() {
    let (code, _, stderr) =
        run_embassy(["plugins", "--plugin-dir", "/nonexistent/embassy-plugins"]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("cannot read plugin directory /nonexistent/embassy-plugins"),
        "{stderr}"
    );
}

/// Entries meant as plugins that cannot be one get a warning each, naming them and why, and
/// count as failed files; other files and directories are skipped without a word.
#[test]
fn odd_entries_in_the_plugin_dir_are_reported_one_by_one() {
    use std::os::unix::fs::symlink;
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path();
    std::fs::create_dir(dir.join("y.so")).expect("dir");
    symlink(dir.join("loop.so"), dir.join("loop.so")).expect("loop");
    symlink(dir.join("missing-target"), dir.join("dangling.so")).expect("dangling");
    symlink(dir.join("gone"), dir.join("dangling-without-suffix")).expect("dangling");
    std::fs::create_dir(dir.join("subdir")).expect("dir");
    std::fs::write(dir.join("README.txt"), "notes").expect("write");
    let (code, stdout, stderr) =
        run_embassy(["plugins", "--plugin-dir", &dir.display().to_string()]);
    assert_eq!(code, 1, "odd entries make the listing fail: {stderr}");
    assert_eq!(
        stdout.lines().count(),
        5,
        "the plugins still load: {stdout}"
    );
    let warned = |name: &str, why: &str| {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&format!("/{name}:")))
            .collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        assert!(
            lines[0].contains("WARN") && lines[0].contains(why),
            "{}",
            lines[0]
        );
    };
    warned("y.so", "a directory, not a library, skipped");
    warned("loop.so", "a symlink loop, skipped");
    warned(
        "dangling.so",
        "a dangling symlink (its target does not exist), skipped",
    );
    warned("dangling-without-suffix", "a dangling symlink");
    assert!(
        !stderr.contains("subdir") && !stderr.contains("README"),
        "{stderr}"
    );
}
