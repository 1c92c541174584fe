//! The production gRPC servers and clients over turmoil's simulated network: a listener
//! turned into the stream of connections `serve_incoming` takes, and channels that dial
//! through turmoil. Everything else is the production code.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

/// A simulated TCP connection, as tonic's server wants it.
pub struct SimIo(turmoil::net::TcpStream);

impl Connected for SimIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.0.local_addr().ok(),
            remote_addr: self.0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Listens on `port` of the current host and yields its connections.
pub async fn incoming(port: u16) -> io::Result<impl Stream<Item = io::Result<SimIo>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| SimIo(stream));
        Some((next, listener))
    }))
}

/// A lazily connecting channel to `host:port` over the simulated network, with the client
/// defaults. Create it inside the host or client that uses it.
pub fn channel(host: &str, port: u16) -> Channel {
    connect(endpoint(host, port), host, port)
}

/// The endpoint of `host:port`, to configure before `connect`.
pub fn endpoint(host: &str, port: u16) -> Endpoint {
    Endpoint::from_shared(format!("http://{host}:{port}"))
        .unwrap_or_else(|_| Endpoint::from_static("http://invalid"))
        .connect_timeout(std::time::Duration::from_millis(500))
        .timeout(std::time::Duration::from_secs(5))
}

/// A lazily connecting channel through `endpoint` that dials `host:port` over the simulated
/// network.
pub fn connect(endpoint: Endpoint, host: &str, port: u16) -> Channel {
    let target = format!("{host}:{port}");
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let target = target.clone();
        async move {
            let stream = turmoil::net::TcpStream::connect(target.as_str()).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    }))
}
