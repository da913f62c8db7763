//! Least connections: each new connection goes to the endpoint with the fewest open ones.
//!
//! Ties are broken by a rotating start position, so idle endpoints share new connections in
//! turn rather than the first one taking them all. One pass over the endpoints, no allocation.

use std::sync::atomic::{AtomicUsize, Ordering};

use embassy_plugin_api::{
    export_balancer, BalancerConfig, BalancerPlugin, EndpointView, PluginError,
};

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
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % len;
        let mut best: Option<(usize, u64)> = None;
        for offset in 0..len {
            let index = (start + offset) % len;
            let view = &endpoints[index];
            if !view.healthy {
                continue;
            }
            // Weighted: compare active/weight without dividing (active_a * w_b < active_b * w_a).
            let load = view.active_connections();
            let better = match best {
                None => true,
                Some((best_index, best_load)) => {
                    u128::from(load) * u128::from(endpoints[best_index].weight.max(1))
                        < u128::from(best_load) * u128::from(view.weight.max(1))
                }
            };
            if better {
                best = Some((index, load));
                if load == 0 {
                    break; // nothing beats an idle endpoint
                }
            }
        }
        best.map(|(index, _)| index)
    }
}

export_balancer!(LeastConn);

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn pick(loads: &[u64]) -> Vec<usize> {
        let counters: Vec<AtomicU64> = loads.iter().map(|&n| AtomicU64::new(n)).collect();
        // SAFETY: `counters` outlives `views`.
        let views: Vec<EndpointView> = counters
            .iter()
            .map(|c| unsafe { EndpointView::new(c, 1, true) })
            .collect();
        let policy = LeastConn {
            rotation: AtomicUsize::new(0),
        };
        (0..4).filter_map(|_| policy.pick(&views)).collect()
    }

    #[test]
    fn prefers_the_least_loaded_and_rotates_among_equals() {
        assert_eq!(pick(&[5, 0, 3]), vec![1, 1, 1, 1]);
        assert_eq!(pick(&[2, 1, 1]), vec![1, 1, 2, 1]);
        assert_eq!(pick(&[0, 0]), vec![0, 1, 0, 1]);
        assert_eq!(pick(&[]), Vec::<usize>::new());
    }
}
