//! The agent's unix socket: accepts CLI and CNI connections and answers [`Request`]s from the
//! shared [`Agent`] state. The socket is created with mode 0600 (root only).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use crate::api::{Request, Response};
use crate::daemon::Agent;
use crate::observe::FlowHub;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by an earlier agent that is gone: replace it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is already serving {} (stop it first)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>, hub: Arc<FlowHub>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let hub = hub.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent, hub).await {
                        debug!("api connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("accept on the api socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    stream: UnixStream,
    agent: Arc<Mutex<Agent>>,
    hub: Arc<FlowHub>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut write,
                    &Response::<()>::Error(format!("bad request: {e}")),
                )
                .await?;
                continue;
            }
        };
        match request {
            Request::Observe { follow, last } => {
                // Subscribe before reading the backlog, so no flow falls in between.
                let mut live = hub.subscribe();
                for flow in hub.recent(last.unwrap_or(crate::observe::RECENT_FLOWS)) {
                    send(&mut write, &Response::Ok(flow)).await?;
                }
                if !follow {
                    return Ok(());
                }
                loop {
                    match live.recv().await {
                        Ok(flow) => send(&mut write, &Response::Ok(flow)).await?,
                        Err(RecvError::Lagged(n)) => debug!("observer lagged by {n} flows"),
                        Err(RecvError::Closed) => return Ok(()),
                    }
                }
            }
            other => {
                let answer = {
                    let mut agent = agent.lock().expect("agent lock");
                    agent.answer(other)
                };
                write.write_all(answer.as_bytes()).await?;
                write.write_all(b"\n").await?;
            }
        }
    }
    Ok(())
}

async fn send<T: Serialize>(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response<T>,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(())
}

/// Serialize an answer for the wire.
pub fn encode<T: Serialize>(result: anyhow::Result<T>) -> String {
    let response = match result {
        Ok(value) => Response::Ok(value),
        Err(e) => Response::Error(format!("{e:#}")),
    };
    serde_json::to_string(&response).unwrap_or_else(|e| {
        serde_json::to_string(&Response::<()>::Error(format!("encoding the answer: {e}")))
            .expect("a string always encodes")
    })
}
