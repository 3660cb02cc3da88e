//! The blocking client of the agent's socket, used by the CLI, the CNI plugin and the L7
//! filter. One request, one answer; `observe --follow` reads a stream of answers.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::{ApiError, Request, Response};

/// How long a call waits for its answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (the agent is not running on this node).
    #[error("cannot reach the weft agent at {} (is it running on this node?): {source}", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No answer within the read timeout (the agent is stuck or starved of CPU).
    #[error("the weft agent did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The connection broke mid-call.
    #[error("talking to the weft agent: {0}")]
    Io(#[from] io::Error),
    /// The agent closed the connection without an answer.
    #[error("the agent closed the connection without answering")]
    Closed,
    /// The answer is not what the protocol says.
    #[error("malformed answer from the agent: {0}")]
    Malformed(String),
    /// The agent answered with an error.
    #[error("{0}")]
    Refused(#[from] ApiError),
}

/// A blocking connection to an agent's socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Option<Duration>,
}

impl Client {
    /// Connect, with [`DEFAULT_TIMEOUT`] for every read.
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] when nothing listens at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Unreachable {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            timeout: Some(DEFAULT_TIMEOUT),
        })
    }

    /// Change how long reads wait (`None`: forever, for `observe --follow`).
    ///
    /// # Errors
    /// When the socket refuses the option.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Send one request and read one answer.
    ///
    /// # Errors
    /// Any [`ClientError`]; [`ClientError::Refused`] carries the agent's error code.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        self.send(request)?;
        self.read_next::<T>()?.ok_or(ClientError::Closed)
    }

    /// Send one request without reading.
    ///
    /// # Errors
    /// When the socket cannot be written.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// Read the next answer of a stream; `None` at end of stream.
    ///
    /// # Errors
    /// A broken connection, a malformed line, or an error answer.
    pub fn read_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        let mut line = String::new();
        // A read timeout shows as WouldBlock (EAGAIN) on Unix sockets.
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    ClientError::Timeout(self.timeout.unwrap_or_default())
                }
                _ => ClientError::Io(e),
            })?;
        if read == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<Response<T>>(&line)
            .map_err(|e| ClientError::Malformed(format!("{e}: {}", line.trim())))?
        {
            Response::Ok(value) => Ok(Some(value)),
            Response::Error(e) => Err(ClientError::Refused(e)),
        }
    }
}
