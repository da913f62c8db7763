//! The file plugin's services file (JSON an operator edits by hand): total, errors bounded,
//! and every endpoint served is `host:port`.
#![no_main]

use embassy_plugin_api::{Protocol, WatchRequest};
use embassy_plugin_file::parse_services;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_services(data) {
        Ok(file) => {
            for service in file.names() {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    let request = WatchRequest::new(service, &[] as &[&str], protocol);
                    for endpoint in file.endpoints_for(&request) {
                        let (host, port) = endpoint
                            .address
                            .rsplit_once(':')
                            .expect("an endpoint has a port");
                        assert!(!host.is_empty());
                        assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
                        assert!(endpoint.weight > 0);
                    }
                }
            }
        }
        Err(error) => assert!(error.len() < 2048, "{error}"),
    }
});
