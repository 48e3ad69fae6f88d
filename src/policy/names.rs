//! Host-name matcher: an exact-name map, a suffix map for `*.suffix` patterns walked label by
//! label, and a globset for the rare general glob.
//!
//! The cost of a lookup grows with the number of labels in the name, not the number of rules.

use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustc_hash::FxHashMap;

use super::decision::RuleId;
use super::host::{HostError, HostName};

/// A compiled host pattern.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Pattern {
    /// `ml.azure.com`: this name only.
    Exact(HostName),
    /// `*.data.mcr.microsoft.com`: one or more labels in front of the suffix, never the suffix itself.
    Suffix(HostName),
    /// `automlresources-prod-*.azurefd.net`: `*` and `?` never cross a dot.
    Glob(Box<str>),
}

#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum PatternError {
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("not in normalised form; write it as {0:?}")]
    NotNormalised(String),
    #[error("matches every host; name the hosts instead")]
    MatchAll,
    #[error("a wildcard must not cover a top-level domain")]
    WildcardTld,
    #[error("only `*` and `?` wildcards are supported, and no character classes or alternations")]
    UnsupportedGlob,
}

/// Maps a host name to the rules whose patterns match it.
#[derive(Debug, Default)]
pub struct NameIndex {
    exact: FxHashMap<Box<str>, Vec<RuleId>>,
    suffix: FxHashMap<Box<str>, Vec<RuleId>>,
    globs: Option<GlobSet>,
    glob_rules: Vec<RuleId>,
}

// === impl Pattern ===

impl Pattern {
    /// Parses a pattern that must already be in normalised form (lower-case, no trailing dot):
    /// an operator who writes `ML.azure.com` is told the spelling to use, not silently corrected.
    pub fn parse(input: &str) -> Result<Self, PatternError> {
        if input == "*" || input == "*." || input == "**" {
            return Err(PatternError::MatchAll);
        }
        let normalised = input.strip_suffix('.').unwrap_or(input).to_ascii_lowercase();
        if normalised != input {
            return Err(PatternError::NotNormalised(normalised));
        }
        if let Some(rest) = input.strip_prefix("*.") {
            if !rest.contains(['*', '?']) {
                let suffix = HostName::parse(rest)?;
                if !rest.contains('.') {
                    return Err(PatternError::WildcardTld);
                }
                return Ok(Self::Suffix(suffix));
            }
        }
        if input.contains(['*', '?']) {
            // `**` would cross dots in globset; classes and alternations are not host patterns.
            if input.contains("**") || input.contains(['[', ']', '{', '}', ',', '\\', '!']) {
                return Err(PatternError::UnsupportedGlob);
            }
            let last = input.rsplit('.').next().unwrap_or(input);
            if last.contains(['*', '?']) || !input.contains('.') {
                return Err(PatternError::WildcardTld);
            }
            // The literal skeleton must be a valid name, so the glob cannot match malformed ones.
            HostName::parse(&input.replace(['*', '?'], "x"))?;
            return Ok(Self::Glob(input.into()));
        }
        Ok(Self::Exact(HostName::parse(input)?))
    }

    /// True when the pattern matches `name`. Slow path for tests and the reference matcher.
    pub fn matches(&self, name: &HostName) -> bool {
        NameIndex::build([(self.clone(), RuleId(0))]).is_ok_and(|i| {
            let mut hit = false;
            i.for_each_match(name, |_| hit = true);
            hit
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => n.fmt(f),
            Self::Suffix(n) => write!(f, "*.{n}"),
            Self::Glob(g) => f.write_str(g),
        }
    }
}

// === impl NameIndex ===

impl NameIndex {
    pub fn build(patterns: impl IntoIterator<Item = (Pattern, RuleId)>) -> Result<Self, globset::Error> {
        let mut index = Self::default();
        let mut globs = GlobSetBuilder::new();
        for (pattern, rule) in patterns {
            match pattern {
                Pattern::Exact(n) => push_unique(index.exact.entry(n.as_str().into()).or_default(), rule),
                Pattern::Suffix(n) => push_unique(index.suffix.entry(n.as_str().into()).or_default(), rule),
                Pattern::Glob(g) => {
                    // globset's separator is `/`: spell dots as slashes so `*` never crosses a label.
                    globs.add(GlobBuilder::new(&g.replace('.', "/")).literal_separator(true).build()?);
                    index.glob_rules.push(rule);
                }
            }
        }
        if !index.glob_rules.is_empty() {
            index.globs = Some(globs.build()?);
        }
        Ok(index)
    }

