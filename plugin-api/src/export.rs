//! The glue between a plugin's Rust code and the root module.
//!
//! Every `extern "C"` entry point and every trait-object method runs the plugin's code inside
//! `catch_unwind`: a panic that unwound across the boundary would abort the host.

use std::{
    mem::ManuallyDrop,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{ROption, RResult, RSlice, RString},
};
use tracing_subscriber::{layer::SubscriberExt, Registry};

use crate::{
    balancer::Balancer_TO,
    discovery::{Discovery_TO, WatchHandle_TO},
    logging::ForwardToHost,
    Balancer, BalancerBox, BalancerConfig, BalancerPlugin, ClientAddress, Discovery, DiscoveryBox,
    DiscoveryConfig, DiscoveryPlugin, EndpointSinkBox, EndpointView, HostLogger, HostSink,
    PluginError, PluginKind, PluginMetadata, PluginMod, PluginModRef, WatchHandle, WatchHandleBox,
    WatchRequest,
};

/// Exports a [`BalancerPlugin`] as this library's root module.
///
/// The plugin crate must be a `cdylib` and depend on `abi_stable` directly.
#[macro_export]
macro_rules! export_balancer {
    ($plugin:ty) => {
        #[::abi_stable::export_root_module]
        pub fn embassy_plugin_root_module() -> $crate::PluginModRef {
            $crate::export::balancer_module::<$plugin>(env!("CARGO_PKG_VERSION"))
        }
    };
}

/// Exports a [`DiscoveryPlugin`] as this library's root module.
///
/// The plugin crate must be a `cdylib` and depend on `abi_stable` directly.
#[macro_export]
macro_rules! export_discovery {
    ($plugin:ty) => {
        #[::abi_stable::export_root_module]
        pub fn embassy_plugin_root_module() -> $crate::PluginModRef {
            $crate::export::discovery_module::<$plugin>(env!("CARGO_PKG_VERSION"))
        }
    };
}

/// Who this library is; each plugin library has its own copy of this static.
struct Identity {
    name: &'static str,
    kind: PluginKind,
    version: &'static str,
    schemes: &'static [&'static str],
    description: &'static str,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();

fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| Identity {
        name: "unknown",
        kind: PluginKind::Balancer,
        version: "0.0.0",
        schemes: &[],
        description: "",
    })
}

/// Builds the root module of a balancer plugin (used by [`export_balancer!`]).
pub fn balancer_module<P: BalancerPlugin>(version: &'static str) -> PluginModRef {
    let _ = IDENTITY.set(Identity {
        name: P::NAME,
        kind: PluginKind::Balancer,
        version,
        schemes: &[],
        description: P::DESCRIPTION,
    });
    PluginMod {
        metadata,
        install_logger,
        new_balancer: new_balancer::<P>,
        open_discovery: not_a_discovery,
    }
    .leak_into_prefix()
}

/// Builds the root module of a discovery plugin (used by [`export_discovery!`]).
pub fn discovery_module<P: DiscoveryPlugin>(version: &'static str) -> PluginModRef {
    let _ = IDENTITY.set(Identity {
        name: P::NAME,
        kind: PluginKind::Discovery,
        version,
        schemes: P::SCHEMES,
        description: P::DESCRIPTION,
    });
    PluginMod {
        metadata,
        install_logger,
        new_balancer: not_a_balancer,
        open_discovery: open_discovery::<P>,
    }
    .leak_into_prefix()
}

/// Runs `f`, turning a panic into a [`PluginError`].
fn guarded<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.into(),
        Err(payload) => RResult::RErr(PluginError::from_panic(payload.as_ref())),
    }
}

extern "C" fn metadata() -> PluginMetadata {
    let id = identity();
    PluginMetadata {
        name: id.name.into(),
        kind: id.kind,
        version: id.version.into(),
        schemes: id.schemes.iter().map(|s| RString::from(*s)).collect(),
        description: id.description.into(),
    }
}

