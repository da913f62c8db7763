//! The command line: usage errors, `check`, the inside-the-container mode.

use std::time::Duration;

use embassy_tests::*;
use serde_json::json;

#[test]
fn a_usage_error_prints_one_line_and_exits_64() {
    let (code, stdout, stderr) = run_embassy(["--no-such-flag"]);
    assert_eq!(code, 64);
    assert!(stdout.is_empty());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");

    let (code, _, stderr) = run_embassy(["--service", "web;99999/tcp"]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("port \"99999\" is not a number from 1 to 65535"),
        "{stderr}"
    );
}

#[test]
fn check_explains_valid_descriptors_and_names_what_is_wrong() {
    let (code, stdout, _) = run_embassy(["check", "/services/prod/app1/80[prod,app1];80/tcp"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("service:  /services/prod/app1/80 (etcd key prefix)"),
        "{stdout}"
    );
    assert!(stdout.contains("tags:     prod, app1"), "{stdout}");
    assert!(stdout.contains("listens:  port 80/tcp"), "{stdout}");

    let (code, stdout, _) =
        run_embassy(["check", "redis.master[prod];6379/tcp", "web[prod;80/tcp"]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("service:  redis.master (service name)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("invalid: \"web[prod;80/tcp\": tag list \"[prod\" is not closed with ']'"),
        "{stdout}"
    );
}

/// Each leniency the parser used to allow is refused with what is there and what to write.
#[test]
fn check_refuses_lenient_descriptors_naming_the_text() {
    let (code, stdout, _) = run_embassy([
        "check",
        "bad;;x",
        "web; 80/tcp",
        "web;080",
        "web;80/TCP",
        "web[a,a];80/tcp",
        "web;80/tcp;udp_idle=30",
    ]);
    assert_eq!(code, 1, "{stdout}");
    for expected in [
        "invalid: \"bad;;x\": port is missing in \"bad;;x\": the part after the service is empty",
        "invalid: \"web; 80/tcp\": port \" 80\" has whitespace: write 80",
        "invalid: \"web;080\": port \"080\" has a leading zero: write 80",
        "invalid: \"web;80/TCP\": protocol \"TCP\" must be lowercase: write 'tcp'",
        "invalid: \"web[a,a];80/tcp\": tag \"a\" is given twice in \"[a,a]\"",
        "invalid: \"web;80/tcp;udp_idle=30\": option \"udp_idle\" applies to udp services only, and this one is tcp",
    ] {
        assert!(stdout.contains(expected), "{expected}\n---\n{stdout}");
    }
    assert!(!stdout.contains("ok:"), "{stdout}");
}

/// The lines of `stderr` at ERROR level.
fn errors(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("ERROR")).collect()
}

