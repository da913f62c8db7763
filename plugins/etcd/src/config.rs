//! `etcd://`, `etcds://` (API v3) and `etcd2://`, `etcd2s://` (API v2) URIs and their options,
//! checked before anything connects.

use std::{path::PathBuf, time::Duration};

use embassy_plugin_api::{
    support::{OptionError, OptionReader},
    Options,
};

/// Everything needed to reach the cluster, taken from the URI and the plugin options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Which of etcd's APIs the scheme asked for.
    pub api: Api,
    /// `http://host:port` or `https://host:port`, one per cluster member given.
    pub endpoints: Vec<String>,
    pub tls: Option<TlsFiles>,
    pub user: Option<(String, String)>,
    /// Upper bound of the reconnect backoff.
    pub backoff_max: Duration,
    /// Deadline of one read (a page of a prefix) or of opening a watch.
    pub request_timeout: Duration,
}

/// etcd's v3 gRPC API (`etcd://`) or its v2 HTTP key space (`etcd2://`, what registrator's
/// `etcd://` backend writes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    V2,
    V3,
}

/// PEM files for `etcds://` and `etcd2s://`: the CA always, a client certificate and key when etcd asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:?} is not an etcd URI: expected etcd://HOST:PORT[,HOST:PORT..], etcds://..., etcd2://... or etcd2s://...")]
    Scheme(String),
    #[error("{uri:?}: member {member:?} is not host:port")]
    Member { uri: String, member: String },
    #[error("{uri:?}: query parameter {pair:?} is not key=value")]
    Query { uri: String, pair: String },
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("option {0} needs an etcds:// or etcd2s:// URI (TLS)")]
    TlsOnPlainUri(&'static str),
    #[error("{0}:// needs option ca: the PEM file of the CA that signed etcd's certificate")]
    NoCa(&'static str),
    #[error("options cert and key go together: {0} is missing")]
    CertWithoutKey(&'static str),
    #[error("option {0} needs username as well")]
    PasswordWithoutUser(&'static str),
    #[error("option username needs password or password_file")]
    UserWithoutPassword,
    #[error("cannot read password_file {path}: {error}")]
    PasswordFile { path: String, error: String },
}

/// Every option the plugin takes, in `--discovery-opt` or the URI's query; any other is refused.
pub const OPTIONS: &[(&str, &str)] = &[
    (
        "ca",
        "PEM file of the CA that signed etcd's certificate (etcds:// and etcd2s:// only, required there)",
    ),
    (
        "cert",
        "PEM client certificate, when etcd asks for one (with key)",
    ),
    ("key", "PEM key of the client certificate (with cert)"),
    ("username", "etcd user (with password or password_file)"),
    ("password", "the user's password"),
    (
        "password_file",
        "a file holding the user's password, kept off the command line",
    ),
    (
        "backoff_max",
        "longest wait between reconnection attempts (default 5s)",
    ),
    (
        "timeout",
        "deadline of one read or of opening a watch (default 5s)",
    ),
];

const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdConfig {
    /// Parses `uri` (options may also ride in its query string) and `options`
    /// (`--discovery-opt`, which win over the query).
    pub fn parse(uri: &str, options: &Options) -> Result<EtcdConfig, ConfigError> {
        let (uri_scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| ConfigError::Scheme(uri.to_string()))?;
        let (uri_scheme, api, scheme) = match uri_scheme {
            "etcd" => ("etcd", Api::V3, "http"),
            "etcds" => ("etcds", Api::V3, "https"),
            "etcd2" => ("etcd2", Api::V2, "http"),
            "etcd2s" => ("etcd2s", Api::V2, "https"),
            _ => return Err(ConfigError::Scheme(uri.to_string())),
        };
        let (members, query) = rest.split_once('?').unwrap_or((rest, ""));
        let members = members.trim_end_matches('/');
        let endpoints = members
            .split(',')
            .map(|member| {
                let valid = member.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains(['/', '@', ' '])
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if valid {
                    Ok(format!("{scheme}://{member}"))
                } else {
                    Err(ConfigError::Member {
                        uri: uri.to_string(),
                        member: member.to_string(),
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut settings: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| ConfigError::Query {
                uri: uri.to_string(),
                pair: pair.to_string(),
            })?;
            settings.push((key.to_string(), value.to_string()));
        }
        // `--discovery-opt`s come after the query, so they win (the last one does).
        settings.extend(
            options
                .iter()
                .map(|pair| (pair.0.to_string(), pair.1.to_string())),
        );
        let options = OptionReader::from_pairs("etcd", OPTIONS, settings)?;
        let get = |key: &str| options.str(key);

        let files = TlsFiles {
            ca: get("ca").map(PathBuf::from),
            cert: get("cert").map(PathBuf::from),
            key: get("key").map(PathBuf::from),
        };
        let tls = if scheme == "https" {
            match (&files.ca, &files.cert, &files.key) {
                (None, _, _) => return Err(ConfigError::NoCa(uri_scheme)),
                (_, Some(_), None) => return Err(ConfigError::CertWithoutKey("key")),
                (_, None, Some(_)) => return Err(ConfigError::CertWithoutKey("cert")),
                _ => Some(files),
            }
        } else {
            for (name, set) in [
                ("ca", files.ca.is_some()),
                ("cert", files.cert.is_some()),
                ("key", files.key.is_some()),
            ] {
                if set {
                    return Err(ConfigError::TlsOnPlainUri(name));
                }
            }
            None
        };

        let password = match (get("password"), get("password_file")) {
            (Some(password), _) => Some(password.to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| ConfigError::PasswordFile {
                        path: path.to_string(),
                        error: error.to_string(),
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            (None, None) => None,
        };
        let user = match (get("username"), password) {
            (Some(name), Some(password)) => Some((name.to_string(), password)),
            (Some(_), None) => return Err(ConfigError::UserWithoutPassword),
            (None, Some(_)) => {
                let given = if get("password").is_some() {
                    "password"
                } else {
                    "password_file"
                };
                return Err(ConfigError::PasswordWithoutUser(given));
            }
            (None, None) => None,
        };

        Ok(EtcdConfig {
            api,
            endpoints,
            tls,
            user,
            backoff_max: options.duration("backoff_max", DEFAULT_BACKOFF_MAX)?,
            request_timeout: options.duration("timeout", DEFAULT_REQUEST_TIMEOUT)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `uri` with `options` (`k=v` strings) and renders the config, or `error: ...`.
    fn check(uri: &str, options: &[&str], expected: &str) {
        let options = embassy_plugin_api::support::options::options_from(options);
        let actual = match EtcdConfig::parse(uri, &options) {
            Ok(c) => {
                let tls = c.tls.map_or("-".to_string(), |t| {
                    let show = |p: &Option<PathBuf>| {
                        p.as_ref()
                            .map_or("-".to_string(), |p| p.display().to_string())
                    };
                    format!(
                        "tls(ca={} cert={} key={})",
                        show(&t.ca),
                        show(&t.cert),
                        show(&t.key)
                    )
                });
                let user = c.user.map_or("-".to_string(), |(u, p)| format!("{u}:{p}"));
                format!(
                    "{:?} {} {tls} {user} {:?} {:?}",
                    c.api,
                    c.endpoints.join(","),
                    c.backoff_max,
                    c.request_timeout
                )
            }
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{uri} {options:?}");
    }

    #[test]
    fn uri_forms() {
        check(
            "etcd://127.0.0.1:2379",
            &[],
            "V3 http://127.0.0.1:2379 - - 5s 5s",
        );
        check(
            "etcd://127.0.0.1:2379,127.0.0.2:2379/",
            &[],
            "V3 http://127.0.0.1:2379,http://127.0.0.2:2379 - - 5s 5s",
        );
        check(
            "etcds://localhost:2379?ca=/pki/ca.pem&cert=/pki/c.pem&key=/pki/k.pem",
            &[],
            "V3 https://localhost:2379 tls(ca=/pki/ca.pem cert=/pki/c.pem key=/pki/k.pem) - 5s 5s",
        );
        check(
            "etcds://localhost:2379?ca=/a.pem",
            &["ca=/b.pem"],
            "V3 https://localhost:2379 tls(ca=/b.pem cert=- key=-) - 5s 5s",
        );
        check(
            "etcd://127.0.0.1:2379",
            &[
                "username=embassy",
                "password=s3cret",
                "backoff_max=500ms",
                "timeout=2s",
            ],
            "V3 http://127.0.0.1:2379 - embassy:s3cret 500ms 2s",
        );
        // API v2: the same members and options.
        check(
            "etcd2://127.0.0.1:2379,127.0.0.2:2379",
            &["username=embassy", "password=s3cret"],
            "V2 http://127.0.0.1:2379,http://127.0.0.2:2379 - embassy:s3cret 5s 5s",
        );
        check(
            "etcd2s://localhost:2379?ca=/pki/ca.pem",
            &["cert=/pki/c.pem", "key=/pki/k.pem", "timeout=1s"],
            "V2 https://localhost:2379 tls(ca=/pki/ca.pem cert=/pki/c.pem key=/pki/k.pem) - 5s 1s",
        );
    }

    #[test]
    fn bad_uris_and_options_say_what_is_wrong() {
        check(
            "consul://127.0.0.1:8500",
            &[],
            "error: \"consul://127.0.0.1:8500\" is not an etcd URI: expected etcd://HOST:PORT[,HOST:PORT..], etcds://..., etcd2://... or etcd2s://...",
        );
        check(
            "etcd3://127.0.0.1:2379",
            &[],
            "error: \"etcd3://127.0.0.1:2379\" is not an etcd URI: expected etcd://HOST:PORT[,HOST:PORT..], etcds://..., etcd2://... or etcd2s://...",
        );
        check(
            "127.0.0.1:2379",
            &[],
            "error: \"127.0.0.1:2379\" is not an etcd URI: expected etcd://HOST:PORT[,HOST:PORT..], etcds://..., etcd2://... or etcd2s://...",
        );
        check(
            "etcd2://127.0.0.1:0",
            &[],
            "error: \"etcd2://127.0.0.1:0\": member \"127.0.0.1:0\" is not host:port",
        );
        check(
            "etcd2://a:1",
            &["ca=/x"],
            "error: option ca needs an etcds:// or etcd2s:// URI (TLS)",
        );
        check(
            "etcd2s://a:1",
            &[],
            "error: etcd2s:// needs option ca: the PEM file of the CA that signed etcd's certificate",
        );
        check(
            "etcd://127.0.0.1",
            &[],
            "error: \"etcd://127.0.0.1\": member \"127.0.0.1\" is not host:port",
        );
        check(
            "etcd://a:1,",
            &[],
            "error: \"etcd://a:1,\": member \"\" is not host:port",
        );
        check(
            "etcd://a:1?ca",
            &[],
            "error: \"etcd://a:1?ca\": query parameter \"ca\" is not key=value",
        );
        check(
            "etcd://a:1",
            &["cafile=/x"],
            "error: unknown etcd option cafile=\"/x\" (known: ca, cert, key, username, password, password_file, backoff_max, timeout)",
        );
        check(
            "etcd://a:1",
            &["ca=/x"],
            "error: option ca needs an etcds:// or etcd2s:// URI (TLS)",
        );
        check(
            "etcds://a:1",
            &["ca=/c", "cert=/x"],
            "error: options cert and key go together: key is missing",
        );
        check(
            "etcds://a:1",
            &[],
            "error: etcds:// needs option ca: the PEM file of the CA that signed etcd's certificate",
        );
        check(
            "etcd://a:1",
            &["password=x"],
            "error: option password needs username as well",
        );
        check(
            "etcd://a:1",
            &["username=x"],
            "error: option username needs password or password_file",
        );
        check(
            "etcd://a:1",
            &["username=x", "password_file=/nonexistent/pw"],
            "error: cannot read password_file /nonexistent/pw: No such file or directory (os error 2)",
        );
        check(
            "etcd://a:1",
            &["backoff_max=soon"],
            "error: etcd option backoff_max=\"soon\": expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "etcd://a:1",
            &["timeout=0s"],
            "error: etcd option timeout=\"0s\": a duration must be greater than 0",
        );
        check(
            "etcd://a:1",
            &["backoff_max=307445734561825861m"],
            "error: etcd option backoff_max=\"307445734561825861m\": the duration is too large",
        );
    }
}
