//! The control socket: JSON lines over a unix stream socket, each line at most
//! [`MAX_MESSAGE_BYTES`]. The agent sends [`ControlRequest`]s (externally tagged:
//! `{"config": {...}}`, `"status"`, `"metrics"`, `"subscribe"`; not internally tagged, which
//! would lose the integer keys of [`Config::identities`]); the filter answers with
//! [`ControlEvent`]s: `status` on connect, `ready` (or `rejected`) per configuration,
//! `metrics` on request, and after `subscribe` every access record.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};

use crate::access::AccessRecord;
use crate::config::Config;
use crate::filter::Filter;

/// Longest line either side accepts (a configuration with many thousand rules fits).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Put this configuration in force; answered `ready` or `rejected`.
    Config(Config),
    /// Answered `status`.
    Status,
    /// Answered `metrics` (`OpenMetrics` text).
    Metrics,
    /// From now on, stream `access` events on this connection.
    Subscribe,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlEvent {
    /// Sent on connect and on `status`: `revision` is `None` until configured.
    Status {
        revision: Option<u64>,
    },
    /// The configuration of this revision is in force.
    Ready {
        revision: u64,
    },
    /// This configuration was refused; the previous one stays in force.
    Rejected {
        revision: u64,
        error: String,
    },
    Metrics {
        text: String,
    },
    Access {
        record: Box<AccessRecord>,
    },
    /// Access records were dropped because this connection read too slowly.
    Lagged {
        dropped: u64,
    },
    /// A line that was not a request (the connection is closed after it when too long).
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    #[error("control message is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control connection closed")]
    Closed,
    #[error("the filter did not understand a request: {0}")]
    Remote(String),
}

/// Read one line (without its newline) of at most `max` bytes; `Ok(None)` at end of stream.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ControlError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(|source| ControlError::Io {
            path: String::new(),
            source,
        })?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            if line.len() + i > max {
                return Err(ControlError::TooLong);
            }
            line.extend_from_slice(&buf[..i]);
            reader.consume(i + 1);
            return Ok(Some(line));
        }
        let n = buf.len();
        if line.len() + n > max {
            return Err(ControlError::TooLong);
        }
        line.extend_from_slice(buf);
        reader.consume(n);
    }
}

/// Serve the control socket until the listener fails.
pub async fn serve_control(filter: Filter, listener: UnixListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let filter = filter.clone();
        tokio::spawn(async move { control_connection(filter, stream).await });
    }
}

async fn control_connection(filter: Filter, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<ControlEvent>(1024);
    let writer = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let mut line = serde_json::to_vec(&ev).expect("events serialize");
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    let _ = tx
        .send(ControlEvent::Status {
            revision: filter.revision(),
        })
        .await;
    let mut reader = BufReader::new(read);
    let mut subscribed = false;
    loop {
        let line = match read_line_bounded(&mut reader, MAX_MESSAGE_BYTES).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                let _ = tx
                    .send(ControlEvent::Error {
                        message: e.to_string(),
                    })
                    .await;
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = match serde_json::from_slice::<ControlRequest>(&line) {
            Err(e) => ControlEvent::Error {
                message: format!("not a control request: {e}"),
            },
            Ok(ControlRequest::Config(config)) => match filter.apply(&config) {
                Ok(revision) => {
                    tracing::info!(revision, endpoints = config.endpoints.len(), "configured");
                    ControlEvent::Ready { revision }
                }
                Err(e) => {
                    tracing::warn!(revision = config.revision, error = %e, "configuration rejected");
                    ControlEvent::Rejected {
                        revision: config.revision,
                        error: e.to_string(),
                    }
                }
            },
            Ok(ControlRequest::Status) => ControlEvent::Status {
                revision: filter.revision(),
            },
            Ok(ControlRequest::Metrics) => ControlEvent::Metrics {
                text: filter.metrics().encode(),
            },
            Ok(ControlRequest::Subscribe) => {
                if !subscribed {
                    subscribed = true;
                    tokio::spawn(forward_access(filter.subscribe(), tx.clone()));
                }
                continue;
            }
        };
        if tx.send(answer).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn forward_access(mut rx: broadcast::Receiver<AccessRecord>, tx: mpsc::Sender<ControlEvent>) {
    loop {
        let ev = match rx.recv().await {
            Ok(record) => ControlEvent::Access {
                record: Box::new(record),
            },
            Err(broadcast::error::RecvError::Lagged(dropped)) => ControlEvent::Lagged { dropped },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// The agent's side of the control socket.
pub struct ControlClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Io {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Ok(ControlClient {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    pub async fn send(&mut self, req: &ControlRequest) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req)?;
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(ControlError::TooLong);
        }
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|source| ControlError::Io {
                path: String::new(),
                source,
            })
    }

    pub async fn next(&mut self) -> Result<ControlEvent, ControlError> {
        let line = read_line_bounded(&mut self.reader, MAX_MESSAGE_BYTES)
            .await?
            .ok_or(ControlError::Closed)?;
        Ok(serde_json::from_slice(&line)?)
    }

    /// Send a configuration and wait for its `ready` (other events in between are skipped);
    /// `Ok(Err(reason))` when it was rejected.
    pub async fn configure(&mut self, config: Config) -> Result<Result<u64, String>, ControlError> {
        let revision = config.revision;
        self.send(&ControlRequest::Config(config)).await?;
        loop {
            match self.next().await? {
                ControlEvent::Ready { revision: r } if r == revision => return Ok(Ok(r)),
                ControlEvent::Rejected { revision: r, error } if r == revision => {
                    return Ok(Err(error));
                }
                ControlEvent::Error { message } => return Err(ControlError::Remote(message)),
                _ => {}
            }
        }
    }
}
