//! The static configuration: service requests from `--service` and from Embassy's own
//! variables (`BACKEND_*`, the inside-the-container mode).
//!
//! Unlike a container's requests, which come and go and fail one by one, these are what the
//! operator wrote for this process: an invalid one or two that clash on a port make the start
//! fail, naming each, instead of leaving a process that runs without part of its
//! configuration.

use std::collections::HashMap;

use embassy_core::ServiceDescriptor;
use embassy_plugin_api::Protocol;

use crate::{cli::RunArgs, run::UsageError};

/// A service request and where it came from, for error messages.
#[derive(Debug)]
pub struct Request {
    pub descriptor: ServiceDescriptor,
    pub origin: String,
}

/// The usage checks of `embassy run`, made before any plugin is loaded: the static requests
/// (see [`static_requests`]), something to serve, a discovery backend.
pub fn checked_run_args(
    args: &RunArgs,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<Request>, UsageError> {
    let requests = static_requests(args, vars)?;
    if requests.is_empty() && args.docker.is_none() {
        return Err(UsageError(format!(
            "nothing to serve: give --service DESCRIPTOR, set {}NAME=DESCRIPTOR variables or --docker",
            args.prefix
        )));
    }
    if args.discovery.is_none() {
        return Err(UsageError(
            "no discovery backend: give --discovery URI (or DISCOVERY=URI), e.g. file:///etc/embassy/services.json".into(),
        ));
    }
    Ok(requests)
}

/// Descriptors from `--service` and from the variables with `--prefix` in `vars`, checked:
/// every variable must hold a valid descriptor and no two different descriptors may ask for
/// one port. The error lists every problem, on one line.
pub fn static_requests(
    args: &RunArgs,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<Request>, UsageError> {
    let mut requests: Vec<Request> = args
        .services
        .iter()
        .map(|descriptor| Request {
            descriptor: descriptor.clone(),
            origin: "--service".to_string(),
        })
        .collect();
    let mut problems = Vec::new();
    if !args.prefix.is_empty() {
        let mut vars: Vec<(String, String)> = vars
            .filter(|(name, _)| name.starts_with(&args.prefix))
            .collect();
        vars.sort();
        for (name, value) in vars {
            match value.parse::<ServiceDescriptor>() {
                Ok(descriptor) => requests.push(Request {
                    descriptor,
                    origin: name,
                }),
                Err(error) => problems.push(format!(
                    "{name}={value:?} is no service descriptor: {error}"
                )),
            }
        }
    }
    problems.extend(conflicts(&requests));
    if problems.is_empty() {
        Ok(requests)
    } else {
        Err(UsageError(problems.join("; ")))
    }
}

/// Every request that asks for a port already asked for by a different descriptor (all static
/// listeners bind the one `--bind` address). The same descriptor twice is one listener.
pub fn conflicts(requests: &[Request]) -> Vec<String> {
    let mut first: HashMap<(u16, Protocol), &Request> = HashMap::new();
    let mut found = Vec::new();
    for request in requests {
        let key = (request.descriptor.port, request.descriptor.protocol);
        match first.get(&key) {
            Some(holder) if holder.descriptor != request.descriptor => found.push(format!(
                "port {}/{} is asked for by '{}' ({}) and by '{}' ({})",
                key.0, key.1, holder.descriptor, holder.origin, request.descriptor, request.origin
            )),
            Some(_) => {}
            None => {
                first.insert(key, request);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    /// `static_requests` for `--service` arguments and variables: the origins, or the error.
    fn check(services: &[&str], vars: &[(&str, &str)], expected: Result<&[&str], &str>) {
        let mut argv = vec!["embassy"];
        for service in services {
            argv.extend(["--service", service]);
        }
        let args = Cli::try_parse_from(argv).expect("arguments").run;
        let owned = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let got = static_requests(&args, owned).map(|requests| {
            requests
                .iter()
                .map(|r| format!("{} ({})", r.descriptor, r.origin))
                .collect::<Vec<_>>()
        });
        match expected {
            Ok(wanted) => assert_eq!(
                got.as_deref().map_err(|e| e.to_string()),
                Ok(wanted
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .as_slice()),
                "{services:?} {vars:?}"
            ),
            Err(wanted) => assert_eq!(
                got.map_err(|e| e.to_string()),
                Err(wanted.to_string()),
                "{services:?} {vars:?}"
            ),
        }
    }

    #[test]
    fn static_requests_are_all_valid_and_never_clash() {
        check(
            &["web;8080/tcp"],
            &[("BACKEND_DNS", "dns;53/udp"), ("OTHER", "x;1/tcp")],
            Ok(&["web;8080/tcp (--service)", "dns;53/udp (BACKEND_DNS)"]),
        );
        // One port, two protocols: two listeners.
        check(
            &["web;53/tcp"],
            &[("BACKEND_DNS", "dns;53/udp")],
            Ok(&["web;53/tcp (--service)", "dns;53/udp (BACKEND_DNS)"]),
        );
        // The same descriptor twice shares its listener.
        check(
            &["web;8080/tcp"],
            &[("BACKEND_WEB", "web;8080/tcp")],
            Ok(&["web;8080/tcp (--service)", "web;8080/tcp (BACKEND_WEB)"]),
        );
        check(
            &["web;8080/tcp", "api;8080/tcp"],
            &[],
            Err("port 8080/tcp is asked for by 'web;8080/tcp' (--service) and by 'api;8080/tcp' (--service)"),
        );
        check(
            &["web;8080/tcp"],
            &[("BACKEND_A", "web[prod];8080/tcp"), ("BACKEND_B", "app;notaport/tcp")],
            Err("BACKEND_B=\"app;notaport/tcp\" is no service descriptor: port \"notaport\" is not a number from 1 to 65535; \
                 port 8080/tcp is asked for by 'web;8080/tcp' (--service) and by 'web[prod];8080/tcp' (BACKEND_A)"),
        );
    }
}
