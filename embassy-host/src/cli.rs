//! The command line, parsed into typed configuration.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Args, Parser, Subcommand};
use embassy_core::{
    check,
    copy::CopyMode,
    descriptor::{parse_duration, parse_percent},
    health::{self, OnRemove},
    ServiceDescriptor,
};

use crate::admin::{AdminAddr, DEFAULT_ADMIN_ADDR};
pub use crate::docker::watch::ModeChoice;

/// Where plugins are looked for, relative to the installation prefix (`PREFIX/bin/embassy`
/// looks in `PREFIX/lib/embassy/plugins`).
pub const PLUGIN_SUBDIR: &str = "lib/embassy/plugins";
/// The plugin directory when the binary's own location cannot be read.
pub const FALLBACK_PLUGIN_DIR: &str = "/usr/lib/embassy/plugins";

/// Where plugins are looked for unless `--plugin-dir` or `EMBASSY_PLUGIN_DIR` says otherwise:
/// `PREFIX/lib/embassy/plugins` for a binary installed as `PREFIX/bin/embassy`, so an install
/// into any prefix (`scripts/install`, or `/usr` in the image) finds its own plugins.
pub fn default_plugin_dir() -> &'static str {
    static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        std::env::current_exe()
            .and_then(|exe| exe.canonicalize())
            .ok()
            .as_deref()
            .and_then(plugin_dir_for)
            .map(|dir| dir.display().to_string())
            .unwrap_or_else(|| FALLBACK_PLUGIN_DIR.to_string())
    })
}

/// `PREFIX/lib/embassy/plugins` for the executable `PREFIX/bin/embassy`.
fn plugin_dir_for(exe: &std::path::Path) -> Option<PathBuf> {
    let prefix = exe.parent()?.parent()?;
    Some(prefix.join(PLUGIN_SUBDIR))
}
/// The engine `--docker` follows when given no URI.
pub const DEFAULT_DOCKER_URI: &str = "unix:///var/run/docker.sock";

#[derive(Debug, Parser)]
#[command(
    name = "embassy",
    version,
    about = "A service proxy for Docker containers: listens on local ports and balances every \
             connection over endpoints found in a discovery backend",
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = "Descriptors: <SERVICE>[<TAG>,..];<PORT>/<PROTO>[;key=value..]\n  \
                  e.g. 'web;8080/tcp', '/services/prod/app1/80[prod,app1];80/tcp', \
                  'redis.master[prod];6379/tcp;balancer=least-conn'\n\
                  Run 'embassy check DESCRIPTOR' to see how one is read."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,

    /// Directory of plugin libraries (*.so); every one is loaded. The default is
    /// PREFIX/lib/embassy/plugins for this binary installed as PREFIX/bin/embassy.
    #[arg(long, global = true, env = "EMBASSY_PLUGIN_DIR", default_value = default_plugin_dir(), value_name = "DIR")]
    pub plugin_dir: PathBuf,

    /// More logging (-v debug, -vv trace); EMBASSY_LOG=<filter> overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// Log lines as text, or as one JSON object per line (fields flattened) for log shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "EMBASSY_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
}

