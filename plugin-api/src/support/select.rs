//! What a watch keeps of the instances a backend lists, and why it leaves the others out.
//!
//! The `/udp` rule, the same for every backend: an instance serves the protocol it declares
//! (its own `proto` field, else registrator's `udp` tag), and one that declares none serves
//! TCP, as a descriptor without `/PROTO` is TCP. So a registry listing a service's TCP and UDP
//! ports under one name gives each listener its own.

use std::collections::HashMap;

use crate::{Endpoint, Excluded, Exclusion, Protocol, WatchRequest};

/// The tag registrator puts on the registrations of UDP ports.
pub const UDP_TAG: &str = "udp";

/// The protocol an instance serves: the one it `declared`, else UDP if tagged [`UDP_TAG`],
/// else TCP.
pub fn instance_protocol<S: AsRef<str>>(declared: Option<Protocol>, tags: &[S]) -> Protocol {
    declared.unwrap_or_else(|| {
        if tags.iter().any(|tag| tag.as_ref() == UDP_TAG) {
            Protocol::Udp
        } else {
            Protocol::Tcp
        }
    })
}

/// Whether an instance declaring `declared` with `tags` serves a `wanted` watch.
pub fn serves_protocol<S: AsRef<str>>(
    declared: Option<Protocol>,
    tags: &[S],
    wanted: Protocol,
) -> bool {
    instance_protocol(declared, tags) == wanted
}

/// Builds one watch's set: offer every instance of the service in the backend's order; each
/// is kept or excluded with its reason (protocol, then tags, then duplicate address).
#[derive(Debug)]
pub struct Selector<'a> {
    request: &'a WatchRequest,
    /// Address to the instance that gave it first.
    kept: HashMap<String, String>,
    endpoints: Vec<Endpoint>,
    excluded: Vec<Excluded>,
}

impl<'a> Selector<'a> {
    pub fn new(request: &'a WatchRequest) -> Self {
        Selector {
            request,
            kept: HashMap::new(),
            endpoints: Vec::new(),
            excluded: Vec::new(),
        }
    }

    /// A readable instance named `instance` (a key, an ID, an entry), declaring `declared`.
    /// Returns whether it was kept.
    pub fn offer(
        &mut self,
        instance: &str,
        endpoint: Endpoint,
        declared: Option<Protocol>,
    ) -> bool {
        let serves = instance_protocol(declared, endpoint.tags.as_slice());
        if serves != self.request.protocol {
            self.exclude(
                instance,
                Exclusion::PROTOCOL,
                format!(
                    "{} serves {serves}, the watch is {}",
                    endpoint.address, self.request.protocol
                ),
            );
            return false;
        }
        if let Some(missing) = self
            .request
            .tags
            .iter()
            .find(|tag| !endpoint.tags.contains(tag))
        {
            self.exclude(
                instance,
                Exclusion::TAG,
                format!("{} lacks tag {:?}", endpoint.address, missing.as_str()),
            );
            return false;
        }
        if let Some(first) = self.kept.get(endpoint.address.as_str()) {
            let detail = format!("{} is already given by {first}", endpoint.address);
            self.exclude(instance, Exclusion::DUPLICATE, detail);
            return false;
        }
        self.kept
            .insert(endpoint.address.to_string(), instance.to_string());
        self.endpoints.push(endpoint);
        true
    }

    /// An instance left out for `reason` before it could be offered (unreadable, not passing).
    pub fn exclude(&mut self, instance: &str, reason: Exclusion, detail: impl Into<String>) {
        self.excluded.push(Excluded::new(
            crate::text::cut(instance).into_owned(),
            reason,
            detail,
        ));
    }

    /// The endpoints kept, in the order offered, and the instances left out.
    pub fn finish(self) -> (Vec<Endpoint>, Vec<Excluded>) {
        (self.endpoints, self.excluded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(instance, address, tags, declared)` offered to a watch of `tags`/`protocol`; renders
    /// `kept addresses | instance:reason (detail)...`.
    fn check(
        tags: &[&str],
        protocol: Protocol,
        offered: &[(&str, &str, &[&str], Option<Protocol>)],
        expected: &str,
    ) {
        let request = WatchRequest::new("svc", tags, protocol);
        let mut selector = Selector::new(&request);
        for (instance, address, tags, declared) in offered {
            selector.offer(
                instance,
                Endpoint::new(*address).with_tags(tags.iter().copied()),
                *declared,
            );
        }
        let (endpoints, excluded) = selector.finish();
        let kept: Vec<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
        let left: Vec<String> = excluded
            .iter()
            .map(|x| format!("{}:{} ({})", x.instance, x.reason, x.detail))
            .collect();
        assert_eq!(
            format!("{} | {}", kept.join(" "), left.join("; ")),
            expected
        );
    }

    const TCP: Option<Protocol> = Some(Protocol::Tcp);
    const UDP: Option<Protocol> = Some(Protocol::Udp);

    #[test]
    fn the_udp_rule() {
        let check = |declared: Option<Protocol>, tags: &[&str], expected: Protocol| {
            assert_eq!(
                instance_protocol(declared, tags),
                expected,
                "{declared:?} {tags:?}"
            );
        };
        check(None, &[], Protocol::Tcp);
        check(None, &["prod"], Protocol::Tcp);
        check(None, &["udp"], Protocol::Udp);
        check(TCP, &["udp"], Protocol::Tcp);
        check(UDP, &[], Protocol::Udp);
        assert!(serves_protocol(None, &["udp"], Protocol::Udp));
        assert!(!serves_protocol::<&str>(None, &[], Protocol::Udp));
    }

    #[test]
    fn every_instance_is_kept_or_explained() {
        check(&[], Protocol::Tcp, &[], " | ");
        check(
            &[],
            Protocol::Tcp,
            &[
                ("a", "127.0.0.1:1", &[], None),
                ("b", "127.0.0.1:2", &["udp"], None),
                ("c", "127.0.0.1:3", &[], UDP),
                ("d", "127.0.0.1:1", &[], TCP),
            ],
            "127.0.0.1:1 | b:protocol (127.0.0.1:2 serves udp, the watch is tcp); \
             c:protocol (127.0.0.1:3 serves udp, the watch is tcp); \
             d:duplicate (127.0.0.1:1 is already given by a)",
        );
        check(
            &["prod", "eu"],
            Protocol::Udp,
            &[
                ("a", "127.0.0.1:1", &["prod", "eu", "udp"], None),
                ("b", "127.0.0.1:2", &["prod"], UDP),
                ("c", "127.0.0.1:3", &["eu", "prod"], TCP),
            ],
            "127.0.0.1:1 | b:tag (127.0.0.1:2 lacks tag \"eu\"); \
             c:protocol (127.0.0.1:3 serves tcp, the watch is udp)",
        );
    }
}
