//! How a JSON watch that the gateway closes ends, byte for byte, when the close comes while an
//! event is half sent (kube-apiserver's events can span several frames). The client must get
//! whole events and then the `ERROR` event with the message, or, when the rest of the event never
//! comes, an end soon after the close; never a later event. What kubectl shows for the usual case
//! is in tests/it/locks.rs.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use ztgate::streams::{CloseReason, CloseSlot, GuardedBody};

const FIRST_HALF: &str =
    r#"{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-0""#;
const FIRST_REST: &str = r#","namespace":"team-a"}}}"#;
const SECOND: &str = r#"{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-1","namespace":"team-a"}}}"#;

type Frames =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// An upstream watch body whose frames the test sends one by one.
fn upstream() -> (mpsc::UnboundedSender<Bytes>, StreamBody<Frames>) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(Frame::data(data)), rx))
    });
    (tx, StreamBody::new(Box::pin(frames)))
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {text:?}")))
        .collect()
}

#[tokio::test]
async fn a_watch_closed_mid_event_finishes_that_event_then_sends_the_error_event() {
    let (tx, inner) = upstream();
    let cancel = CancellationToken::new();
    let slot = CloseSlot::default();
    let mut body =
        GuardedBody::new(inner, Box::new(()), Some(cancel.clone())).with_watch_errors(slot.clone());

    tx.send(Bytes::from_static(FIRST_HALF.as_bytes())).unwrap();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, FIRST_HALF.as_bytes());

    // A lock closes the stream while the client holds half an event.
    slot.set_reason(CloseReason::forbidden("access is locked: incident 42"));
    cancel.cancel();
    // The rest of that event arrives in one frame with the start of the next one.
    tx.send(Bytes::from(format!("{FIRST_REST}\n{SECOND}\n")))
        .unwrap();

    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the closed watch ended")
        .unwrap()
        .to_bytes();
    let text = format!("{FIRST_HALF}{}", String::from_utf8_lossy(&rest));
    let events = lines(&text);
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "web-0");
    assert_eq!(events[1]["type"], "ERROR", "{text}");
    assert_eq!(events[1]["object"]["kind"], "Status");
    assert_eq!(events[1]["object"]["code"], 403);
    assert_eq!(events[1]["object"]["reason"], "Forbidden");
    assert_eq!(
        events[1]["object"]["message"],
        "access is locked: incident 42"
    );
    assert!(!text.contains("web-1"), "an event after the close: {text}");
}

#[tokio::test]
async fn a_watch_closed_mid_event_whose_rest_never_comes_still_ends() {
    let (tx, inner) = upstream();
    let cancel = CancellationToken::new();
    let slot = CloseSlot::default();
    let mut body =
        GuardedBody::new(inner, Box::new(()), Some(cancel.clone())).with_watch_errors(slot.clone());

    tx.send(Bytes::from_static(FIRST_HALF.as_bytes())).unwrap();
    body.frame().await.unwrap().unwrap();
    slot.set_reason(CloseReason::forbidden("access is locked: incident 42"));
    cancel.cancel();

    // The upstream stays open and silent (`tx` lives on): the body ends by itself, without an
    // `ERROR` event glued to half an event, which the client could not decode.
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the closed watch ended although its upstream stalled mid-event")
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    drop(tx);
}

#[tokio::test]
async fn a_watch_closed_between_events_sends_the_error_event_at_once() {
    let (tx, inner) = upstream();
    let cancel = CancellationToken::new();
    let slot = CloseSlot::default();
    let mut body =
        GuardedBody::new(inner, Box::new(()), Some(cancel.clone())).with_watch_errors(slot.clone());

    tx.send(Bytes::from(format!("{SECOND}\n"))).unwrap();
    body.frame().await.unwrap().unwrap();
    slot.set_reason(CloseReason::unauthorized("the credential expired"));
    cancel.cancel();
    tx.send(Bytes::from(format!("{SECOND}\n"))).unwrap();

    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the closed watch ended")
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    let events = lines(&text);
    assert_eq!(events.len(), 1, "{text}");
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 401);
    assert_eq!(events[0]["object"]["reason"], "Unauthorized");
}
