//! Loading plugin libraries from a directory, each checked on its own.
//!
//! abi_stable's `RootModule::load_from_*` caches one module per interface type in a static,
//! which would make every balancer library after the first resolve to the first. Each file is
//! therefore opened through its own library header (`lib_header_from_path`, then
//! `init_root_module`), which checks the abi_stable version, the contract version and the
//! layout of everything reachable from the root module. Libraries are never unloaded.
//!
//! A directory is scanned again on reload: a file already loaded and unchanged is skipped, a
//! new or changed one is loaded, and a library carrying a newer version of a plugin already
//! loaded serves that plugin's new instances from then on (the old one keeps serving the
//! instances made from it). A changed file is loaded from a private copy: the dynamic loader
//! answers a path it has opened once with the library it opened then.
//!
//! A library is checked against the newest contract first and, if it was built against 1.0,
//! against the frozen 1.0 interfaces (`embassy_plugin_api::v1_0`): abi_stable refuses a library
//! with fewer members than the host's types, so each older minor needs its own. [`Module`] and
//! [`DiscoveryBackend`] hide which one a plugin speaks from the rest of the host.

use std::{
    fs,
    path::{Path, PathBuf},
};

use abi_stable::{
    library::{lib_header_from_path, LibraryError},
    std_types::{RStr, RVec, Tuple2},
};
use embassy_core::balancer::Picker;
use embassy_plugin_api::{
    module::{LOADABLE_MINORS, PLUGIN_API_VERSION},
    v1_0, BalancerConfig, DiscoveryBox, DiscoveryConfig, EndpointSink, HostLogger, LogLevel,
    PluginError, PluginKind, PluginMetadata, PluginModRef, WatchHandleBox, WatchRequest,
};
use serde::Serialize;
use thiserror::Error;
use tracing::{debug, error, info, trace, warn};

/// Why one file in the plugin directory was not registered.
#[derive(Debug, Error)]
pub enum PluginLoadError {
    #[error("{path}: not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{path}: not an Embassy plugin (it exports no abi_stable root module)")]
    NotAPlugin { path: PathBuf },
    #[error("{path}: incompatible plugin: built against plugin-api {plugin_api}, checked against contract {checked} of this host (plugin-api {PLUGIN_API_VERSION}, loads {}): {summary}", LOADABLE_MINORS.join(" and "))]
    Incompatible {
        path: PathBuf,
        plugin_api: String,
        /// The contract minor the library was checked against.
        checked: &'static str,
        summary: String,
        /// abi_stable's full report (often hundreds of lines), logged with --verbose.
        detail: String,
    },
    /// An entry that looks meant as a plugin but cannot be one: a `*.so` directory or
    /// special file, or a symlink that leads nowhere (dangling, or a loop).
    #[error("{path}: {reason}, skipped")]
    Unusable { path: PathBuf, reason: String },
    /// A file refused before and unchanged since: not opened again (the loader would answer
    /// with the image it refused), reported again.
    #[error("{refused} (unchanged since it was refused, not opened again)")]
    StillRefused { path: PathBuf, refused: String },
    #[error("{path}: plugin failed to initialise: {reason}")]
    InitFailed { path: PathBuf, reason: String },
    #[error("{path}: plugin name '{name}' is already taken by {}", first.display())]
    DuplicateName {
        path: PathBuf,
        name: String,
        first: PathBuf,
    },
    #[error("{path}: plugin '{name}' {version} is older than the {serving} already loaded from {}; only a newer version replaces a loaded plugin", first.display())]
    Older {
        path: PathBuf,
        name: String,
        version: String,
        serving: String,
        first: PathBuf,
    },
    #[error("{path}: URI scheme '{scheme}://' is already served by {}", first.display())]
    DuplicateScheme {
        path: PathBuf,
        scheme: String,
        first: PathBuf,
    },
}

