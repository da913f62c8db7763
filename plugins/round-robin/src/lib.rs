//! Round robin: each new connection goes to the next endpoint in turn, in proportion to the
//! endpoints' weights.
//!
//! One counter per service instance, advanced with a relaxed `fetch_add`: the host picks in
//! each listener's accept loop, so the counter is not contended across threads. With equal
//! weights (the common case) the pick is the counter modulo the set's length. With unequal
//! ones it indexes a sequence built in `endpoints_changed`: nginx's smooth weighted round robin
//! played out once (weights {5, 1, 1} give a a b a c a a), so heavy endpoints get their
//! share spread out rather than in bursts. The sequence is published through an `ArcSwap`;
//! the pick stays O(1), with no lock and no allocation.

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use arc_swap::ArcSwapOption;
use embassy_plugin_api::{
    export_balancer, BalancerConfig, BalancerPlugin, EndpointView, PluginError,
};

/// Longest sequence built. Weights are first divided by their gcd; a set whose weights still
/// sum to more is scaled down proportionally (each endpoint keeping at least 1), which keeps
/// every ratio to within 1 part in `MAX_SEQUENCE / N` and bounds both the sequence's memory
/// (16 KiB) and its build (`MAX_SEQUENCE × N` steps, off the connection path).
pub const MAX_SEQUENCE: usize = 4096;

/// The smooth weighted order for one endpoint set.
#[derive(Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Endpoint indices, one per turn.
    order: Box<[u32]>,
    /// The size of the set it was built for.
    endpoints: usize,
}

impl Sequence {
    /// The sequence for `weights`, or `None` when they are all equal (plain rotation is the
    /// same order without a table).
    pub fn build(weights: &[u32]) -> Option<Sequence> {
        let first = *weights.first()?;
        if weights.iter().all(|&w| w == first) {
            return None;
        }
        let weights = scaled(weights);
        let total: u64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, weight) in weights.iter().enumerate() {
                current[i] += *weight as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total as i64;
            // `best` indexes `weights`, whose length fits u32 (`scaled` caps it).
            order.push(best as u32);
        }
        Some(Sequence {
            order: order.into_boxed_slice(),
            endpoints: weights.len(),
        })
    }

    /// The endpoint for turn `turn` over a set of `len` endpoints.
    #[inline]
    fn pick(&self, turn: usize, len: usize) -> usize {
        if self.endpoints == len {
            self.order[turn % self.order.len()] as usize
        } else {
            // A pick over another set than the sequence's (a connection that loaded the
            // previous snapshot): plain rotation.
            turn % len
        }
    }
}

/// `weights` divided by their gcd and, if they still sum past [`MAX_SEQUENCE`], scaled to
/// about that sum, none below 1.
fn scaled(weights: &[u32]) -> Vec<u64> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let reduced: Vec<u64> = weights
        .iter()
        .map(|&w| u64::from(w.max(1) / divisor))
        .collect();
    let total: u64 = reduced.iter().sum();
    let cap = MAX_SEQUENCE as u64;
    if total <= cap {
        return reduced;
    }
    reduced.iter().map(|&w| (w * cap / total).max(1)).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub struct RoundRobin {
    next: AtomicUsize,
    /// True while the current set has unequal weights, so equal ones never load `sequence`.
    weighted: AtomicBool,
    sequence: ArcSwapOption<Sequence>,
}

impl BalancerPlugin for RoundRobin {
    const NAME: &'static str = "round-robin";
    const DESCRIPTION: &'static str =
        "each new connection goes to the next endpoint in turn (smooth weighted)";
    /// Weights need the 1.1 set-change hook; a 1.0 host gets plain rotation.
    const NEEDS_CONTRACT_1_1: bool = true;

    fn new(_: &BalancerConfig) -> Result<Self, PluginError> {
        Ok(RoundRobin {
            next: AtomicUsize::new(0),
            weighted: AtomicBool::new(false),
            sequence: ArcSwapOption::empty(),
        })
    }

    #[inline]
    fn pick(&self, endpoints: &[EndpointView]) -> Option<usize> {
        let len = endpoints.len();
        if len == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.weighted.load(Ordering::Relaxed) {
            if let Some(sequence) = self.sequence.load().as_deref() {
                return Some(sequence.pick(turn, len));
            }
        }
        Some(turn % len)
    }

