//! Zero-copy tunnel between two TCP sockets: splice(2) through a pipe, so bulk bytes never enter
//! user space. Linux only, like SO_ORIGINAL_DST.
//!
//! A direction holds nothing while its socket is quiet. When bytes arrive, the first read goes
//! through a scratch buffer of the thread's (`copy_once`): most bursts (a TLS handshake flight,
//! a request, a response) fit in it, and a read that comes back short has drained the socket, so
//! the burst costs one `read` and one `write`. A read that fills the buffer starts a bulk burst:
//! a pipe is taken from the pool for it and given back, empty, when a read would block; when the
//! pool has none to give, the burst goes on through the same scratch buffer, a read at a time.
//! After a bulk burst the next one goes straight to a pipe, until a burst turns out small again.

use std::cell::RefCell;
use std::io;
use std::ops::ControlFlow;

use rustix::pipe::{splice, SpliceFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::meter::Flow;
use super::pipes::{Lease, Pipes};
use super::Halted;
use crate::proxy::read::{read_some, Read};

/// Moves bytes from `src` to `dst` until `src` reaches end of stream, then shuts down `dst`'s
/// write half (half-close).
pub async fn splice_one_way(src: &TcpStream, dst: &TcpStream, pipes: &Pipes, flow: &Flow) -> Result<(), Halted> {
    // Whether the last burst was bulk (it filled the scratch buffer): the next one then goes
    // straight to a pipe, so that a long transfer is not copied a scratch buffer at a time.
    let mut bulk = false;
    // Whether to read at once, without waiting for readiness: after a splice that moved nothing.
    let mut read_now = false;
    loop {
        if !std::mem::take(&mut read_now) {
            src.readable().await?;
        }
        let first = !bulk;
        if first {
            let (read, rest) = copy_once(src, dst, flow)?;
            if !rest.is_empty() {
                // `dst` did not take it all at once: rare, so the wait is boxed (see below).
                Box::pin(write_all(dst, &rest, flow)).await?;
            }
            match read {
                Read::Full(_) => {}
                Read::End => return Ok(shutdown(dst)?),
                Read::Nothing | Read::Last(_) => continue,
            }
        }
        // A bulk burst's state is boxed: allocated while bytes flow, so that the future every
        // idle tunnel holds is only as big as its wait for bytes (256 bytes a direction, not
        // 400; the tunnel task 1,528 bytes, not 1,816).
        let (burst, moved) = match pipes.take() {
            Some(lease) => Box::pin(splice_burst(src, dst, &lease, flow)).await?,
            None => Box::pin(copy_burst(src, dst, flow)).await?,
        };
        match burst {
            Burst::End => return Ok(shutdown(dst)?),
            // A burst that filled the scratch buffer was bulk, whatever the pipe moved after it.
            Burst::Drained => bulk = first || moved >= FIRST_READ,
            // splice(2) stops at TCP's urgent mark (MSG_OOB), and answers 0 there once the
            // peer's FIN is in, or EAGAIN before: taken at its word, bytes behind the mark would
            // be lost, or stranded for good. A read steps over the mark, so the next burst
            // starts with one, at once: it finds bytes, the end of stream, or nothing (a stale
            // readiness, its only cost).
            Burst::Stuck => (bulk, read_now) = (false, true),
        }
    }
}

/// Shuts down the write half: the end of stream passed on (half-close).
fn shutdown(dst: &TcpStream) -> io::Result<()> {
    SockRef::from(dst).shutdown(std::net::Shutdown::Write)
}

/// How a burst ended without an error.
enum Burst {
    /// The source has nothing more to read for now.
    Drained,
    /// The source reached end of stream.
    End,
    /// A splice found nothing: at the end of stream, or at the urgent mark (0), or at once with a
    /// stale readiness or the urgent mark (EAGAIN), which only a read tells apart
    /// (`splice_one_way`).
    Stuck,
}

thread_local! {
    /// Every copied read on this thread (a burst's first, and those of a burst that found no
    /// pipe) lands here and is written on before the task yields, so that a tunnel holds no
    /// buffer between bursts.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; FIRST_READ]);
}

/// Reads once into the thread's scratch buffer and writes the bytes on. What `dst` does not take
/// at once is copied out of the scratch buffer and returned, for the caller to write when `dst`
/// can take it.
fn copy_once(src: &TcpStream, dst: &TcpStream, flow: &Flow) -> Result<(Read, Vec<u8>), Halted> {
    SCRATCH.with_borrow_mut(|scratch| {
        let len = scratch.len().min(flow.allowance());
        let buf = scratch.get_mut(..len).unwrap_or_default();
        let read = read_some(src, buf)?;
        let n = match read {
            Read::End | Read::Nothing => return Ok((read, Vec::new())),
            Read::Last(n) | Read::Full(n) => n,
        };
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        let chunk = buf.get(..n).unwrap_or_default();
        let written = match dst.try_write(chunk) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        Ok((read, chunk.get(written..).unwrap_or_default().to_vec()))
    })
}

/// Writes all of `chunk` to `dst`, waiting for it to take each part.
async fn write_all(dst: &TcpStream, mut chunk: &[u8], flow: &Flow) -> Result<(), Halted> {
    while !chunk.is_empty() {
        dst.writable().await?;
        match dst.try_write(chunk) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(m) => {
                flow.wrote();
                chunk = chunk.get(m..).unwrap_or_default();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Splices while `src` has bytes, and says how many it moved. The pipe is always emptied into
/// `dst` before the next read, so a `WouldBlock` on the read side means the socket is drained and
/// the pipe empty. (A short splice proves nothing here: it also stops when the pipe runs out of
/// slots.)
async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    lease: &Lease<'_>,
    flow: &Flow,
) -> Result<(Burst, usize), Halted> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let pipe = lease.pipe();
    let (capacity, pipe_in, pipe_out) = (pipe.capacity, &pipe.write, &pipe.read);
    let mut moved = 0usize;
    loop {
        let len = capacity.min(flow.allowance());
        let n = match src.try_io(Interest::READABLE, || Ok(splice(src, None, pipe_in, None, len, flags)?)) {
            Ok(0) => return Ok((Burst::Stuck, moved)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && moved == 0 => return Ok((Burst::Stuck, 0)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Burst::Drained, moved)),
            Err(e) => return Err(e.into()),
        };
        moved = moved.saturating_add(n);
        lease.set_held(n);
        if let ControlFlow::Break(cut) = flow.pass(n) {
            return Err(Halted::Cut(cut));
        }
        while lease.held() > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || Ok(splice(pipe_out, None, dst, None, lease.held(), flags)?)) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => {
                    lease.set_held(lease.held().saturating_sub(m));
                    flow.wrote();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Copies while `src` has bytes, a scratch buffer at a time (`copy_once`), and says how many it
/// moved: the burst of a tunnel that found no pipe free.
async fn copy_burst(src: &TcpStream, dst: &TcpStream, flow: &Flow) -> Result<(Burst, usize), Halted> {
    let mut moved = 0usize;
    loop {
        let (read, rest) = copy_once(src, dst, flow)?;
        write_all(dst, &rest, flow).await?;
        match read {
            Read::End => return Ok((Burst::End, moved)),
            Read::Nothing => return Ok((Burst::Drained, moved)),
            Read::Last(n) => return Ok((Burst::Drained, moved.saturating_add(n))),
            Read::Full(n) => moved = moved.saturating_add(n),
        }
    }
}

/// The scratch buffer of a burst's first read (and of every read of a burst with no pipe): a TLS
/// record fits, and so does most of a handshake flight or a small request or response.
const FIRST_READ: usize = 16 * 1024;