/// Why the directory itself could not be read (the cause is the source, not repeated here).
#[derive(Debug, Error)]
#[error("cannot read plugin directory {}", dir.display())]
pub struct PluginDirError {
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why a plugin could not provide what was asked of it.
#[derive(Debug, Error)]
pub enum PluginUseError {
    #[error("no balancer plugin named '{name}' (loaded: {available})")]
    UnknownBalancer { name: String, available: String },
    #[error("no discovery plugin serves '{scheme}://' (loaded: {available})")]
    UnknownScheme { scheme: String, available: String },
    #[error("{uri:?} is not a URI of the form scheme://...")]
    NotAUri { uri: String },
    #[error("plugin '{plugin}': {message}")]
    Plugin { plugin: String, message: String },
}

/// A registered plugin.
#[derive(Clone, Serialize)]
pub struct LoadedPlugin {
    pub name: String,
    pub kind: &'static str,
    pub version: String,
    pub schemes: Vec<String>,
    pub description: String,
    pub path: PathBuf,
    /// The contract minor the library speaks (`1.1`, `1.0`): what the host can ask of it.
    pub contract: &'static str,
    /// The plugin-api version the library was built against.
    pub plugin_api: String,
    /// Whether new instances of this plugin come from this library; `false` once a newer
    /// version of the plugin was loaded (this one still serves the instances it made).
    pub serving: bool,
    #[serde(skip)]
    module: Module,
    /// What the file was when loaded, to tell on a rescan whether it changed.
    #[serde(skip)]
    file: FileId,
}

/// A file's identity and contents' stamp: a new inode (a package upgrade renames one into
/// place), a new size or a new modification time means a changed library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    device: u64,
    inode: u64,
    size: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        Ok(FileId {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified: meta.modified().ok(),
        })
    }
}

/// What a scan of the plugin directory did.
#[derive(Debug, Default)]
pub struct Scan {
    /// Libraries registered by this scan, as listed (a newer version among them has
    /// `replaced` set to the version it took over from).
    pub loaded: Vec<Registered>,
    /// Files that were not registered, each with the reason.
    pub errors: Vec<PluginLoadError>,
    /// Libraries already loaded and unchanged.
    pub unchanged: usize,
}

/// One library a scan registered.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub name: String,
    pub kind: &'static str,
    pub version: String,
    pub path: PathBuf,
    /// The version of the same plugin that served new instances until now.
    pub replaced: Option<String>,
}

/// A checked root module, as the contract minor its library was built against.
#[derive(Clone, Copy)]
enum Module {
    Current(PluginModRef),
    V1_0(v1_0::PluginModRef),
}

impl Module {
    fn contract(self) -> &'static str {
        match self {
            Module::Current(_) => "1.1",
            Module::V1_0(_) => "1.0",
        }
    }

    fn metadata(self) -> PluginMetadata {
        match self {
            Module::Current(m) => (m.metadata())(),
            Module::V1_0(m) => (m.metadata())(),
        }
    }

    fn install_logger(self, logger: HostLogger) {
        match self {
            Module::Current(m) => (m.install_logger())(logger),
            Module::V1_0(m) => (m.install_logger())(logger),
        }
    }

    fn new_balancer(self, config: BalancerConfig) -> Result<Box<dyn Picker>, PluginError> {
        match self {
            Module::Current(m) => (m.new_balancer())(config)
                .into_result()
                .map(|b| Box::new(b) as Box<dyn Picker>),
            Module::V1_0(m) => (m.new_balancer())(config)
                .into_result()
                .map(|b| Box::new(b) as Box<dyn Picker>),
        }
    }

    fn open_discovery(self, config: DiscoveryConfig) -> Result<DiscoveryBackend, PluginError> {
        match self {
            Module::Current(m) => (m.open_discovery())(config)
                .into_result()
                .map(DiscoveryBackend::Current),
            Module::V1_0(m) => (m.open_discovery())(config)
                .into_result()
                .map(DiscoveryBackend::V1_0),
        }
    }
}

/// An open discovery backend, whichever contract minor its plugin speaks.
pub enum DiscoveryBackend {
    Current(DiscoveryBox),
    V1_0(v1_0::DiscoveryBox),
}