extern "C" fn install_logger(logger: HostLogger) {
    let layer = ForwardToHost {
        logger,
        plugin: identity().name,
    };
    // A second call (the host loading the same file twice) keeps the first logger.
    let _ =
        catch_unwind(|| tracing::subscriber::set_global_default(Registry::default().with(layer)));
}

extern "C" fn not_a_balancer(_: BalancerConfig) -> RResult<BalancerBox, PluginError> {
    RResult::RErr(PluginError::new(format!(
        "plugin '{}' is a discovery plugin, not a balancer",
        identity().name
    )))
}

extern "C" fn not_a_discovery(_: DiscoveryConfig) -> RResult<DiscoveryBox, PluginError> {
    RResult::RErr(PluginError::new(format!(
        "plugin '{}' is a balancer, not a discovery plugin",
        identity().name
    )))
}

extern "C" fn new_balancer<P: BalancerPlugin>(
    config: BalancerConfig,
) -> RResult<BalancerBox, PluginError> {
    guarded(|| {
        P::new(&config).map(|policy| Balancer_TO::from_value(Guarded::new(policy), TD_Opaque))
    })
}

extern "C" fn open_discovery<P: DiscoveryPlugin>(
    config: DiscoveryConfig,
) -> RResult<DiscoveryBox, PluginError> {
    guarded(|| {
        P::open(&config).map(|backend| Discovery_TO::from_value(Guarded::new(backend), TD_Opaque))
    })
}

/// A plugin's value behind the ABI trait objects, with panics caught (its destructor too).
struct Guarded<T>(ManuallyDrop<T>);

impl<T> Guarded<T> {
    fn new(value: T) -> Self {
        Guarded(ManuallyDrop::new(value))
    }
}

impl<P: BalancerPlugin> Balancer for Guarded<P> {
    fn pick(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<ROption<usize>, PluginError> {
        // Only a host older than 1.1 calls this one.
        if P::NEEDS_CONTRACT_1_1 && !OLDER_HOST_NOTED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "this host predates plugin-api 1.1 (no client address at pick, no set-change hook): '{}' falls back to its plain pick",
                P::NAME
            );
        }
        guarded(|| Ok(self.0.pick(endpoints.as_slice()).into()))
    }

    #[inline]
    fn pick_for(
        &self,
        endpoints: RSlice<'_, EndpointView>,
        client: ClientAddress,
    ) -> RResult<ROption<usize>, PluginError> {
        guarded(|| Ok(self.0.pick_for(endpoints.as_slice(), client).into()))
    }

    fn endpoints_changed(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<(), PluginError> {
        guarded(|| {
            self.0.endpoints_changed(endpoints.as_slice());
            Ok(())
        })
    }
}

/// Whether a balancer of this library has said it runs degraded in an older host.
static OLDER_HOST_NOTED: AtomicBool = AtomicBool::new(false);

impl<P: DiscoveryPlugin> Discovery for Guarded<P> {
    fn watch(
        &self,
        request: WatchRequest,
        sink: EndpointSinkBox,
    ) -> RResult<WatchHandleBox, PluginError> {
        guarded(|| {
            let watch = self.0.watch(request, HostSink::new(sink))?;
            Ok(WatchHandle_TO::from_value(
                Guarded::new(Some(watch)),
                TD_Opaque,
            ))
        })
    }
}

impl<W: Send + Sync + 'static> WatchHandle for Guarded<Option<W>> {
    fn stop(&mut self) {
        let watch = self.0.take();
        if catch_unwind(AssertUnwindSafe(move || drop(watch))).is_err() {
            tracing::error!("stopping a watch panicked");
        }
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        // The plugin's destructor runs behind an `extern "C"` drop shim: keep it from unwinding.
        // SAFETY: taken exactly once, here, and never touched again.
        let inner = unsafe { ManuallyDrop::take(&mut self.0) };
        if catch_unwind(AssertUnwindSafe(move || drop(inner))).is_err() {
            tracing::error!("a plugin destructor panicked");
        }
    }
}

/// Moved to [`crate::support::thread`]; kept here for plugins written against 1.0.
pub use crate::support::spawn_watch_thread;
