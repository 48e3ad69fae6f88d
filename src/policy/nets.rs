//! Address matcher for CIDR and service-tag rules.
//!
//! At compile time every (range, rule) pair is swept into disjoint, sorted segments, each carrying
//! the set of rules that contain it. A lookup is one binary search, whatever the number of ranges.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use super::decision::RuleId;

/// Maps an address to the rules whose ranges contain it.
#[derive(Debug, Default)]
pub struct RangeIndex {
    v4: Segments<u32>,
    v6: Segments<u128>,
    /// Interned rule sets, each sorted ascending; segments refer to them by index.
    sets: Vec<Box<[RuleId]>>,
}

#[derive(Debug)]
struct Segments<T> {
    starts: Vec<T>,
    /// Inclusive end and rule-set index of the segment at the same position in `starts`.
    ends: Vec<(T, u32)>,
    /// `buckets[p]` is the index of the first segment starting at or after the 16-bit prefix `p`,
    /// so a lookup binary-searches only the few segments that start under its own prefix.
    buckets: Vec<u32>,
}

impl<T> Default for Segments<T> {
    fn default() -> Self {
        Self { starts: Vec::new(), ends: Vec::new(), buckets: Vec::new() }
    }
}

impl RangeIndex {
    /// Builds the index from every range of every rule.
    pub fn build(ranges: impl IntoIterator<Item = (IpNet, RuleId)>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, rule) in ranges {
            match net.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()), rule)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()), rule)),
            }
        }
        let mut interner = Interner::default();
        let v4 = sweep(v4, &mut interner);
        let v6 = sweep(v6, &mut interner);
        Self { v4, v6, sets: interner.sets }
    }

    /// The rules whose ranges contain `ip`, ascending. Does not allocate.
    pub fn lookup(&self, ip: IpAddr) -> &[RuleId] {
        let set = match ip {
            IpAddr::V4(v4) => self.v4.find(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.find(u128::from(v6)),
        };
        match set.and_then(|i| self.sets.get(i as usize)) {
            Some(rules) => rules,
            None => &[],
        }
    }

    /// The number of disjoint segments, for `validate` and benchmarks.
    pub fn segment_count(&self) -> usize {
        self.v4.starts.len() + self.v6.starts.len()
    }
}

impl<T: Addr> Segments<T> {
    fn find(&self, x: T) -> Option<u32> {
        let p = x.bucket();
        let lo = *self.buckets.get(p)? as usize;
        let hi = *self.buckets.get(p + 1)? as usize;
        let within = self.starts.get(lo..hi)?.partition_point(|&s| s <= x);
        let i = (lo + within).checked_sub(1)?;
        let &(end, set) = self.ends.get(i)?;
        (x <= end).then_some(set)
    }

    fn index_buckets(&mut self) {
        let count = |p: usize| u32::try_from(self.starts.partition_point(|s| s.bucket() < p)).unwrap_or(u32::MAX);
        self.buckets = (0..=BUCKETS).map(count).collect();
    }
}

#[derive(Default)]
struct Interner {
    sets: Vec<Box<[RuleId]>>,
    ids: FxHashMap<Box<[RuleId]>, u32>,
}

impl Interner {
    fn intern(&mut self, rules: &BTreeMap<RuleId, u32>) -> u32 {
        let key: Box<[RuleId]> = rules.keys().copied().collect();
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        self.sets.push(key.clone());
        self.ids.insert(key, id);
        id
    }
}

/// Integer address types: one step up, with `None` past the top of the space.
trait Addr: Copy + Ord {
    const MAX: Self;
    /// The top 16 bits.
    fn bucket(self) -> usize;
    fn next(self) -> Option<Self>;
    fn prev(self) -> Self;
}

impl Addr for u32 {
    const MAX: Self = u32::MAX;
    fn bucket(self) -> usize {
        (self >> 16) as usize
    }
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Self {
        self.saturating_sub(1)
    }
}