impl DiscoveryBackend {
    /// Starts following `request`; the plugin calls `sink` from its own threads. A 1.0
    /// plugin gets the same sink as a 1.0 one (it never explains what it left out).
    pub fn watch<S: EndpointSink + 'static>(
        &self,
        request: WatchRequest,
        sink: S,
    ) -> Result<WatchHandleBox, PluginError> {
        let sink = abi_stable::std_types::RArc::new(sink);
        let opaque = abi_stable::sabi_trait::TD_Opaque;
        match self {
            DiscoveryBackend::Current(backend) => backend
                .watch(
                    request,
                    embassy_plugin_api::discovery::EndpointSink_TO::from_ptr(sink, opaque),
                )
                .into_result(),
            DiscoveryBackend::V1_0(backend) => backend
                .watch(request, v1_0::EndpointSink_TO::from_ptr(sink, opaque))
                .into_result(),
        }
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("path", &self.path)
            .finish()
    }
}

/// Every plugin that loaded, by name and scheme.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    plugins: Vec<LoadedPlugin>,
    /// Every file refused, as it was then and why: a rescan opens it again only once changed.
    refused: std::collections::HashMap<PathBuf, (FileId, String)>,
}

impl PluginRegistry {
    /// Loads every `*.so` (`*.dylib` on macOS) in `dir`, in file-name order. Files that fail
    /// are returned as errors beside the registry; the others are registered. So is every odd
    /// entry (see [`PluginLoadError::Unusable`]); other files and directories are skipped.
    pub fn load_dir(dir: &Path) -> Result<(PluginRegistry, Vec<PluginLoadError>), PluginDirError> {
        let mut registry = PluginRegistry::default();
        let scan = registry.scan(dir)?;
        Ok((registry, scan.errors))
    }

