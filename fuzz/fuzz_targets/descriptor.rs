//! Service descriptors (command line, `BACKEND_*` variables): total, and an accepted one prints
//! a canonical form that parses to an equal value and prints the same again.
#![no_main]

use embassy_core::{descriptor::parse_duration, ServiceDescriptor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(descriptor) = text.parse::<ServiceDescriptor>() {
        let canonical = descriptor.to_string();
        let again: ServiceDescriptor = canonical.parse().expect("the canonical form parses");
        assert_eq!(again, descriptor, "{text:?}");
        assert_eq!(again.to_string(), canonical);
    }
    if let Some(duration) = parse_duration(text) {
        assert!(!duration.is_zero());
    }
});
