//! etcd values (any bytes a registrator, or anyone with write access, put under a prefix):
//! total, errors bounded, and an instance's address reads back to itself.
#![no_main]

use embassy_plugin_etcd::parse_instance;
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 3] = [
    "/services/web/80/49177/6b06da408f97",
    "/services/dns/host:dns1:53:udp",
    "/skydns/local/web/x",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, value)) = data.split_first() else {
        return;
    };
    let key = KEYS[usize::from(pick) % KEYS.len()];
    match parse_instance(key, value) {
        Ok(instance) => {
            let again = parse_instance(key, instance.address.as_bytes())
                .unwrap_or_else(|e| panic!("{:?} does not read back: {e}", instance.address));
            assert_eq!(again.address, instance.address);
            assert!(instance.weight > 0);
        }
        Err(error) => assert!(error.to_string().len() < 1024, "{error}"),
    }
});