    /// Scans `dir` (again): registers each library that is new or changed since it was
    /// loaded, as [`PluginRegistry::load_dir`] does; nothing loaded is ever dropped.
    pub fn scan(&mut self, dir: &Path) -> Result<Scan, PluginDirError> {
        let read = |source| PluginDirError {
            dir: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(read)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        paths.sort();
        let mut scan = Scan::default();
        for path in paths {
            let is_library = path
                .extension()
                .is_some_and(|ext| ext == std::env::consts::DLL_EXTENSION);
            let result = match entry_kind(&path) {
                Ok(()) if is_library => self.register_file(&path, &mut scan),
                Err(reason) if is_library || reason.is_broken_link() => {
                    Err(PluginLoadError::Unusable {
                        path,
                        reason: reason.to_string(),
                    })
                }
                _ => {
                    trace!(path = %path.display(), "not a shared library, skipped");
                    Ok(())
                }
            };
            if let Err(error) = result {
                scan.errors.push(error);
            }
        }
        Ok(scan)
    }

    /// Registers `path` unless it is loaded and unchanged; a changed file is loaded from a
    /// private copy (see the module's documentation).
    fn register_file(&mut self, path: &Path, scan: &mut Scan) -> Result<(), PluginLoadError> {
        let unreadable = |error: std::io::Error| PluginLoadError::Unusable {
            path: path.to_path_buf(),
            reason: format!("cannot be read: {error}"),
        };
        let file = FileId::of(path).map_err(unreadable)?;
        if self
            .plugins
            .iter()
            .any(|p| p.path == path && p.file == file)
        {
            scan.unchanged += 1;
            return Ok(());
        }
        if let Some((seen, reason)) = self.refused.get(path) {
            if *seen == file {
                return Err(PluginLoadError::StillRefused {
                    path: path.to_path_buf(),
                    refused: reason.clone(),
                });
            }
        }
        let opened_before =
            self.refused.contains_key(path) || self.plugins.iter().any(|p| p.path == path);
        let registered = if opened_before {
            // The copy's directory goes when this block ends: by then the loader has mapped
            // the file, or refused it.
            let (_dir, copy) = private_copy(path).map_err(unreadable)?;
            self.register(path, &copy, file, scan)
        } else {
            self.register(path, path, file, scan)
        };
        match &registered {
            Ok(()) => {
                self.refused.remove(path);
            }
            Err(error) => {
                self.refused
                    .insert(path.to_path_buf(), (file, error.to_string()));
            }
        }
        registered
    }

    /// Opens `load_from` (the file at `path`, or a copy of it) and registers its plugin.
    fn register(
        &mut self,
        path: &Path,
        load_from: &Path,
        file: FileId,
        scan: &mut Scan,
    ) -> Result<(), PluginLoadError> {
        let (module, plugin_api) = open(path, load_from)?;
        let metadata = module.metadata();
        let plugin = LoadedPlugin {
            name: metadata.name.to_string(),
            kind: metadata.kind.as_str(),
            version: metadata.version.to_string(),
            schemes: metadata.schemes.iter().map(|s| s.to_string()).collect(),
            description: metadata.description.to_string(),
            path: path.to_path_buf(),
            contract: module.contract(),
            plugin_api,
            serving: true,
            module,
            file,
        };
        let replaces = self
            .plugins
            .iter()
            .position(|p| p.serving && p.name == plugin.name);
        if let Some(index) = replaces {
            let first = &self.plugins[index];
            if first.kind != plugin.kind {
                return Err(PluginLoadError::DuplicateName {
                    path: plugin.path,
                    name: plugin.name,
                    first: first.path.clone(),
                });
            }
            match compare_versions(&plugin.version, &first.version) {
                Some(std::cmp::Ordering::Greater) => {}
                Some(std::cmp::Ordering::Less) => {
                    return Err(PluginLoadError::Older {
                        path: plugin.path,
                        name: plugin.name,
                        version: plugin.version,
                        serving: first.version.clone(),
                        first: first.path.clone(),
                    })
                }
                // The same version twice, or versions that cannot be compared.
                _ => {
                    return Err(PluginLoadError::DuplicateName {
                        path: plugin.path,
                        name: plugin.name,
                        first: first.path.clone(),
                    })
                }
            }
        }
        for scheme in &plugin.schemes {
            let taken = self.plugins.iter().enumerate().find(|(index, p)| {
                p.serving && Some(*index) != replaces && p.schemes.contains(scheme)
            });
            if let Some((_, first)) = taken {
                return Err(PluginLoadError::DuplicateScheme {
                    path: plugin.path.clone(),
                    scheme: scheme.clone(),
                    first: first.path.clone(),
                });
            }
        }
        module.install_logger(HostLogger {
            max_level: host_max_level(),
            log: host_log,
        });
        let replaced = replaces.map(|index| {
            let old = &mut self.plugins[index];
            old.serving = false;
            old.version.clone()
        });
        info!(
            plugin = %plugin.name,
            kind = plugin.kind,
            version = %plugin.version,
            contract = plugin.contract,
            path = %plugin.path.display(),
            replaced = replaced.as_deref().unwrap_or("-"),
            "plugin loaded"
        );
        scan.loaded.push(Registered {
            name: plugin.name.clone(),
            kind: plugin.kind,
            version: plugin.version.clone(),
            path: plugin.path.clone(),
            replaced,
        });
        self.plugins.push(plugin);
        Ok(())
    }

    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    /// The balancer plugin called `name`, or an error naming the loaded ones.
    pub fn balancer(&self, name: &str) -> Result<&LoadedPlugin, PluginUseError> {
        self.plugins
            .iter()
            .find(|p| p.serving && p.name == name && p.kind == PluginKind::Balancer.as_str())
            .ok_or_else(|| PluginUseError::UnknownBalancer {
                name: name.to_string(),
                available: self.names(PluginKind::Balancer),
            })
    }

    /// A new balancer instance for one service.
    pub fn new_balancer(
        &self,
        name: &str,
        config: BalancerConfig,
    ) -> Result<Box<dyn Picker>, PluginUseError> {
        let plugin = self.balancer(name)?;
        plugin
            .module
            .new_balancer(config)
            .map_err(|error| PluginUseError::Plugin {
                plugin: plugin.name.clone(),
                message: error.to_string(),
            })
    }

    /// Opens the discovery backend `uri` with the plugin serving its scheme.
    pub fn open_discovery(
        &self,
        uri: &str,
        options: &[(String, String)],
    ) -> Result<DiscoveryBackend, PluginUseError> {
        let scheme = uri
            .split_once("://")
            .map(|(scheme, _)| scheme)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| PluginUseError::NotAUri {
                uri: uri.to_string(),
            })?;
        let plugin = self
            .plugins
            .iter()
            .find(|p| p.serving && p.schemes.iter().any(|s| s == scheme))
            .ok_or_else(|| PluginUseError::UnknownScheme {
                scheme: scheme.to_string(),
                available: self.names(PluginKind::Discovery),
            })?;
        let config = DiscoveryConfig {
            uri: uri.into(),
            options: options
                .iter()
                .map(|(k, v)| Tuple2(k.as_str().into(), v.as_str().into()))
                .collect::<RVec<_>>(),
        };
        plugin
            .module
            .open_discovery(config)
            .map_err(|error| PluginUseError::Plugin {
                plugin: plugin.name.clone(),
                message: error.to_string(),
            })
    }

