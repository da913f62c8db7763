//! A container's environment (set by whoever starts the container): the first line is the
//! prefix, each further line one `NAME=value` entry. Total, and what is read is exactly the
//! prefixed variables, sorted, each parsed as a descriptor.
#![no_main]

use embassy_core::ServiceDescriptor;
use embassy_host::docker::requests_of;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut lines = text.split('\n');
    let prefix = lines.next().unwrap_or_default();
    let env: Vec<String> = lines.map(str::to_string).collect();
    let requests = requests_of(&env, prefix);
    assert!(requests.windows(2).all(|w| w[0].variable <= w[1].variable));
    for request in &requests {
        assert!(!prefix.is_empty() && request.variable.starts_with(prefix));
        assert!(env.contains(&format!("{}={}", request.variable, request.value)));
        assert_eq!(
            request.descriptor,
            request.value.parse::<ServiceDescriptor>()
        );
    }
    let expected = env
        .iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(name, _)| !prefix.is_empty() && name.starts_with(prefix))
        .count();
    assert_eq!(requests.len(), expected);
});