#[test]
fn nothing_to_serve_or_no_discovery_are_usage_errors() {
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path().display().to_string();
    let (code, _, stderr) = run_embassy(["--plugin-dir", &dir, "--prefix", "EMBASSY_TEST_NONE_"]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(errors(&stderr)[0].contains("nothing to serve"), "{stderr}");
    let (code, _, stderr) = run_embassy(["--plugin-dir", &dir, "--service", "web;8080/tcp"]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        errors(&stderr)[0].contains("no discovery backend: give --discovery URI"),
        "{stderr}"
    );
    // A discovery backend no plugin serves is no usage error: another directory might.
    let (code, _, stderr) = run_embassy([
        "--plugin-dir",
        &dir,
        "--service",
        "web;8080/tcp",
        "--discovery",
        "zk://127.0.0.1:2181",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "no discovery plugin serves 'zk://' (loaded: dns (dns), etcd (etcd, etcds, etcd2, etcd2s), file (file))"
        ),
        "{stderr}"
    );
}

#[test]
fn a_missing_plugin_dir_is_a_usage_error_naming_the_cause_once() {
    let dir = "/nonexistent/embassy-plugins";
    for args in [
        &[
            "--plugin-dir",
            dir,
            "--service",
            "web;8080/tcp",
            "--discovery",
            "file:///x.json",
        ][..],
        &["plugins", "--plugin-dir", dir][..],
    ] {
        let (code, _, stderr) = run_embassy(args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("cannot read plugin directory /nonexistent/embassy-plugins: No such file or directory (os error 2); set --plugin-dir"),
            "{stderr}"
        );
        assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    }
}

#[test]
fn check_names_an_unknown_balancer_when_the_plugins_are_at_hand() {
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path().display().to_string();
    let (code, stdout, _) = run_embassy([
        "check",
        "--plugin-dir",
        &dir,
        "web;80/tcp;balancer=least-conn",
        "api;81/tcp;balancer=nonexistent",
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("ok: web;80/tcp;balancer=least-conn"),
        "{stdout}"
    );
    assert!(
        stdout.contains("invalid: \"api;81/tcp;balancer=nonexistent\": no balancer plugin named 'nonexistent' (loaded: least-conn, round-robin)"),
        "{stdout}"
    );
    // Without the plugins, the syntax alone is checked, and the output says so.
    let (code, stdout, _) = run_embassy([
        "check",
        "--plugin-dir",
        "/nonexistent/embassy-plugins",
        "api;81/tcp;balancer=nonexistent",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("note: cannot read plugin directory /nonexistent/embassy-plugins (No such file or directory (os error 2)): syntax checked only, balancer names not checked"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: api;81/tcp;balancer=nonexistent"),
        "{stdout}"
    );
}

#[test]
fn backend_variables_in_embassys_own_environment_are_served() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dir = tempfile::tempdir().expect("temp");
    let services = dir.path().join("services.json");
    write_services(
        &services,
        &json!({ "app1": [a.addr.to_string()], "app2": [b.addr.to_string()] }),
    );
    let plugins = standard_plugin_dir(&[]);
    let (port1, port2) = (free_port(), free_port());
    let mut command = Embassy::command(
        &artifacts().embassy(),
        ["--plugin-dir", &plugins.path().display().to_string()],
    );
    command
        .env("DISCOVERY", format!("file://{}", services.display()))
        .env("BACKEND_APP1", format!("app1;{port1}/tcp"))
        .env(
            "BACKEND_APP2",
            format!("app2;{port2}/tcp;balancer=least-conn"),
        );
    let embassy = Embassy::spawn(&mut command);
    let listed = embassy
        .wait_for_services(2, Duration::from_secs(20))
        .expect("both listeners");
    let balancers: Vec<(&str, &str)> = listed
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or("?"),
                s["balancer"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert!(
        balancers.contains(&(format!("tcp-{port2}").as_str(), "least-conn")),
        "{balancers:?}"
    );
    assert_eq!(Client::connect(port1).expect("app1").upstream, "a");
    assert_eq!(Client::connect(port2).expect("app2").upstream, "b");
}

/// Runs embassy on the file plugin with `args` and `vars` in its environment, to completion.
fn run_with(vars: &[(&str, String)], args: &[String]) -> (i32, String) {
    let plugins = standard_plugin_dir(&[]);
    let dir = tempfile::tempdir().expect("temp");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": ["127.0.0.1:1"] }));
    let mut command = std::process::Command::new(artifacts().embassy());
    command.env("EMBASSY_ADMIN", "off"); // the default socket is the machine's, not this test's
    command
        .args(["--plugin-dir", &plugins.path().display().to_string()])
        .args(["--discovery", &format!("file://{}", services.display())])
        .args(args)
        .env_remove("DISCOVERY")
        .env_remove("EMBASSY_PLUGIN_DIR");
    for (name, value) in vars {
        command.env(name, value);
    }
    let output = command.output().expect("run embassy");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_variable_or_a_port_clash_in_the_static_configuration_is_a_usage_error() {
    let port = free_port();
    let (code, stderr) = run_with(
        &[("BACKEND_BROKEN", "app3;notaport/tcp".to_string())],
        &service_arg(format!("web;{port}/tcp")),
    );
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(r#"BACKEND_BROKEN="app3;notaport/tcp" is no service descriptor: port "notaport" is not a number"#),
        "{stderr}"
    );

    let (code, stderr) = run_with(
        &[("BACKEND_API", format!("api;{port}/tcp"))],
        &service_arg(format!("web;{port}/tcp")),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains(&format!("port {port}/tcp is asked for by 'web;{port}/tcp' (--service) and by 'api;{port}/tcp' (BACKEND_API)")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("listening"),
        "nothing was served: {stderr}"
    );
}

#[test]
fn a_static_service_that_cannot_be_served_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let (port, other) = (free_port(), free_port());
    let mut args: Vec<String> = service_arg(format!("web;{taken_port}/tcp")).into();
    args.extend(service_arg(format!("web;{port}/tcp")));
    args.extend(service_arg(format!("api;{other}/tcp;balancer=nonexistent")));
    let (code, stderr) = run_with(&[], &args);
    assert_eq!(code, 1, "{stderr}");
    let lines = errors(&stderr);
    assert_eq!(lines.len(), 3, "two services, then the verdict: {stderr}");
    assert!(
        lines[0].contains(&format!("port 127.0.0.1:{taken_port} is already in use")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(&format!("service=api;{other}/tcp;balancer=nonexistent"))
            && lines[1].contains(
                "no balancer plugin named 'nonexistent' (loaded: least-conn, round-robin)"
            ),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(
            "2 of the 3 services given with --service or BACKEND_* variables cannot be served"
        ),
        "{}",
        lines[2]
    );
}
