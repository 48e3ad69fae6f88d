//! Zero-copy tunnel between two TCP sockets: splice(2) through one pipe per direction, so tunnel
//! bytes never enter user space. Linux only, like SO_ORIGINAL_DST; the caller falls back to the
//! copying tunnel when no pipe can be had.

use std::io;
use std::ops::ControlFlow;
use std::os::fd::OwnedFd;

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::meter::Flow;
use super::Halted;

/// A pipe used as the in-kernel buffer of one direction.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A bigger pipe means fewer system calls; the default (64 KiB) is fine if refused.
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Self { read, write, capacity })
    }
}

/// Moves bytes from `src` to `dst` until `src` reaches end of stream, then shuts down `dst`'s
/// write half (half-close). The pipe is always drained before the next read, so a `WouldBlock`
/// on the read side can only mean the socket is empty.
pub async fn splice_one_way(src: &TcpStream, dst: &TcpStream, pipe: &Pipe, flow: &Flow) -> Result<(), Halted> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        src.readable().await?;
        let read = src.try_io(Interest::READABLE, || Ok(splice(src, None, &pipe.write, None, pipe.capacity, flags)?));
        let n = match read {
            Ok(0) => return Ok(SockRef::from(dst).shutdown(std::net::Shutdown::Write)?),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || Ok(splice(&pipe.read, None, dst, None, left, flags)?)) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => left = left.saturating_sub(m),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

const PIPE_SIZE: usize = 1024 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