/// `embassy ctl` operations. SERVICE is an id as `embassy status` lists it (tcp-8080).
#[derive(Debug, Subcommand)]
pub enum CtlOperation {
    /// Swap SERVICE's balancer in place: new connections use it at once, open ones are
    /// untouched, live-connection counts carry over.
    Balancer {
        service: String,
        /// A loaded balancer plugin (embassy plugins lists them).
        name: String,
        /// An option for the balancer (repeatable).
        #[arg(long = "opt", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        options: Vec<(String, String)>,
    },
    /// No new connections to ENDPOINT (host:port) of SERVICE; open ones finish. Holds across
    /// discovery updates until `enable`.
    Drain { service: String, endpoint: String },
    /// Like drain, and reset the endpoint's open connections.
    Disable { service: String, endpoint: String },
    /// Undo drain or disable: the endpoint is back to what health and discovery say.
    Enable { service: String, endpoint: String },
    /// Rescan the plugin directory (what SIGHUP does): new libraries are loaded, a newer
    /// version of a loaded plugin serves its new instances, bad files are reported one by one.
    /// Loaded libraries are never unloaded.
    Reload,
    /// Restart SERVICE's discovery watch: the backend answers with its whole current set,
    /// which replaces the one in force (kept until the answer comes).
    Resync { service: String },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Run(Box<RunArgs>),
    /// List the plugins found in --plugin-dir; exits 1 if any file failed to load.
    Plugins {
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// Validate descriptors and explain how each is read; exits 1 if any is invalid.
    Check {
        #[arg(required = true, value_name = "DESCRIPTOR")]
        descriptors: Vec<String>,
    },
    /// Change a running Embassy through its admin API; each change is logged there with who
    /// made it (uid and pid on the unix socket). Exits 1 if the change was refused (nothing
    /// changed).
    Ctl {
        #[command(subcommand)]
        operation: CtlOperation,
        /// The running Embassy's admin address: its unix socket, or a TCP address that takes
        /// writes with a bearer token (--token-file).
        #[arg(long, env = "EMBASSY_ADMIN", default_value = DEFAULT_ADMIN_ADDR, value_name = "ADDR")]
        admin: AdminAddr,
        /// The file holding the bearer token, for a TCP admin address (the one Embassy runs
        /// with as --admin-token-file).
        #[arg(long, env = "EMBASSY_ADMIN_TOKEN_FILE", value_name = "PATH")]
        token_file: Option<PathBuf>,
    },
    /// Show what a running Embassy serves: services, endpoints, connections; with SERVICE (an
    /// id such as tcp-8080, or a port), also each instance discovery left out and why.
    Status {
        /// One service: its id (tcp-8080), its port (8080) or its service name.
        #[arg(value_name = "SERVICE")]
        service: Option<String>,
        /// The admin API's JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// The running Embassy's admin socket.
        #[arg(long, env = "EMBASSY_ADMIN", default_value = DEFAULT_ADMIN_ADDR, value_name = "unix:PATH")]
        admin: AdminAddr,
    },
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// A service to proxy (repeatable), e.g. 'web;8080/tcp'.
    #[arg(short, long = "service", value_name = "DESCRIPTOR", value_parser = parse_descriptor)]
    pub services: Vec<ServiceDescriptor>,

    /// Discovery backend, chosen among the plugins by URI scheme, e.g.
    /// file:///etc/embassy/services.json, etcd://127.0.0.1:2379, consul://127.0.0.1:8500.
    #[arg(long, env = "DISCOVERY", value_name = "URI")]
    pub discovery: Option<String>,

    /// An option for the discovery plugin (repeatable), e.g. poll_interval=250ms.
    #[arg(long = "discovery-opt", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub discovery_options: Vec<(String, String)>,

    /// Address the listeners bind.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub bind: IpAddr,

    /// Balancer plugin for services whose descriptor names none.
    #[arg(long, default_value = "round-robin", value_name = "NAME")]
    pub balancer: String,

    /// Variable prefix of service requests, in Embassy's own environment (the inside-the-container
    /// mode) and in containers' (--docker); an empty prefix turns both off.
    #[arg(long, default_value = "BACKEND_", value_name = "PREFIX")]
    pub prefix: String,

    /// Label prefix of service requests in Docker containers (--docker): a label
    /// `embassy.backend.web=web;8080/tcp` declares what BACKEND_WEB would, without being in the
    /// app's environment. A label and a variable of one name are an error. Empty turns labels off.
    #[arg(long, default_value = "embassy.backend.", value_name = "PREFIX")]
    pub label_prefix: String,

    /// Upstream connect timeout (a descriptor's connect_timeout overrides it).
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub connect_timeout: Duration,

    /// Close a TCP connection after this long with no byte moving either way (Envoy's
    /// tcp_proxy default); a descriptor's idle_timeout overrides it.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub idle_timeout: Duration,

    /// Once one side of a TCP connection has finished sending, close both after this long with
    /// no byte moving (HAProxy's timeout client-fin/server-fin). Shorter than the idle timeout:
    /// a peer still silent 30 s after the other said goodbye is, in practice, never finishing,
    /// and holds two descriptors meanwhile. A descriptor's half_close_timeout overrides it.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub half_close_timeout: Duration,

    /// How long a connection accepted while its service has no endpoint waits for one before
    /// it is reset (HAProxy's timeout queue); a descriptor's queue_timeout overrides it.
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub queue_timeout: Duration,

    /// Most TCP connections open at once per service; more wait in the listen backlog until one
    /// closes (HAProxy's maxconn). Default: half of what the open-file limit allows after a
    /// reserve of 64, at two descriptors per connection ((limit - 64) / 4), so one service on a
    /// hung upstream cannot take every descriptor. A descriptor's max_connections overrides it.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_connections: Option<usize>,

    /// Consecutive connect failures (refused, timed out, reset before any byte) that take an
    /// endpoint out of rotation; 0 turns passive ejection off. Connect failures are unambiguous,
    /// so fewer than Envoy's 5; each costs a client a failover attempt, not an error.
    #[arg(long, default_value_t = health::DEFAULT_EJECT_AFTER, value_name = "N", help_heading = "Endpoint health")]
    pub eject_after: u32,

    /// The first ejection's length; each ejection in a row doubles it, up to --eject-max-time.
    /// A connect that succeeds after an ejection resets the count.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration_arg, help_heading = "Endpoint health")]
    pub eject_time: Duration,

    /// The longest an ejection lasts.
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = parse_duration_arg, help_heading = "Endpoint health")]
    pub eject_max_time: Duration,

    /// Most of a service's endpoints ejected at once, as a share (one may always be): failures
    /// spread over many endpoints point at the network, not at them.
    #[arg(long, default_value = "50%", value_name = "PERCENT", value_parser = parse_percent_arg, help_heading = "Endpoint health")]
    pub max_ejected: u32,

    /// When fewer than this share of a service's endpoints are fit (not ejected, check
    /// passing), all of them are used, as Envoy's panic threshold: the survivors alone would
    /// fall too. No fit endpoint at all always means all of them.
    #[arg(long, default_value = "50%", value_name = "PERCENT", value_parser = parse_percent_arg, help_heading = "Endpoint health")]
    pub panic_threshold: u32,

    /// What happens to TCP connections to an endpoint discovery removed: `keep` (they run on),
    /// `drain` (they run up to --drain-timeout, then are reset) or `close` (reset at once).
    #[arg(long, default_value = "keep", value_name = "POLICY", value_parser = parse_on_remove, help_heading = "Endpoint health")]
    pub on_remove: OnRemove,

    /// With on_remove=drain, how long connections to a removed endpoint may run.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration_arg, help_heading = "Endpoint health")]
    pub drain_timeout: Duration,

    /// An endpoint discovery stops listing stays in rotation (while its connects succeed) this
    /// long, so a container being recreated causes no errors; 0: removed at once.
    #[arg(long, default_value = "0", value_name = "DURATION", value_parser = parse_delay_arg, help_heading = "Endpoint health")]
    pub remove_delay: Duration,

    /// Between two active checks of an endpoint (a descriptor's `check=` turns them on),
    /// jittered a quarter either way; HAProxy's `inter` default.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration_arg, help_heading = "Endpoint health")]
    pub check_interval: Duration,

    /// Deadline of one check, connect and answer together.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration_arg, help_heading = "Endpoint health")]
    pub check_timeout: Duration,

    /// Passing checks in a row that bring a failing endpoint back (HAProxy's rise).
    #[arg(long, default_value_t = check::DEFAULT_CHECK_RISE, value_name = "N", value_parser = parse_positive_u32, help_heading = "Endpoint health")]
    pub check_rise: u32,

    /// Failing checks in a row that take a passing endpoint out (HAProxy's fall).
    #[arg(long, default_value_t = check::DEFAULT_CHECK_FALL, value_name = "N", value_parser = parse_positive_u32, help_heading = "Endpoint health")]
    pub check_fall: u32,

    /// How bytes are moved: `splice` (zero-copy through a pipe, Linux) or `userspace`
    /// (read/write through a buffer).
    #[arg(long = "copy", default_value = default_copy(), value_name = "MODE", value_parser = parse_copy_mode)]
    pub copy_mode: CopyMode,

    /// Serve the BACKEND_* variables (see --prefix) and embassy.backend.* labels (see
    /// --label-prefix) of Docker containers, followed through this engine; the URI defaults to
    /// unix:///var/run/docker.sock.
    #[arg(long, value_name = "URI", num_args = 0..=1, default_missing_value = DEFAULT_DOCKER_URI)]
    pub docker: Option<String>,

    /// With --docker, which containers to serve. Default: network-container when embassy finds
    /// the container it runs in (or --container-id names it), host otherwise.
    #[arg(long, value_enum, requires = "docker", value_name = "MODE")]
    pub mode: Option<ModeChoice>,

    /// With --docker, embassy's own container (id or name) for network-container mode, instead of
    /// finding it from /proc.
    #[arg(long, requires = "docker", value_name = "ID")]
    pub container_id: Option<String>,

    /// Worker threads of the proxy; 0 means one per core Embassy may run on (see taskset).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,

    /// On SIGTERM/SIGINT, how long open connections may take to finish; those still open then
    /// are reset, so their clients see the stream was cut.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub grace_period: Duration,

    /// Where the admin API listens (repeatable): unix:PATH (the trusted channel, mode 0660; the
    /// default is unix:/run/embassy/admin.sock) or IP:PORT (read-only unless
    /// --admin-token-file is given; off unless given: in network-container mode Embassy's
    /// loopback is the apps'). `--admin off` serves none.
    #[arg(long = "admin", env = "EMBASSY_ADMIN", value_name = "ADDR", value_parser = parse_admin, value_delimiter = ',')]
    pub admin: Vec<Option<AdminAddr>>,

    /// A file holding a bearer token: TCP admin addresses then take writes that send it
    /// (Authorization: Bearer TOKEN). Read at each write, so a new token takes effect at once.
    /// Without it, TCP admin addresses are read-only.
    #[arg(long, env = "EMBASSY_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,

    /// A TCP address serving only GET /metrics (Prometheus text), for scrapers that should
    /// see nothing else; off unless given. The admin API serves /metrics too.
    #[arg(long, env = "EMBASSY_METRICS", value_name = "IP:PORT")]
    pub metrics: Option<SocketAddr>,
}

