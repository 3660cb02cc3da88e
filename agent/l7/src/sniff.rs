//! What hyper accepts but weft refuses: a request with both `Content-Length` and
//! `Transfer-Encoding`. hyper follows RFC 9112 §6.3 (the chunked framing wins, the length is
//! dropped before the service sees the headers), so the service cannot tell; this reader
//! watches the HTTP/1 byte stream on its way into hyper, follows the framing of each request
//! (head, length or chunked body) and flags the requests that carried both. Anything it
//! cannot follow (HTTP/2, an upgrade, a head hyper will reject) turns it off: hyper's own
//! checks still apply.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Requests of one connection that carried both framings, by their index (0-based).
#[derive(Debug, Default)]
pub(crate) struct Flags {
    /// Index of the first such request, `u64::MAX` while none.
    first_conflict: AtomicU64,
}

impl Flags {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Flags {
            first_conflict: AtomicU64::new(u64::MAX),
        })
    }

    pub(crate) fn conflicting(&self, index: u64) -> bool {
        self.first_conflict.load(Ordering::Acquire) == index
    }
}

enum State {
    Head(Vec<u8>),
    Body(u64),
    /// Chunked body: the current line (size line or trailer line) being read.
    ChunkLine(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    Off,
}

pub(crate) struct Sniff<T> {
    inner: T,
    state: State,
    requests: u64,
    max_head: usize,
    flags: Arc<Flags>,
}

impl<T> Sniff<T> {
    pub(crate) fn new(inner: T, max_head: usize, flags: Arc<Flags>) -> Self {
        Sniff {
            inner,
            state: State::Head(Vec::new()),
            requests: 0,
            max_head,
            flags,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    if buf.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2).
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        if data.starts_with(b"PRI ") {
                            self.state = State::Off;
                            return;
                        }
                    }
                    let old = buf.len();
                    buf.extend_from_slice(data);
                    let from = old.saturating_sub(3);
                    let Some(end) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let end = from + end + 4;
                    let rest_from = end - old;
                    let head = std::mem::take(buf);
                    self.state = self.after_head(&head[..end]);
                    data = &data[rest_from.min(data.len())..];
                }
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[usize::try_from(take).unwrap_or(data.len())..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkLine(line) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > 4096 {
                            self.state = State::Off;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    let text = String::from_utf8_lossy(line);
                    let size = text
                        .trim_end_matches('\r')
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim();
                    self.state = match u64::from_str_radix(size, 16) {
                        Ok(0) => State::Trailers(Vec::new()),
                        Ok(n) => State::ChunkData(n),
                        Err(_) => State::Off,
                    };
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[usize::try_from(take).unwrap_or(data.len())..];
                    if *n == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let take = usize::from(*left).min(data.len());
                    *left -= take as u8;
                    data = &data[take..];
                    if *left == 0 {
                        self.state = State::ChunkLine(Vec::new());
                    }
                }
                State::Trailers(line) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let empty =
                        line.iter().all(|b| *b == b'\r') && data[..i].iter().all(|b| *b == b'\r');
                    data = &data[i + 1..];
                    self.state = if empty {
                        State::Head(Vec::new())
                    } else {
                        State::Trailers(Vec::new())
                    };
                }
            }
        }
    }

    /// The state after a complete request head.
    fn after_head(&mut self, head: &[u8]) -> State {
        let index = self.requests;
        self.requests += 1;
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return State::Off; // hyper rejects it (or sees more than we can follow)
        }
        if req.method == Some("CONNECT") {
            return State::Off;
        }
        let mut te = None;
        let mut cl = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                cl = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                return State::Off;
            }
        }
        match (te, cl) {
            (Some(_), Some(_)) => {
                let _ = self.flags.first_conflict.compare_exchange(
                    u64::MAX,
                    index,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                // The answer is a 400 that closes the connection: nothing more to follow.
                State::Off
            }
            (Some(te), None) => {
                let chunked = String::from_utf8_lossy(te)
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                if chunked {
                    State::ChunkLine(Vec::new())
                } else {
                    State::Off
                }
            }
            (None, Some(cl)) => match std::str::from_utf8(cl)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => State::Head(Vec::new()),
                Some(n) => State::Body(n),
                None => State::Off,
            },
            (None, None) => State::Head(Vec::new()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if res.is_ready() && !matches!(this.state, State::Off) {
            this.feed(&buf.filled()[before..]);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (u64, u64) {
        let flags = Flags::new();
        let mut s = Sniff::new((), 65536, flags.clone());
        for c in chunks {
            s.feed(c);
        }
        (s.requests, flags.first_conflict.load(Ordering::Acquire))
    }

    #[test]
    fn follows_lengths_and_chunks_across_reads() {
        let a = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let b = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let c = b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        let all = [&a[..], &b[..], &c[..]].concat();
        assert_eq!(run(&[&all]), (3, u64::MAX));
        let pieces: Vec<&[u8]> = all.chunks(3).collect();
        assert_eq!(run(&pieces), (3, u64::MAX), "byte by byte-ish");
    }

    #[test]
    fn flags_the_request_with_both_framings() {
        let ok = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let bad = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(run(&[&[&ok[..], &bad[..]].concat()]).1, 1);
    }

    #[test]
    fn turns_off_for_http2() {
        assert_eq!(run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), (0, u64::MAX));
    }
}
