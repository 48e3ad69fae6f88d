//! The hash chain of the audit log, and its check.
//!
//! Every line ends in `"prev":"<hex>"`: the SHA-256 of the line written before it, without its
//! newline. A log (and each file the proxy opens or reopens) begins with a `chain_start` line,
//! whose `prev` is the hash of the last line already in the file it opens, or, in a new file after
//! a rotation, of the last line the proxy wrote to the old one; with neither, 64 zeros. So the
//! files of a rotated log, read oldest first, form one chain, and a line deleted, edited or moved
//! breaks the link to the line after it.
//!
//! What the chain cannot show: lines cut from the end of the newest file, or a log rewritten
//! whole by someone who recomputes every hash. It is a check against edits, not a signature.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The SHA-256 of one line, without its newline.
pub type LineHash = [u8; 32];

/// `prev` of a `chain_start` with nothing before it.
pub const GENESIS: LineHash = [0; 32];

pub fn digest(line: &[u8]) -> LineHash {
    Sha256::digest(line).into()
}

/// Lower-case hex, as `prev` carries it.
pub fn hex(hash: &LineHash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in hash {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Checks lines in the order they were written, across files: feed it every line of every file,
/// oldest first. It stops being useful at the first `Err`, which names what is wrong with that
/// line; the line number is the caller's to count.
#[derive(Debug, Default)]
pub struct ChainCheck {
    prev: Option<LineHash>,
    lines: u64,
}

/// Why a line does not continue the chain.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum Broken {
    #[error("not an audit line (a JSON object with \"event\" and a 64-digit hex \"prev\")")]
    NotAuditLine,
    #[error("the log does not begin with a chain_start line: lines before this one are missing")]
    NoChainStart,
    #[error("\"prev\" is not the hash of the line before it: a line was deleted, edited or moved here")]
    Mismatch,
}

/// The fields of a line that the check reads.
#[derive(Deserialize)]
struct Link<'a> {
    event: &'a str,
    prev: &'a str,
}

impl ChainCheck {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next line (without its newline).
    pub fn check(&mut self, line: &[u8]) -> Result<(), Broken> {
        let link: Link<'_> = serde_json::from_slice(line).map_err(|_| Broken::NotAuditLine)?;
        if link.prev.len() != 64 || !link.prev.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Broken::NotAuditLine);
        }
        match &self.prev {
            // What came before the first line given cannot be checked; but a log, and every
            // file of it, begins with a chain_start, so a first line of any other kind means
            // lines before it are gone.
            None if link.event != "chain_start" => return Err(Broken::NoChainStart),
            Some(prev) if link.prev != hex(prev) => return Err(Broken::Mismatch),
            _ => {}
        }
        self.prev = Some(digest(line));
        self.lines += 1;
        Ok(())
    }

    /// Lines checked and found linked so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `n` lines after a chain_start, as the writer makes them.
    fn chain(n: usize) -> Vec<String> {
        let mut prev = GENESIS;
        let mut lines = Vec::new();
        for i in 0..=n {
            let event = if i == 0 { "chain_start" } else { "decision" };
            let line = format!(r#"{{"event":"{event}","id":{i},"prev":"{}"}}"#, hex(&prev));
            prev = digest(line.as_bytes());
            lines.push(line);
        }
        lines
    }

    /// The 1-based number of the first line that does not check, if any.
    fn first_broken(lines: &[String]) -> Option<(usize, Broken)> {
        let mut c = ChainCheck::new();
        lines.iter().enumerate().find_map(|(i, l)| c.check(l.as_bytes()).err().map(|e| (i + 1, e)))
    }

    #[test]
    fn hex_is_lower_case_and_64_digits() {
        assert_eq!(hex(&GENESIS), "0".repeat(64));
        assert_eq!(hex(&digest(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn an_intact_chain_checks_and_each_tampering_is_found_at_its_line() {
        let lines = chain(5);
        assert_eq!(first_broken(&lines), None);

        let mut deleted = lines.clone();
        deleted.remove(3);
        assert_eq!(first_broken(&deleted), Some((4, Broken::Mismatch)), "the line after the gap");

        let mut edited = lines.clone();
        edited[3] = edited[3].replace(r#""id":3"#, r#""id":33"#);
        assert_eq!(first_broken(&edited), Some((5, Broken::Mismatch)), "the line after the edit");

        let mut swapped = lines.clone();
        swapped.swap(2, 3);
        assert_eq!(first_broken(&swapped), Some((3, Broken::Mismatch)));

        assert_eq!(first_broken(&lines[1..]), Some((1, Broken::NoChainStart)), "the head was cut");
        let mut garbage = lines;
        garbage[2] = "not json".into();
        assert_eq!(first_broken(&garbage), Some((3, Broken::NotAuditLine)));
    }
}