fn parse_admin(text: &str) -> Result<Option<AdminAddr>, String> {
    match text {
        "off" => Ok(None),
        _ => text.parse().map(Some),
    }
}

fn parse_descriptor(text: &str) -> Result<ServiceDescriptor, String> {
    text.parse().map_err(|error| format!("{error}"))
}

fn default_copy() -> &'static str {
    match CopyMode::best() {
        CopyMode::Splice => "splice",
        CopyMode::Userspace => "userspace",
    }
}

fn parse_copy_mode(text: &str) -> Result<CopyMode, String> {
    match text {
        "splice" if CopyMode::best() == CopyMode::Splice => Ok(CopyMode::Splice),
        "splice" => Err("splice is only available on Linux".to_string()),
        "userspace" => Ok(CopyMode::Userspace),
        _ => Err(format!("{text:?} is not 'splice' or 'userspace'")),
    }
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 500ms, 3s or 1m"))
}

fn parse_delay_arg(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration_arg(text)
}

fn parse_percent_arg(text: &str) -> Result<u32, String> {
    parse_percent(text).ok_or_else(|| format!("{text:?} is not a share from 0% to 100%"))
}

fn parse_on_remove(text: &str) -> Result<OnRemove, String> {
    OnRemove::parse(text).ok_or_else(|| format!("{text:?} is not keep, drain or close"))
}

fn parse_positive_u32(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number greater than 0")),
    }
}

fn parse_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number greater than 0")),
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plugin_dir_follows_the_install_prefix() {
        let check = |exe: &str, expected: Option<&str>| {
            assert_eq!(
                plugin_dir_for(std::path::Path::new(exe)),
                expected.map(PathBuf::from),
                "{exe}"
            );
        };
        check("/usr/bin/embassy", Some("/usr/lib/embassy/plugins"));
        check(
            "/opt/embassy/bin/embassy",
            Some("/opt/embassy/lib/embassy/plugins"),
        );
        check("/embassy", None);
    }
}