    /// Calls `f` with every rule whose pattern matches `name` (a rule may be reported more than once).
    /// Allocates only when a glob matches.
    pub fn for_each_match(&self, name: &HostName, mut f: impl FnMut(RuleId)) {
        let name = name.as_str();
        if let Some(rules) = self.exact.get(name) {
            rules.iter().copied().for_each(&mut f);
        }
        // A wildcard may cover underscores only where a rule names them literally: never.
        let first_underscore = name.find('_').unwrap_or(usize::MAX);
        if !self.suffix.is_empty() {
            for (dot, _) in name.match_indices('.') {
                if dot > first_underscore {
                    break;
                }
                if let Some(rules) = self.suffix.get(&name[dot + 1..]) {
                    rules.iter().copied().for_each(&mut f);
                }
            }
        }
        if let (Some(globs), usize::MAX) = (&self.globs, first_underscore) {
            let mut buf = [0u8; 253];
            let Some(slot) = buf.get_mut(..name.len()) else {
                return;
            };
            for (out, b) in slot.iter_mut().zip(name.bytes()) {
                *out = if b == b'.' { b'/' } else { b };
            }
            // Only ASCII was written: the conversion cannot fail.
            let Ok(slashed) = std::str::from_utf8(slot) else {
                return;
            };
            if globs.is_match(slashed) {
                for i in globs.matches(slashed) {
                    if let Some(&rule) = self.glob_rules.get(i) {
                        f(rule);
                    }
                }
            }
        }
    }
}

fn push_unique(rules: &mut Vec<RuleId>, rule: RuleId) {
    if rules.last() != Some(&rule) {
        rules.push(rule);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(&HostName::parse(name).unwrap())
    }

    #[test]
    fn suffix_wildcard_needs_at_least_one_label_in_front() {
        let p = "*.westus2.batch.azure.com";
        assert!(matches(p, "a.westus2.batch.azure.com"));
        assert!(matches(p, "a.b.westus2.batch.azure.com"));
        assert!(!matches(p, "westus2.batch.azure.com"));
        assert!(!matches(p, "evilwestus2.batch.azure.com"));
        assert!(!matches(p, "a.westus2.batch.azure.com.evil.com"));
    }

    #[test]
    fn exact_matches_only_itself() {
        assert!(matches("ml.azure.com", "ml.azure.com"));
        assert!(matches("ml.azure.com", "ML.Azure.com."));
        assert!(!matches("ml.azure.com", "x.ml.azure.com"));
        assert!(!matches("ml.azure.com", "ml.azure.com.evil.com"));
    }

    #[test]
    fn glob_star_never_crosses_a_dot() {
        let p = "automlresources-prod-*.azurefd.net";
        assert!(matches(p, "automlresources-prod-d0eaehh7g8andvav.azurefd.net"));
        assert!(!matches(p, "automlresources-prod-x.b02.azurefd.net"));
        assert!(!matches(p, "automlresources-prod-x.azurefd.net.evil.com"));
        assert!(matches("a?c.example.com", "abc.example.com"));
        assert!(!matches("a?c.example.com", "a.c.example.com"));
    }

    #[test]
    fn wildcards_never_cover_an_underscore() {
        assert!(!matches("*.example.com", "_dmarc.example.com"));
        assert!(!matches("*.example.com", "a._x.example.com"));
        assert!(matches("*._x.example.com", "a._x.example.com"));
        assert!(matches("_dmarc.example.com", "_dmarc.example.com"));
        assert!(!matches("x*.example.com", "x_y.example.com"));
    }

    #[test]
    fn refuses_patterns_that_are_too_broad_or_not_normalised() {
        assert_eq!(Pattern::parse("*"), Err(PatternError::MatchAll));
        assert_eq!(Pattern::parse("*.com"), Err(PatternError::WildcardTld));
        assert_eq!(Pattern::parse("example.*"), Err(PatternError::WildcardTld));
        assert_eq!(Pattern::parse("ML.azure.com"), Err(PatternError::NotNormalised("ml.azure.com".into())));
        assert_eq!(Pattern::parse("ml.azure.com."), Err(PatternError::NotNormalised("ml.azure.com".into())));
        assert_eq!(Pattern::parse("{a,b}*.example.com"), Err(PatternError::UnsupportedGlob));
        assert_eq!(Pattern::parse("**.com"), Err(PatternError::UnsupportedGlob));
        assert_eq!(Pattern::parse("a.**.example.com"), Err(PatternError::UnsupportedGlob));
        assert_eq!(Pattern::parse("a..b"), Err(PatternError::Host(HostError::EmptyLabel)));
        assert!(matches!(Pattern::parse("*.co.uk"), Ok(Pattern::Suffix(_))));
    }
}
