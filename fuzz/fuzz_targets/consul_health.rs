//! Consul's `/v1/health/service` answer and its `X-Consul-Index` header (what an agent, or
//! whatever answers on its address, sends): total, errors bounded, endpoints sorted and unique.
#![no_main]

use embassy_plugin_api::{Protocol, WatchRequest};
use embassy_plugin_consul::health::{next_index, parse_answer, parse_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let request = WatchRequest::new("web", &["prod"], protocol);
        match parse_answer(data, &request) {
            Ok(answer) => {
                let addresses: Vec<_> = answer.endpoints.iter().map(|e| &e.address).collect();
                assert!(addresses.windows(2).all(|w| w[0] < w[1]), "{addresses:?}");
                assert!(answer.endpoints.iter().all(|e| e.weight > 0));
                assert!(answer
                    .excluded
                    .iter()
                    .all(|x| x.instance.len() < 1024 && x.detail.len() < 1024));
            }
            Err(error) => assert!(error.to_string().len() < 1024, "{error}"),
        }
    }
    if let Ok(index) = parse_index(Some(data)) {
        assert_eq!(next_index(index / 2, index), index);
        if let Some(above) = index.checked_add(1) {
            assert_eq!(
                next_index(above, index),
                0,
                "an index that went back resets"
            );
        }
    }
});
