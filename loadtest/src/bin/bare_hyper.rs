//! The baseline for HTTP comparisons: a bare hyper 1.x server that reads
//! the request body and answers 204, with no auth, parsing or storage.
//! HTTP/1.1, and HTTP/2 with prior knowledge (h2c) on the same port
//! (hyper-util's auto builder). `bare_hyper 127.0.0.1:0` prints
//! `listening http ADDR` like Sluice.

use std::convert::Infallible;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

async fn handle(req: Request<hyper::body::Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
    // Read the whole body, as a real endpoint must before answering.
    let _ = req.into_body().collect().await;
    let mut r = Response::new(Empty::new());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening http {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
        }
    })
}
