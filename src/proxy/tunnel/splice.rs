//! Zero-copy tunnel between two TCP sockets: splice(2) through a pipe, so tunnel bytes never enter
//! user space. Linux only, like SO_ORIGINAL_DST.
//!
//! A direction holds a pipe only while its socket has bytes: it waits for the socket to be
//! readable holding nothing, takes a pipe from the pool for the burst, and gives it back, empty,
//! when a read would block. When the pool has none to give, the burst is copied through a small
//! buffer that is freed with it.

use std::io;
use std::ops::ControlFlow;

use rustix::pipe::{splice, SpliceFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::meter::Flow;
use super::pipes::{Lease, Pipes};
use super::Halted;

/// Moves bytes from `src` to `dst` until `src` reaches end of stream, then shuts down `dst`'s
/// write half (half-close).
pub async fn splice_one_way(src: &TcpStream, dst: &TcpStream, pipes: &Pipes, flow: &Flow) -> Result<(), Halted> {
    loop {
        src.readable().await?;
        let burst = match pipes.take() {
            Some(lease) => splice_burst(src, dst, &lease, flow).await?,
            None => copy_burst(src, dst, flow).await?,
        };
        if let Burst::End = burst {
            return Ok(SockRef::from(dst).shutdown(std::net::Shutdown::Write)?);
        }
    }
}

/// How a burst ended without an error.
enum Burst {
    /// The source has nothing more to read for now.
    Drained,
    /// The source reached end of stream.
    End,
}

/// Splices while `src` has bytes. The pipe is always emptied into `dst` before the next read, so
/// a `WouldBlock` on the read side means the socket is drained and the pipe empty.
async fn splice_burst(src: &TcpStream, dst: &TcpStream, lease: &Lease<'_>, flow: &Flow) -> Result<Burst, Halted> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let pipe = lease.pipe();
    let (capacity, pipe_in, pipe_out) = (pipe.capacity, &pipe.write, &pipe.read);
    loop {
        let len = capacity.min(flow.allowance());
        let n = match src.try_io(Interest::READABLE, || Ok(splice(src, None, pipe_in, None, len, flags)?)) {
            Ok(0) => return Ok(Burst::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e.into()),
        };
        lease.set_held(n);
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        while lease.held() > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || Ok(splice(pipe_out, None, dst, None, lease.held(), flags)?)) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => lease.set_held(lease.held().saturating_sub(m)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Copies while `src` has bytes, through a buffer that lives as long as the burst.
async fn copy_burst(src: &TcpStream, dst: &TcpStream, flow: &Flow) -> Result<Burst, Halted> {
    let mut buf = vec![0u8; FALLBACK_BUF];
    loop {
        let len = buf.len().min(flow.allowance());
        let n = match src.try_read(buf.get_mut(..len).unwrap_or_default()) {
            Ok(0) => return Ok(Burst::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e.into()),
        };
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        let mut chunk = buf.get(..n).unwrap_or_default();
        while !chunk.is_empty() {
            dst.writable().await?;
            match dst.try_write(chunk) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => chunk = chunk.get(m..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The buffer of a copied burst: small, since it is the fallback when no pipe is free.
const FALLBACK_BUF: usize = 16 * 1024;
