//! The backend's records: a plain-text list, one instance per line.
//!
//! ```text
//! # SERVICE  ADDRESS          [tags=A,B] [weight=N] [proto=tcp|udp]
//! web        10.0.0.5:8080    tags=prod weight=2
//! dns        10.0.0.7:53      proto=udp
//! ```
//!
//! Pure functions, table-tested: the backend-specific half of a plugin. Replace this module
//! with your backend's client and record format.

use embassy_plugin_api::{
    support::Selector, Endpoint, Excluded, Exclusion, Protocol, WatchRequest,
};

/// One line that names a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub service: String,
    /// `line N`: what names the instance to an operator.
    pub instance: String,
    /// The instance, or why its line could not be read.
    pub parsed: Result<Instance, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub address: String,
    pub tags: Vec<String>,
    pub weight: u32,
    /// What the line says (`proto=`), if anything: the support library's rule decides the rest.
    pub protocol: Option<Protocol>,
}

/// Every line of `text` that names a service, in order (comments and blank lines skipped).
pub fn parse(text: &str) -> Vec<Record> {
    text.lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let service = fields.next()?.to_string();
            Some(Record {
                service,
                instance: format!("line {}", index + 1),
                parsed: parse_instance(fields),
            })
        })
        .collect()
}

fn parse_instance<'a>(mut fields: impl Iterator<Item = &'a str>) -> Result<Instance, String> {
    let address = fields.next().ok_or("no address after the service name")?;
    let port_ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!("address {address:?} is not HOST:PORT"));
    }
    let mut instance = Instance {
        address: address.to_string(),
        tags: Vec::new(),
        weight: 1,
        protocol: None,
    };
    for field in fields {
        match field.split_once('=') {
            Some(("tags", tags)) => {
                instance.tags = tags
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect()
            }
            Some(("weight", weight)) => {
                instance.weight = weight
                    .parse()
                    .ok()
                    .filter(|&w| w > 0)
                    .ok_or_else(|| format!("weight {weight:?} is not a whole number from 1"))?
            }
            Some(("proto", "tcp")) => instance.protocol = Some(Protocol::Tcp),
            Some(("proto", "udp")) => instance.protocol = Some(Protocol::Udp),
            Some(("proto", other)) => {
                return Err(format!("proto {other:?} is neither tcp nor udp"))
            }
            _ => return Err(format!("{field:?} is not tags=, weight= or proto=")),
        }
    }
    Ok(instance)
}

/// The watched service's endpoints in `records`, and every instance of it left out with why.
/// The support library's [`Selector`] applies the rules every plugin shares (protocol, tags,
/// duplicates); this plugin adds only what its own records can get wrong.
pub fn select(records: &[Record], request: &WatchRequest) -> (Vec<Endpoint>, Vec<Excluded>) {
    let mut selector = Selector::new(request);
    for record in records
        .iter()
        .filter(|r| r.service == request.service.as_str())
    {
        match &record.parsed {
            Ok(instance) => {
                let mut endpoint =
                    Endpoint::new(instance.address.clone()).with_tags(instance.tags.clone());
                endpoint.weight = instance.weight;
                selector.offer(&record.instance, endpoint, instance.protocol);
            }
            Err(why) => selector.exclude(&record.instance, Exclusion::UNREADABLE, why.clone()),
        }
    }
    selector.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Address, tags, weight and declared protocol of a readable line.
    type Readable<'a> = (&'a str, &'a [&'a str], u32, Option<Protocol>);

    fn check(line: &str, expected: Result<Readable<'_>, &str>) {
        let records = parse(line);
        assert_eq!(records.len(), 1, "{line:?}");
        let got = records[0].parsed.as_ref().map(|i| {
            (
                i.address.as_str(),
                i.tags.iter().map(String::as_str).collect::<Vec<_>>(),
                i.weight,
                i.protocol,
            )
        });
        let expected = expected
            .map(|(address, tags, weight, protocol)| (address, tags.to_vec(), weight, protocol))
            .map_err(str::to_string);
        assert_eq!(got.map_err(Clone::clone), expected, "{line:?}");
    }

    #[test]
    fn lines() {
        check("web 10.0.0.5:80", Ok(("10.0.0.5:80", &[], 1, None)));
        check(
            "web 10.0.0.5:80 tags=prod,eu weight=3 # primary",
            Ok(("10.0.0.5:80", &["prod", "eu"], 3, None)),
        );
        check(
            "dns [::1]:53 proto=udp",
            Ok(("[::1]:53", &[], 1, Some(Protocol::Udp))),
        );
        check("db db.local:5432", Ok(("db.local:5432", &[], 1, None)));
        check("web", Err("no address after the service name"));
        check("web 10.0.0.5", Err("address \"10.0.0.5\" is not HOST:PORT"));
        check(
            "web 10.0.0.5:0",
            Err("address \"10.0.0.5:0\" is not HOST:PORT"),
        );
        check(
            "web 10.0.0.5:80 weight=0",
            Err("weight \"0\" is not a whole number from 1"),
        );
        check(
            "web 10.0.0.5:80 proto=sctp",
            Err("proto \"sctp\" is neither tcp nor udp"),
        );
        check(
            "web 10.0.0.5:80 prod",
            Err("\"prod\" is not tags=, weight= or proto="),
        );
        assert!(parse("# only a comment\n\n   \n").is_empty());
    }

    #[test]
    fn selection_explains_every_instance_left_out() {
        let records = parse(
            "web 10.0.0.1:80 tags=prod\n\
             web 10.0.0.2:80\n\
             web 10.0.0.3:80 tags=prod proto=udp\n\
             web 10.0.0.1:80 tags=prod\n\
             web nonsense\n\
             api 10.0.0.9:80 tags=prod\n",
        );
        let request = WatchRequest::new("web", &["prod"], Protocol::Tcp);
        let (endpoints, excluded) = select(&records, &request);
        let addresses: Vec<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addresses, ["10.0.0.1:80"]);
        let reasons: Vec<(&str, Exclusion)> = excluded
            .iter()
            .map(|e| (e.instance.as_str(), e.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("line 2", Exclusion::TAG),
                ("line 3", Exclusion::PROTOCOL),
                ("line 4", Exclusion::DUPLICATE),
                ("line 5", Exclusion::UNREADABLE),
            ]
        );
    }
}
