//! Docker integration against a real engine: network-container mode (Embassy in a container,
//! apps sharing its namespace) and host mode (Embassy on the host, binding inside each app's
//! namespace). Apps reach their services at 127.0.0.1:8080 from inside their containers.

use std::time::Duration;

use embassy_tests::{docker::*, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Two upstreams on loopback and a services file naming them `svc-a` and `svc-b`.
struct TwoServices {
    _upstreams: (Upstream, Upstream),
    dir: tempfile::TempDir,
}

impl TwoServices {
    fn start() -> TwoServices {
        let (a, b) = (Upstream::start("svc-a"), Upstream::start("svc-b"));
        let dir = tempfile::tempdir().expect("temp dir");
        write_services(
            &dir.path().join("services.json"),
            &json!({ "svc-a": [a.addr.to_string()], "svc-b": [b.addr.to_string()] }),
        );
        TwoServices {
            _upstreams: (a, b),
            dir,
        }
    }

    /// Embassy on the host, in host mode, following the engine at `uri`.
    fn host_mode_embassy(&self, uri: &str, extra: &[&str]) -> (Embassy, tempfile::TempDir) {
        let plugins = standard_plugin_dir(&[]);
        let mut args = vec![
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            format!("file://{}", self.dir.path().join("services.json").display()),
            "--discovery-opt".to_string(),
            "poll_interval=100ms".to_string(),
            "--docker".to_string(),
            uri.to_string(),
            "--mode".to_string(),
            "host".to_string(),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let mut embassy = Embassy::start(args);
        embassy.wait_for_log("host mode", WAIT).expect("host mode");
        (embassy, plugins)
    }
}

/// Polls `container.greeting(port)` until it is `name`.
fn reaches(container: &Container, port: u16, name: &str) -> bool {
    eventually(WAIT, || container.greeting(port).as_deref() == Some(name))
}

/// Embassy in network-container mode with the service `web` (one upstream, `web-a`, on the
/// bridge's gateway, where the containers reach it) and a busybox image for apps.
struct NetworkContainer {
    web: Upstream,
    busybox: String,
    embassy: Container,
    admin: tempfile::TempDir,
    _config: tempfile::TempDir,
}

impl NetworkContainer {
    fn start(engine: &Engine) -> NetworkContainer {
        let gateway = bridge_gateway().expect("docker bridge");
        let web = Upstream::start_on("web-a", gateway.into());
        let config = tempfile::tempdir().expect("temp dir");
        write_services(
            &config.path().join("services.json"),
            &json!({ "web": [web.addr.to_string()] }),
        );
        let admin = tempfile::tempdir().expect("temp dir");
        NetworkContainer {
            web,
            busybox: engine.busybox_image().expect("busybox image"),
            embassy: engine
                .embassy_network_container(config.path(), admin.path())
                .expect("embassy container"),
            admin,
            _config: config,
        }
    }
}

#[test]
fn network_container_mode_serves_apps_joined_to_embassy_and_releases_with_the_last() {
    let engine = engine();
    let setup = NetworkContainer::start(engine);
    let (web, busybox, embassy) = (&setup.web, &setup.busybox, &setup.embassy);
    let admin_dir = &setup.admin;
    // Joined by name, then by id: both share one listener.
    let by_name = format!("container:{}", embassy.name);
    let first = engine
        .run(
            "app",
            &[
                "--net",
                &by_name,
                "-e",
                "BACKEND_WEB=web;8080/tcp",
                busybox,
                "sleep",
                "600",
            ],
        )
        .expect("first app");
    assert!(
        reaches(&first, 8080, "web-a"),
        "first app never reached web-a:\n{}",
        embassy.logs()
    );
    let by_id = format!("container:{}", embassy.id);
    let second = engine
        .run(
            "app",
            &[
                "--net",
                &by_id,
                "-e",
                "BACKEND_WEB=web;8080/tcp",
                busybox,
                "sleep",
                "600",
            ],
        )
        .expect("second app");
    embassy
        .wait_for_log(&["container served", &second.name, "services=1"], WAIT)
        .expect("second app served");
    assert!(reaches(&second, 8080, "web-a"));
    assert_eq!(
        embassy.logs().matches("listening").count(),
        1,
        "one shared listener"
    );
    // Both apps are its consumers: in the API by name and id, and on its metrics by name.
    let socket = admin_dir.path().join("admin.sock");
    let (status, body) = http_get_unix(&socket, "/v1/services/tcp-8080").expect("admin API");
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let mut consumers: Vec<(String, String)> = view["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .map(|c| (c["name"].to_string(), c["id"].to_string()))
        .collect();
    consumers.sort();
    let mut expected = vec![
        (format!("{:?}", first.name), format!("{:?}", first.id)),
        (format!("{:?}", second.name), format!("{:?}", second.id)),
    ];
    expected.sort();
    assert_eq!(consumers, expected);
    let (_, metrics) = http_get_unix(&socket, "/metrics").expect("metrics");
    let mut names = [first.name.as_str(), second.name.as_str()];
    names.sort();
    let consumer = names.join(",");
    assert!(
        embassy_tests::prometheus::sample(
            &metrics,
            "embassy_connections_accepted_total",
            &[("service", "tcp-8080"), ("consumer", &consumer)]
        )
        .is_some_and(|accepted| accepted >= 2.0),
        "consumer={consumer} labels the listener's series:\n{metrics}"
    );

    // The first leaving does not close the shared listener...
    let first_name = first.name.clone();
    first.remove().expect("remove first app");
    embassy
        .wait_for_log(&["container gone", &first_name], WAIT)
        .expect("first app released");
    assert_eq!(second.greeting(8080).as_deref(), Some("web-a"));
    assert!(!embassy.logs().contains("listener released"));

    // ...a stopped app keeps its listener for its next start (served from create to removal)...
    second.stop().expect("stop second app");
    assert_eq!(embassy.greeting(8080).as_deref(), Some("web-a"));
    // ...and the last one's removal closes it: nothing listens on 8080 in the namespace.
    second.remove().expect("remove second app");
    embassy
        .wait_for_log(&["listener released", "web;8080/tcp"], WAIT)
        .expect("listener released");
    assert!(
        eventually(WAIT, || embassy.talk(8080).is_err()),
        "port 8080 still answers after the last app was removed"
    );
    assert!(web.accepted() >= 4);
}

#[test]
fn host_mode_serves_each_container_in_its_own_namespace() {
    let engine = engine();
    // A prefix of this test's own: other tests' containers on this engine are not ours.
    let prefix = format!("EMBASSY{}_", std::process::id());
    let services = TwoServices::start();
    let busybox = engine.busybox_image().expect("busybox image");
    let good = format!("{prefix}Y=svc-a;8080/tcp");
    let bad = format!("{prefix}X=svc-a;80x/tcp");
    let clash = format!("{prefix}Z=svc-b;8080/tcp");
    // Running before Embassy starts; beside a good variable, a malformed one and one asking
    // for the good one's port for another service.
    let early = engine
        .run(
            "host-early",
            &[
                "--net", "none", "-e", &good, "-e", &bad, "-e", &clash, &busybox, "sleep", "600",
            ],
        )
        .expect("early app");
    let plain = engine
        .run("host-plain", &["--net", "none", &busybox, "sleep", "600"])
        .expect("plain container");
    let (embassy, _plugins) = services.host_mode_embassy(&engine.host, &["--prefix", &prefix]);

    // Started afterwards, same port, another service.
    let late_var = format!("{prefix}WEB=svc-b;8080/tcp");
    let late = engine
        .run(
            "host-late",
            &["--net", "none", "-e", &late_var, &busybox, "sleep", "600"],
        )
        .expect("late app");
    assert!(
        reaches(&early, 8080, "svc-a"),
        "early app never reached svc-a"
    );
    assert!(
        reaches(&late, 8080, "svc-b"),
        "late app never reached svc-b"
    );
    assert_eq!(early.greeting(8080).as_deref(), Some("svc-a"));

    // A container on the host's network is served in the host's namespace, where Embassy is.
    let port = free_port();
    let on_host_var = format!("{prefix}WEB=svc-b;{port}/tcp");
    let _on_host = engine
        .run(
            "host-net",
            &[
                "--net",
                "host",
                "-e",
                &on_host_var,
                &busybox,
                "sleep",
                "600",
            ],
        )
        .expect("host-network app");
    assert!(
        eventually(WAIT, || Client::connect(port)
            .is_ok_and(|c| c.upstream == "svc-b")),
        "host-network app not served on the host's loopback"
    );

    let reported = embassy.log_lines(&format!("{prefix}X"));
    assert!(
        reported
            .iter()
            .any(|l| l.contains(&early.name) && l.contains("invalid service descriptor")),
        "malformed variable not reported with its container: {reported:?}"
    );
    let clashed = embassy.log_lines(&format!("{prefix}Z"));
    assert!(
        clashed
            .iter()
            .any(|l| l.contains(&early.name) && l.contains("already serving svc-a;8080/tcp")),
        "port clash not reported with its container: {clashed:?}"
    );
    assert!(
        embassy.log_lines(&plain.name).is_empty(),
        "a container without requests was touched"
    );

    // A container that dies has its listener closed.
    late.stop().expect("stop late app");
    assert!(
        eventually(WAIT, || embassy
            .log_lines("listener released")
            .iter()
            .any(|l| l.contains(&late.name))),
        "late app's listener not released"
    );
    assert_eq!(early.greeting(8080).as_deref(), Some("svc-a"));
}

#[test]
fn keeps_serving_through_an_engine_outage_and_catches_up_after() {
    let mut private = PrivateEngine::start().expect("private dockerd");
    let engine = private.admin.clone();
    let busybox = engine.busybox_image().expect("busybox image");
    let services = TwoServices::start();
    let app = |name: &str, service: &str| {
        let var = format!("BACKEND_WEB={service};8080/tcp");
        engine
            .run(
                name,
                &["--net", "none", "-e", &var, &busybox, "sleep", "600"],
            )
            .expect("app container")
    };
    let stays = app("stays", "svc-a");
    let leaves = app("leaves", "svc-b");
    let (mut embassy, _plugins) = services.host_mode_embassy(&private.public_uri(), &[]);
    assert!(reaches(&stays, 8080, "svc-a"));
    assert!(reaches(&leaves, 8080, "svc-b"));

    // The engine goes away: what is served stays served.
    private.stop_daemon().expect("stop dockerd");
    embassy
        .wait_for_log("docker engine lost", WAIT)
        .expect("outage noticed");
    let pid = stays.pid();
    assert!(pid.is_err(), "the engine still answers");
    let stays_pid = {
        private
            .start_daemon(false)
            .expect("dockerd, hidden from embassy");
        stays.pid().expect("pid")
    };
    assert_eq!(
        greeting_in_netns_of(stays_pid, 8080).ok().as_deref(),
        Some("svc-a"),
        "not served during the outage"
    );

    // While Embassy cannot see the engine, one container starts and one stops.
    let arrives = app("arrives", "svc-b");
    leaves.stop().expect("stop leaves");
    private.stop_daemon().expect("stop hidden dockerd");
    private.start_daemon(true).expect("dockerd, visible again");

    // The relisting catches up: the newcomer is served, the leaver released, nothing doubled.
    assert!(
        reaches(&arrives, 8080, "svc-b"),
        "container started meanwhile not served"
    );
    assert!(
        eventually(WAIT, || embassy
            .log_lines("container gone")
            .iter()
            .any(|l| l.contains(&leaves.name))),
        "container stopped meanwhile not released"
    );
    assert!(reaches(&stays, 8080, "svc-a"));
    let served_twice = embassy
        .log_lines("listening")
        .iter()
        .filter(|l| l.contains(&stays.name))
        .count();
    assert_eq!(
        served_twice, 1,
        "the container that stayed was served again"
    );
    embassy
        .wait_for_log("docker engine reachable again", WAIT)
        .expect("recovery logged");
}

#[test]
fn an_unknown_own_container_is_a_clear_startup_error() {
    let engine = engine();
    let services = TwoServices::start();
    let (code, _, stderr) = run_embassy([
        "--plugin-dir".to_string(),
        standard_plugin_dir(&[]).path().display().to_string(),
        "--discovery".to_string(),
        format!(
            "file://{}",
            services.dir.path().join("services.json").display()
        ),
        "--docker".to_string(),
        engine.host.clone(),
        "--container-id".to_string(),
        "no-such-embassy".to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("container \"no-such-embassy\" (given by --container-id) not found"),
        "{stderr}"
    );
}

#[test]
fn a_second_owner_with_other_tunables_joins_and_they_apply_in_place_when_the_first_leaves() {
    let engine = engine();
    let setup = NetworkContainer::start(engine);
    let (busybox, embassy) = (&setup.busybox, &setup.embassy);
    let admin_dir = &setup.admin;
    let socket = admin_dir.path().join("admin.sock");
    let view = || -> serde_json::Value {
        let (_, body) = http_get_unix(&socket, "/v1/services/tcp-8080").expect("admin API");
        serde_json::from_str(&body).expect("JSON")
    };
    let net = format!("container:{}", embassy.name);
    let app = |variable: &str| {
        engine
            .run(
                "app",
                &["--net", &net, "-e", variable, busybox, "sleep", "600"],
            )
            .expect("app")
    };
    let first = app("BACKEND_WEB=web;8080/tcp");
    assert!(reaches(&first, 8080, "web-a"), "{}", embassy.logs());
    // Another balancer and timeout for the same service: it joins the listener (no "port
    // held"), with one warning naming both, and the first owner's tunables stay.
    let second = app("BACKEND_WEB=web;8080/tcp;balancer=least-conn;idle_timeout=2s");
    embassy
        .wait_for_log(&["other tunables", &second.name, &first.name], WAIT)
        .expect("one warning names both containers");
    assert!(reaches(&second, 8080, "web-a"));
    assert_eq!(view()["balancer"], "round-robin");
    assert_eq!(view()["descriptor"], "web;8080/tcp");
    assert_eq!(view()["owners"].as_array().map(Vec::len), Some(2));

    // The first leaves: the second's tunables are applied in place, on the same listener.
    first.remove().expect("remove first app");
    assert!(
        eventually(WAIT, || view()["balancer"] == "least-conn"),
        "{}",
        embassy.logs()
    );
    let in_force = view()["descriptor"].as_str().unwrap_or("").to_string();
    assert!(
        in_force.contains("balancer=least-conn") && in_force.contains("idle_timeout=2s"),
        "{in_force}"
    );
    assert_eq!(second.greeting(8080).as_deref(), Some("web-a"));
    assert_eq!(
        embassy.logs().matches("listening").count(),
        1,
        "the same listener"
    );

    // The second (which asked with other tunables) is an owner like any: its leaving
    // releases the listener.
    second.remove().expect("remove second app");
    embassy
        .wait_for_log(&["listener released", "web;8080/tcp"], WAIT)
        .expect("listener released");
}

#[test]
fn labels_declare_services_and_an_app_connecting_first_thing_is_never_refused() {
    let engine = engine();
    let setup = NetworkContainer::start(engine);
    let (busybox, embassy) = (&setup.busybox, &setup.embassy);
    let socket = setup.admin.path().join("admin.sock");
    let net = format!("container:{}", embassy.name);
    // Declared by a label only: served, and the label is not in the app's environment.
    for round in 0..20 {
        let app = engine
            .run(
                "first-connect",
                &[
                    "--net",
                    &net,
                    "--label",
                    "embassy.backend.web=web;8080/tcp",
                    busybox,
                    "sh",
                    "-c",
                    FIRST_CONNECT,
                ],
            )
            .expect("app");
        app.wait_exit().expect("docker wait for the app");
        assert_eq!(
            app.first_connects(),
            ["first-connect:ok"],
            "round {round}: the app's first connect\n{}",
            embassy.logs()
        );
        if round == 0 {
            let (_, body) = http_get_unix(&socket, "/v1/services/tcp-8080").expect("admin API");
            let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let owners = view["owners"].to_string();
            assert!(
                owners.contains("embassy.backend.web"),
                "owner by its label: {owners}"
            );
            let env = engine
                .docker(["inspect", "--format", "{{json .Config.Env}}", &app.id])
                .expect("inspect");
            assert!(!env.contains("embassy.backend"), "{env}");
        }
        // Restarted (a stopped container keeps its listener): the first connect of the new
        // run succeeds too.
        if round % 5 == 0 {
            engine.docker(["restart", &app.id]).expect("docker restart");
            app.wait_exit().expect("docker wait for the app");
            assert_eq!(
                app.first_connects(),
                ["first-connect:ok", "first-connect:ok"],
                "round {round}: after docker restart\n{}",
                embassy.logs()
            );
        }
        // Removed: its listener goes, so the next round's create binds it anew.
        app.remove().expect("remove app");
        embassy
            .wait_for_log(&["listener released", "web;8080/tcp"], WAIT)
            .expect("listener released");
        assert!(eventually(WAIT, || embassy.talk(8080).is_err()));
    }

    // A label and a variable of one name: one error naming both, neither served.
    let clash = engine
        .run(
            "clash",
            &[
                "--net",
                &net,
                "--label",
                "embassy.backend.web=web;8080/tcp",
                "-e",
                "BACKEND_WEB=web;8080/tcp",
                busybox,
                "sleep",
                "600",
            ],
        )
        .expect("clash app");
    let line = embassy
        .wait_for_log(&[&clash.name, "both declare service"], WAIT)
        .expect("the clash is reported");
    assert!(
        line.contains("label embassy.backend.web") && line.contains("variable BACKEND_WEB"),
        "{line}"
    );
    embassy
        .wait_for_log(&["container served", &clash.name, "services=0"], WAIT)
        .expect("clash app recorded, nothing served");
    assert!(
        clash.talk(8080).is_err(),
        "a clashing declaration was served"
    );
    drop(clash);

    // A label and a variable of different names: the label is served at create, the variable
    // joins when the inspect brings it, and both are the container's.
    let both = engine
        .run(
            "both",
            &[
                "--net",
                &net,
                "--label",
                "embassy.backend.web=web;8080/tcp",
                "-e",
                "BACKEND_ALSO=web;8081/tcp",
                busybox,
                "sleep",
                "600",
            ],
        )
        .expect("app declaring both ways");
    assert!(reaches(&both, 8080, "web-a"), "{}", embassy.logs());
    assert!(reaches(&both, 8081, "web-a"), "{}", embassy.logs());
    let (_, body) = http_get_unix(&socket, "/v1/services/tcp-8081").expect("admin API");
    assert!(body.contains("BACKEND_ALSO"), "{body}");
}