    fn endpoints_changed(&self, endpoints: &[EndpointView]) {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let sequence = Sequence::build(&weights);
        let weighted = sequence.is_some();
        // Either order is safe for a pick in between: a sequence of another length falls
        // back to rotation.
        self.sequence.store(sequence.map(Arc::new));
        self.weighted.store(weighted, Ordering::Relaxed);
    }
}

export_balancer!(RoundRobin);

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn order(weights: &[u32]) -> Option<Vec<u32>> {
        Sequence::build(weights).map(|s| s.order.into_vec())
    }

    #[test]
    fn sequences_are_smooth_and_proportional() {
        let check = |weights: &[u32], expected: Option<&[u32]>| {
            assert_eq!(order(weights).as_deref(), expected, "weights {weights:?}");
        };
        // nginx's example: a a b a c a a.
        check(&[5, 1, 1], Some(&[0, 0, 1, 0, 2, 0, 0]));
        check(&[2, 1], Some(&[0, 1, 0]));
        check(&[1, 3], Some(&[1, 0, 1, 1]));
        // Divided by the gcd first: 10, 20 is 1, 2.
        check(&[10, 20], Some(&[1, 0, 1]));
        check(&[500, 100, 100], order(&[5, 1, 1]).as_deref());
        // Equal weights: no sequence, plain rotation.
        check(&[1, 1, 1], None);
        check(&[7, 7], None);
        check(&[3], None);
        check(&[], None);
    }

    #[test]
    fn large_weights_are_scaled_to_the_cap_keeping_their_ratios() {
        let weights = [1_000_000, 3_000_000, 1];
        let sequence = order(&weights).expect("a sequence");
        assert!(sequence.len() <= MAX_SEQUENCE + weights.len());
        let count = |i: u32| sequence.iter().filter(|&&e| e == i).count();
        assert_eq!(count(2), 1, "the lightest keeps a turn");
        let ratio = count(1) as f64 / count(0) as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{ratio}");
        // Counts are proportional in every sequence.
        let weights = [5, 3, 2, 7];
        let sequence = order(&weights).expect("a sequence");
        for (i, w) in weights.iter().enumerate() {
            assert_eq!(count_of(&sequence, i), *w as usize);
        }
    }

    fn count_of(sequence: &[u32], i: usize) -> usize {
        sequence.iter().filter(|&&e| e as usize == i).count()
    }

    fn views(counters: &[AtomicU64], weights: &[u32]) -> Vec<EndpointView> {
        counters
            .iter()
            .zip(weights)
            // SAFETY: the counters outlive the views in every test.
            .map(|(c, &w)| unsafe { EndpointView::new(c, w, true) })
            .collect()
    }

    fn balancer() -> RoundRobin {
        RoundRobin::new(&BalancerConfig {
            service: "test".into(),
            options: Default::default(),
        })
        .expect("new")
    }

    fn picks(b: &RoundRobin, set: &[EndpointView], n: usize) -> Vec<usize> {
        (0..n).map(|_| b.pick(set).expect("a pick")).collect()
    }

    #[test]
    fn picks_follow_the_weights_of_the_current_set() {
        let counters: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let b = balancer();
        // Before any set change (or in a 1.0 host): plain rotation.
        let equal = views(&counters, &[1, 1, 1]);
        assert_eq!(picks(&b, &equal, 6), [0, 1, 2, 0, 1, 2]);

        let weighted = views(&counters, &[5, 1, 1]);
        b.endpoints_changed(&weighted);
        let turns = picks(&b, &weighted, 700);
        assert_eq!(
            [0, 1, 2].map(|i| turns.iter().filter(|&&t| t == i).count()),
            [500, 100, 100]
        );
        let start = turns.iter().position(|&t| t == 1).expect("b is picked") - 2;
        assert_eq!(turns[start..start + 7], [0, 0, 1, 0, 2, 0, 0]);

        // A pick over the previous set of another length: plain rotation, in range.
        let previous = views(&counters[..2], &[1, 1]);
        let turns = picks(&b, &previous, 4);
        assert!(turns == [0, 1, 0, 1] || turns == [1, 0, 1, 0], "{turns:?}");

        // Back to equal weights: rotation again.
        b.endpoints_changed(&equal);
        let turns = picks(&b, &equal, 6);
        assert!(
            turns.windows(2).all(|w| w[1] == (w[0] + 1) % 3),
            "{turns:?}"
        );
        assert_eq!(b.pick(&[]), None);
    }
}
