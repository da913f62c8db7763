//! Least connections: each new connection goes to the endpoint with the fewest open ones.
//!
//! Up to [`EXACT_LIMIT`] endpoints the choice is exact: one pass, ties broken by a rotating
//! start position so idle endpoints share new connections in turn. Above that a full scan per
//! connection costs microseconds, so the policy samples two endpoints and takes the less
//! loaded ("power of two choices", as Envoy and linkerd do): O(1), and it never picks the
//! most loaded endpoint. No allocation, no lock either way.

use std::sync::atomic::{AtomicUsize, Ordering};

use embassy_plugin_api::{
    export_balancer, BalancerConfig, BalancerPlugin, EndpointView, PluginError,
};

/// Largest endpoint count scanned exactly.
pub const EXACT_LIMIT: usize = 64;

pub struct LeastConn {
    rotation: AtomicUsize,
}

impl BalancerPlugin for LeastConn {
    const NAME: &'static str = "least-conn";
    const DESCRIPTION: &'static str =
        "each new connection goes to the endpoint with the fewest open connections";

    fn new(_: &BalancerConfig) -> Result<Self, PluginError> {
        Ok(LeastConn {
            rotation: AtomicUsize::new(0),
        })
    }

    fn pick(&self, endpoints: &[EndpointView]) -> Option<usize> {
        let len = endpoints.len();
        if len == 0 {
            return None;
        }
        let turn = self.rotation.fetch_add(1, Ordering::Relaxed);
        if len > EXACT_LIMIT {
            return two_choices(endpoints, turn);
        }
        let start = turn % len;
        // Two plain slices instead of a modulo per step: this loop is the whole cost.
        let mut best: Option<(usize, Load)> = None;
        for (base, part) in [(start, &endpoints[start..]), (0, &endpoints[..start])] {
            for (offset, view) in part.iter().enumerate() {
                if !view.healthy {
                    continue;
                }
                let load = Load::of(view);
                if load.active == 0 {
                    return Some(base + offset); // nothing beats an idle endpoint
                }
                if best.is_none_or(|(_, best)| load.less_than(best)) {
                    best = Some((base + offset, load));
                }
            }
        }
        best.map(|(index, _)| index)
    }
}

/// An endpoint's live connections and weight, read once.
#[derive(Clone, Copy)]
struct Load {
    active: u64,
    weight: u64,
}

impl Load {
    fn of(view: &EndpointView) -> Load {
        Load {
            active: view.active_connections(),
            weight: u64::from(view.weight.max(1)),
        }
    }

    /// `active / weight` below the other's, without dividing.
    fn less_than(self, other: Load) -> bool {
        self.active.saturating_mul(other.weight) < other.active.saturating_mul(self.weight)
    }
}

/// Two distinct pseudo-random endpoints (splitmix64 of the turn), the less loaded one wins.
fn two_choices(endpoints: &[EndpointView], turn: usize) -> Option<usize> {
    let len = endpoints.len();
    let mut z = (turn as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let a = (z as usize) % len;
    let b = (a + 1 + ((z >> 32) as usize) % (len - 1)) % len;
    let (first, second) = (&endpoints[a], &endpoints[b]);
    Some(match (first.healthy, second.healthy) {
        (true, true) if Load::of(second).less_than(Load::of(first)) => b,
        (true, _) => a,
        (false, true) => b,
        (false, false) => return None,
    })
}

export_balancer!(LeastConn);

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn pick(loads: &[u64]) -> Vec<usize> {
        picks(loads, 4)
    }

    fn picks(loads: &[u64], n: usize) -> Vec<usize> {
        let counters: Vec<AtomicU64> = loads.iter().map(|&n| AtomicU64::new(n)).collect();
        // SAFETY: `counters` outlives `views`.
        let views: Vec<EndpointView> = counters
            .iter()
            .map(|c| unsafe { EndpointView::new(c, 1, true) })
            .collect();
        let policy = LeastConn {
            rotation: AtomicUsize::new(0),
        };
        (0..n).filter_map(|_| policy.pick(&views)).collect()
    }

    #[test]
    fn prefers_the_least_loaded_and_rotates_among_equals() {
        assert_eq!(pick(&[5, 0, 3]), vec![1, 1, 1, 1]);
        assert_eq!(pick(&[2, 1, 1]), vec![1, 1, 2, 1]);
        assert_eq!(pick(&[0, 0]), vec![0, 1, 0, 1]);
        assert_eq!(pick(&[]), Vec::<usize>::new());
    }

    #[test]
    fn beyond_the_exact_limit_two_choices_never_pick_the_most_loaded() {
        let mut loads = vec![1u64; 200];
        loads[17] = 50;
        let picked = picks(&loads, 2000);
        assert_eq!(picked.len(), 2000);
        assert!(!picked.contains(&17));
        let distinct: std::collections::HashSet<_> = picked.iter().collect();
        assert!(
            distinct.len() > 150,
            "spread over the endpoints: {}",
            distinct.len()
        );
    }
}
