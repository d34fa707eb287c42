//! The response body type used across the gateway.
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response (`application/json`).
pub fn json_response(code: http::StatusCode, v: &impl serde::Serialize) -> http::Response<Body> {
    let mut resp = http::Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

pin_project_lite::pin_project! {
    /// A response body that must end by `deadline`: an ordinary (not long-running) response gets
    /// the request timeout over its headers and its body, as kube-apiserver gives its own
    /// handlers, so a response that streams on cannot outlive it. The timer is only set once the
    /// body has to wait.
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        deadline: tokio::time::Instant,
        sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<B> Deadline<B> {
    pub fn new(inner: B, deadline: tokio::time::Instant) -> Deadline<B> {
        Deadline {
            inner,
            deadline,
            sleep: None,
        }
    }
}

/// A request body longer than the limit it was read with.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

/// The error a body ends with when its deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("the response did not finish within the gateway's request timeout")]
pub struct DeadlineExceeded;

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let deadline = *this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineExceeded)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that keeps streaming past the deadline ends with an error at the deadline; one
    /// that finishes in time is untouched.
    /// One frame, then nothing ever again (an upstream that keeps the response open).
    struct Stalls(bool);
    impl http_body::Body for Stalls {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            if std::mem::replace(&mut self.0, true) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"a")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_outlives_its_deadline_ends_with_an_error() {
        let start = tokio::time::Instant::now();
        let deadline = start + std::time::Duration::from_secs(60);
        let mut body = Deadline::new(Stalls(false), deadline);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        // Nothing more arrives: the deadline ends it (paused time advances to it).
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<DeadlineExceeded>(), "{err}");
        assert_eq!(tokio::time::Instant::now(), deadline);

        let ok = Deadline::new(full("done"), tokio::time::Instant::now());
        let bytes = ok.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "done");
    }
}