impl Addr for u128 {
    const MAX: Self = u128::MAX;
    fn bucket(self) -> usize {
        (self >> 112) as usize
    }
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Self {
        self.saturating_sub(1)
    }
}

/// Sweeps inclusive ranges into disjoint segments, merging neighbours that carry the same rules.
fn sweep<T: Addr>(ranges: Vec<(T, T, RuleId)>, interner: &mut Interner) -> Segments<T> {
    // Events at each boundary: +1 for a rule starting there, -1 for one that ended just before.
    let mut events: BTreeMap<T, Vec<(RuleId, i32)>> = BTreeMap::new();
    for (start, end, rule) in ranges {
        events.entry(start).or_default().push((rule, 1));
        if let Some(after) = end.next() {
            events.entry(after).or_default().push((rule, -1));
        }
    }
    let mut out: Segments<T> = Segments::default();
    let mut active: BTreeMap<RuleId, u32> = BTreeMap::new();
    let points: Vec<T> = events.keys().copied().collect();
    for (i, point) in points.iter().enumerate() {
        for &(rule, delta) in events.get(point).map(Vec::as_slice).unwrap_or_default() {
            let count = active.entry(rule).or_insert(0);
            *count = count.saturating_add_signed(delta);
            if *count == 0 {
                active.remove(&rule);
            }
        }
        if active.is_empty() {
            continue;
        }
        // Past the last boundary only a range that runs to the top of the space is still open.
        let end = points.get(i + 1).map_or(T::MAX, |next| next.prev());
        let set = interner.intern(&active);
        let merged = matches!(out.ends.last(), Some(&(prev_end, prev_set)) if prev_set == set && prev_end.next() == Some(*point));
        if merged {
            if let Some(last) = out.ends.last_mut() {
                last.0 = end;
            }
        } else {
            out.starts.push(*point);
            out.ends.push((end, set));
        }
    }
    out.index_buckets();
    out
}

const BUCKETS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(ranges: &[(&str, u32)]) -> RangeIndex {
        RangeIndex::build(ranges.iter().map(|(n, r)| (n.parse().unwrap(), RuleId(*r))))
    }

    fn rules(i: &RangeIndex, ip: &str) -> Vec<u32> {
        i.lookup(ip.parse().unwrap()).iter().map(|r| r.0).collect()
    }

    #[test]
    fn finds_every_rule_containing_an_address_at_the_boundaries() {
        let i = idx(&[("20.0.0.0/16", 0), ("20.0.1.0/24", 1), ("20.0.2.0/24", 0), ("2603:1000::/24", 2)]);
        assert_eq!(rules(&i, "19.255.255.255"), Vec::<u32>::new());
        assert_eq!(rules(&i, "20.0.0.0"), vec![0]);
        assert_eq!(rules(&i, "20.0.1.0"), vec![0, 1]);
        assert_eq!(rules(&i, "20.0.1.255"), vec![0, 1]);
        assert_eq!(rules(&i, "20.0.2.0"), vec![0]);
        assert_eq!(rules(&i, "20.0.255.255"), vec![0]);
        assert_eq!(rules(&i, "20.1.0.0"), Vec::<u32>::new());
        assert_eq!(rules(&i, "2603:10ff::1"), vec![2]);
        assert_eq!(rules(&i, "2603:1100::"), Vec::<u32>::new());
    }

    #[test]
    fn handles_the_whole_space_and_its_top() {
        let i = idx(&[("0.0.0.0/0", 3), ("255.255.255.255/32", 4), ("::/0", 5)]);
        assert_eq!(rules(&i, "0.0.0.0"), vec![3]);
        assert_eq!(rules(&i, "255.255.255.254"), vec![3]);
        assert_eq!(rules(&i, "255.255.255.255"), vec![3, 4]);
        assert_eq!(rules(&i, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), vec![5]);
    }

    #[test]
    fn merges_adjacent_ranges_of_the_same_rule() {
        let i = idx(&[("10.0.0.0/25", 0), ("10.0.0.128/25", 0)]);
        assert_eq!(i.segment_count(), 1);
    }
}
