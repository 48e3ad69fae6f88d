//! The ports of a rule, and the one way they are written out (`validate`, `/policy`, nftables).

use std::fmt;
use std::ops::RangeInclusive;

use crate::config::PortRange;

/// The ports a rule applies to: ports and inclusive ranges in the order the file gives them, never
/// empty. Shown the way the file writes them: `443`, `80,443`, `8000-8080`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PortSet(Box<[PortRange]>);

impl PortSet {
    /// `None` for an empty list, which would match nothing.
    pub fn new(ranges: Vec<PortRange>) -> Option<Self> {
        (!ranges.is_empty()).then(|| Self(ranges.into_boxed_slice()))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|PortRange(r)| r.contains(&port))
    }

    /// Each port or range, shown as `443` or `8000-8080`.
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    /// The ranges as numbers; a single port is `443..=443`.
    pub fn iter(&self) -> impl Iterator<Item = &RangeInclusive<u16>> {
        self.0.iter().map(|PortRange(r)| r)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            range.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[RangeInclusive<u16>]) -> PortSet {
        PortSet::new(ranges.iter().cloned().map(PortRange).collect()).unwrap()
    }

    #[test]
    fn shown_as_the_file_writes_them() {
        assert_eq!(set(&[443..=443]).to_string(), "443");
        assert_eq!(set(&[80..=80, 443..=443]).to_string(), "80,443");
        assert_eq!(set(&[8000..=8080]).to_string(), "8000-8080");
        let ranges: Vec<String> = set(&[53..=53, 6000..=6001]).ranges().iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["53", "6000-6001"]);
    }

    #[test]
    fn contains_any_of_its_ranges_and_is_never_empty() {
        let s = set(&[80..=80, 8000..=8080]);
        assert!(s.contains(80) && s.contains(8000) && s.contains(8080));
        assert!(!s.contains(443) && !s.contains(8081));
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), [80..=80, 8000..=8080]);
        assert_eq!(PortSet::new(Vec::new()), None);
    }
}