    fn names(&self, kind: PluginKind) -> String {
        let names: Vec<String> = self
            .plugins
            .iter()
            .filter(|p| p.serving && p.kind == kind.as_str())
            .map(|p| match p.schemes.as_slice() {
                [] => p.name.clone(),
                schemes => format!("{} ({})", p.name, schemes.join(", ")),
            })
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }
}

/// Why a directory entry is not a file a library could be loaded from.
#[derive(Debug)]
enum OddEntry {
    Directory,
    Special,
    DanglingLink,
    LinkLoop,
    Unreadable(std::io::Error),
}

impl OddEntry {
    fn is_broken_link(&self) -> bool {
        matches!(self, OddEntry::DanglingLink | OddEntry::LinkLoop)
    }
}

impl std::fmt::Display for OddEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OddEntry::Directory => f.write_str("a directory, not a library"),
            OddEntry::Special => f.write_str("not a regular file"),
            OddEntry::DanglingLink => f.write_str("a dangling symlink (its target does not exist)"),
            OddEntry::LinkLoop => f.write_str("a symlink loop"),
            OddEntry::Unreadable(error) => write!(f, "cannot be read: {error}"),
        }
    }
}

/// `Ok` for a regular file (after following symlinks).
fn entry_kind(path: &Path) -> Result<(), OddEntry> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) if meta.is_dir() => Err(OddEntry::Directory),
        Ok(_) => Err(OddEntry::Special),
        Err(error) => Err(match error.raw_os_error() {
            Some(libc::ELOOP) => OddEntry::LinkLoop,
            Some(libc::ENOENT) if fs::symlink_metadata(path).is_ok() => OddEntry::DanglingLink,
            _ => OddEntry::Unreadable(error),
        }),
    }
}

/// How `candidate` compares with `loaded` as versions (`None`: one of them is not a
/// version).
fn compare_versions(candidate: &str, loaded: &str) -> Option<std::cmp::Ordering> {
    let candidate = semver::Version::parse(candidate).ok()?;
    let loaded = semver::Version::parse(loaded).ok()?;
    Some(candidate.cmp(&loaded))
}

/// A copy of `path` under a name the loader has not seen: in a fresh directory with a random
/// name that only this user may enter (mkdtemp), removed when the returned guard drops.
fn private_copy(path: &Path) -> std::io::Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix("embassy-plugin-")
        .tempdir()?;
    let copy = dir.path().join(path.file_name().unwrap_or_default());
    fs::copy(path, &copy)?;
    Ok((dir, copy))
}

/// Opens one library (`load_from`: the file at `path`, or a copy of it) and checks it against
/// the contract minor it was built against (the current one for anything newer than 1.0);
/// returns it with its plugin-api version. Errors name `path`.
fn open(path: &Path, load_from: &Path) -> Result<(Module, String), PluginLoadError> {
    let header = lib_header_from_path(load_from).map_err(|error| match error {
        LibraryError::GetSymbolError { .. } => PluginLoadError::NotAPlugin {
            path: path.to_path_buf(),
        },
        LibraryError::OpenError { err, .. } => PluginLoadError::NotALibrary {
            path: path.to_path_buf(),
            reason: err.to_string(),
        },
        other => incompatible(path, "unknown".to_string(), "1.1", &other),
    })?;
    let plugin_api = header.version_strings().version.to_string();
    let checked = if built_against_1_0(&plugin_api) {
        "1.0"
    } else {
        "1.1"
    };
    let refused = |error| match error {
        LibraryError::RootModule { err, .. } => PluginLoadError::InitFailed {
            path: path.to_path_buf(),
            reason: err.to_string(),
        },
        other => incompatible(path, plugin_api.clone(), checked, &other),
    };
    let module = if checked == "1.0" {
        header
            .init_root_module::<v1_0::PluginModRef>()
            .map(Module::V1_0)
    } else {
        header
            .init_root_module::<PluginModRef>()
            .map(Module::Current)
    };
    Ok((module.map_err(refused)?, plugin_api))
}

