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

#[test]
fn nothing_to_serve_or_no_discovery_are_clear_errors() {
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path().display().to_string();
    let (code, _, stderr) = run_embassy(["--plugin-dir", &dir, "--prefix", "EMBASSY_TEST_NONE_"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("nothing to serve"), "{stderr}");
    let (code, _, stderr) = run_embassy(["--plugin-dir", &dir, "--service", "web;8080/tcp"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no discovery backend"), "{stderr}");
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
            "no discovery plugin serves 'zk://' (loaded: etcd (etcd, etcds), file (file))"
        ),
        "{stderr}"
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
    let child = std::process::Command::new(artifacts().embassy())
        .args(["--plugin-dir", &plugins.path().display().to_string()])
        .env("DISCOVERY", format!("file://{}", services.display()))
        .env("BACKEND_APP1", format!("app1;{port1}/tcp"))
        .env(
            "BACKEND_APP2",
            format!("app2;{port2}/tcp;balancer=least-conn"),
        )
        .env("BACKEND_BROKEN", "app3;notaport/tcp")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut embassy = Embassy::adopt(child);
    embassy
        .wait_for_log(&format!("127.0.0.1:{port2}"), Duration::from_secs(20))
        .expect("second listener");
    let broken = embassy.log_lines("BACKEND_BROKEN");
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert!(
        broken[0].contains("port \"notaport\" is not a number"),
        "{}",
        broken[0]
    );
    assert_eq!(Client::connect(port1).expect("app1").upstream, "a");
    assert_eq!(Client::connect(port2).expect("app2").upstream, "b");
}

#[test]
fn a_port_already_taken_is_named_and_the_other_services_still_run() {
    let a = Upstream::start("a");
    let plugins = standard_plugin_dir(&[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{taken_port}/tcp")).into();
    args.extend(service_arg(format!("web;{port}/tcp")));
    let mut proxy = FileBacked::start(
        &json!({ "web": [a.addr.to_string()] }),
        plugins.path(),
        &args,
        "cannot serve",
    );
    let embassy = &mut proxy.embassy;
    let line = embassy.log_lines("cannot serve").remove(0);
    assert!(
        line.contains(&format!("port 127.0.0.1:{taken_port} is already in use")),
        "{line}"
    );
    embassy
        .wait_for_log("listening", Duration::from_secs(20))
        .expect("other service listens");
    assert_eq!(Client::connect(port).expect("served").upstream, "a");
}
