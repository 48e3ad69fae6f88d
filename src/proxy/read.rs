//! One read from a socket, for every place that reads one itself (the detectors, the wait for a
//! server's first flight, the tunnel's first read of a burst).
//!
//! tokio learns that a socket is drained only from a read that fails with `EAGAIN`, so a task
//! that reads what arrived and then waits again is woken at once, for a read that only says
//! `EAGAIN`: a system call and a wake-up per message for nothing. A TCP read that returns fewer
//! bytes than asked for has emptied the receive queue, so here the readiness is cleared with it,
//! inside the same readiness check, as tokio's own `poll_read` does: bytes that arrive after the
//! read raise a new readiness event (a newer tick), which this does not clear.
//!
//! One exception, shared with tokio: a read also stops short at TCP's urgent mark (MSG_OOB), with
//! bytes still queued behind it. Those wait for the peer's next bytes or end of stream, or for
//! the idle timeout; none is lost (tunnel tests `bytes_behind_an_urgent_byte_*`). Telling the
//! two apart would cost a system call on every short read, for a TCP feature nothing on this
//! path uses.

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The room a detector or the wait for a server's first flight reserves for each read.
pub const READ_CHUNK: usize = 4096;

/// What one read found.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Read {
    /// End of stream.
    End,
    /// Nothing: the readiness was stale.
    Nothing,
    /// `n` bytes, fewer than asked for: the socket is drained, and its readiness was cleared.
    Last(usize),
    /// `n` bytes, as many as asked for: there may be more.
    Full(usize),
}

/// Reads at most `buf.len()` bytes into `buf`.
pub fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<Read> {
    let asked = buf.len();
    read_with(src, asked, || rustix::io::read(src, &mut *buf))
}

/// Reads at most `max` bytes (at least one) onto the end of `buf`. No more than `max`: a caller's
/// limit on what it holds (a request head's size) is kept to the byte, whatever room the vector
/// happens to have.
pub fn read_some_into(src: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<Read> {
    let (old, asked) = (buf.len(), max.max(1));
    buf.resize(old.saturating_add(asked), 0);
    let read = read_some(src, buf.get_mut(old..).unwrap_or_default());
    let n = match read {
        Ok(Read::Last(n) | Read::Full(n)) => n,
        _ => 0,
    };
    buf.truncate(old.saturating_add(n));
    read
}

fn read_with(src: &TcpStream, asked: usize, read: impl FnOnce() -> rustix::io::Result<usize>) -> io::Result<Read> {
    let mut short = 0;
    let done = src.try_io(Interest::READABLE, || {
        let n = read()?;
        if n > 0 && n < asked {
            // Err(WouldBlock) is how try_io is told to clear the readiness it checked.
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match done {
        Ok(0) => Ok(Read::End),
        Ok(n) => Ok(Read::Full(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(Read::Last(short)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Nothing),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_short_read_clears_readiness_and_new_bytes_raise_it_again() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        #[allow(clippy::disallowed_methods)]
        let mut a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        a.write_all(b"hello").await.unwrap();
        b.readable().await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_some_into(&b, &mut buf, 64).unwrap(), Read::Last(5));
        assert_eq!(buf, b"hello");
        // Cleared: a read now finds no readiness and makes no system call.
        assert_eq!(read_some_into(&b, &mut buf, 64).unwrap(), Read::Nothing);
        a.write_all(b" world").await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), b.readable())
            .await
            .expect("woken by new bytes")
            .unwrap();
        assert_eq!(read_some_into(&b, &mut buf, 64).unwrap(), Read::Last(6));
        let mut exact = [0u8; 3];
        a.write_all(b"abcdef").await.unwrap();
        b.readable().await.unwrap();
        assert_eq!(read_some(&b, &mut exact).unwrap(), Read::Full(3));
        drop(a);
        let mut rest = [0u8; 16];
        b.readable().await.unwrap();
        assert_eq!(read_some(&b, &mut rest).unwrap(), Read::Last(3));
        b.readable().await.unwrap();
        assert_eq!(read_some(&b, &mut rest).unwrap(), Read::End);
    }
}