/// Whether `version` (the library's plugin-api) is a 1.0.x: such a library is checked against
/// the 1.0 interfaces, anything else against the current ones (whose check then says what
/// differs from this host's contract).
fn built_against_1_0(version: &str) -> bool {
    let mut parts = version.split('.');
    parts.next() == Some("1") && parts.next() == Some("0")
}

fn incompatible(
    path: &Path,
    plugin_api: String,
    checked: &'static str,
    error: &LibraryError,
) -> PluginLoadError {
    let detail = error.to_string();
    PluginLoadError::Incompatible {
        path: path.to_path_buf(),
        plugin_api,
        checked,
        summary: summarize(&detail),
        detail,
    }
}

/// Condenses abi_stable's report (`Error:<what>` / `Expected:` / `<a>` / `Found:` / `<b>`
/// blocks among hundreds of layout lines) into one line of its distinct findings.
fn summarize(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let mut findings: Vec<String> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some(what) = line.strip_prefix("Error:") else {
            continue;
        };
        let finding = match lines.get(index + 1..index + 5) {
            Some(["Expected:", expected, "Found:", found]) => {
                format!("{what} (expected {expected}, found {found})")
            }
            _ => what.to_string(),
        };
        if !findings.contains(&finding) {
            findings.push(finding);
        }
    }
    if findings.is_empty() {
        return lines
            .into_iter()
            .find(|l| !l.is_empty())
            .unwrap_or("layout mismatch")
            .to_string();
    }
    findings.truncate(4);
    findings.join("; ")
}

/// Logs a load error: one line, plus abi_stable's full report at debug level.
pub fn log_load_error(error: &PluginLoadError) {
    if let PluginLoadError::Unusable { .. } | PluginLoadError::StillRefused { .. } = error {
        warn!("{error}");
        return;
    }
    error!("{error}; other plugins are unaffected");
    if let PluginLoadError::Incompatible { detail, .. } = error {
        debug!("full compatibility report:\n{detail}");
    }
}

fn host_max_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}

/// The logging callback handed to every plugin.
extern "C" fn host_log(level: LogLevel, plugin: RStr<'_>, target: RStr<'_>, message: RStr<'_>) {
    let (plugin, target, message) = (plugin.as_str(), target.as_str(), message.as_str());
    match level {
        LogLevel::Error => error!(target: "plugin", plugin, module = target, "{message}"),
        LogLevel::Warn => warn!(target: "plugin", plugin, module = target, "{message}"),
        LogLevel::Info => info!(target: "plugin", plugin, module = target, "{message}"),
        LogLevel::Debug => debug!(target: "plugin", plugin, module = target, "{message}"),
        LogLevel::Trace => trace!(target: "plugin", plugin, module = target, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering::{Equal, Greater, Less};

    use super::*;

    fn check(candidate: &str, loaded: &str, expected: Option<std::cmp::Ordering>) {
        assert_eq!(
            compare_versions(candidate, loaded),
            expected,
            "{candidate} vs {loaded}"
        );
    }

    #[test]
    fn versions_compare_as_semver() {
        check("0.2.0", "0.1.0", Some(Greater));
        check("0.10.0", "0.9.3", Some(Greater));
        check("1.0.0", "1.0.0-rc.1", Some(Greater));
        check("0.1.0", "0.1.0", Some(Equal));
        check("0.1.0", "0.2.0", Some(Less));
        check("2", "1.0.0", None);
        check("0.1.0", "latest", None);
    }
}
