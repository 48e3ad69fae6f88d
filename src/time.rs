//! How times are written wherever the proxy shows one: RFC 3339, UTC, in milliseconds
//! (`2025-10-20T08:15:30.123Z`), in audit lines, `/policy` and `/denied` alike.

use std::time::SystemTime;

use serde::Serializer;

/// Serializes a time as RFC 3339; use with `#[serde(serialize_with = "crate::time::rfc3339")]`.
pub fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn utc_with_milliseconds() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_760_948_130_123);
        let mut out = Vec::new();
        super::rfc3339(&t, &mut serde_json::Serializer::new(&mut out)).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "\"2025-10-20T08:15:30.123Z\"");
    }
}
