//! Opening (or creating) the durable classes' streams, in the background.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{ClassStream, OPEN_RETRY, Store};
use crate::cluster::mesh::Inner;
use crate::room::History;

/// Opens (or creates) every durable class's stream; then waits for an operation to report one
/// gone and starts over. Attempts wait while NATS is disconnected and back off while JetStream
/// fails.
pub(super) async fn open_loop(inner: Arc<Inner>, store: Arc<Store>) {
    let bound = Duration::from_millis(inner.config.request_timeout_ms);
    let mut pause = OPEN_RETRY.0;
    loop {
        if !inner.connected() {
            tokio::time::sleep(pause).await;
            continue;
        }
        let mut failed = None;
        for class in &store.classes {
            let config = stream_config(&inner, class);
            match open(&store.js, config, bound).await {
                Ok(stream) => {
                    let opened = ClassStream {
                        name: stream.cached_info().config.name.clone(),
                        subjects: subjects(&inner, class),
                        stream,
                    };
                    store
                        .streams
                        .write()
                        .expect("store lock poisoned")
                        .insert(class.class.clone(), Arc::new(opened));
                }
                Err(error) => failed = Some((class.class.clone(), error)),
            }
        }
        match failed {
            None => {
                tracing::info!(
                    classes = store.classes.len(),
                    "mesh: durable history streams open"
                );
                pause = OPEN_RETRY.0;
                store.reopen.notified().await;
            }
            Some((class, error)) => {
                tracing::warn!(%class, %error, retry_in_ms = pause.as_millis() as u64,
                    "mesh: cannot open a durable history stream; its rooms are unavailable");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(OPEN_RETRY.1);
            }
        }
    }
}

fn subjects(inner: &Inner, class: &History) -> String {
    format!("{}.history.{}", inner.prefix, class.class)
}

/// The stream of `class` as this node would create it.
fn stream_config(inner: &Inner, class: &History) -> stream::Config {
    let placement = &inner.config.jetstream_placement;
    let max_age = Duration::from_millis(class.max_age_ms);
    stream::Config {
        name: format!("{}_history_{}", inner.prefix, class.class),
        description: Some(format!(
            "roomwire: durable history of the rooms of class {}",
            class.class
        )),
        subjects: vec![format!("{}.>", subjects(inner, class))],
        storage: stream::StorageType::File,
        num_replicas: inner.config.jetstream_replicas,
        placement: (!placement.is_empty()).then(|| stream::Placement {
            cluster: Some(placement.clone()),
            tags: Vec::new(),
        }),
        max_messages_per_subject: i64::try_from(class.max_messages.max(1)).unwrap_or(i64::MAX),
        max_age,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        // Appends carry no message id; the window only has to be valid.
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(1)
        } else {
            max_age.min(Duration::from_secs(1))
        },
        ..Default::default()
    }
}

/// Opens the stream, or creates it; an existing stream gets this node's limits (the operator
/// changed the class).
async fn open(
    js: &jetstream::Context,
    config: stream::Config,
    bound: Duration,
) -> Result<stream::Stream, String> {
    let timed = |what: &str| format!("{what}: timed out");
    match tokio::time::timeout(bound, js.get_stream(&config.name)).await {
        Ok(Ok(mut stream)) => {
            let info = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .config
                .clone();
            if info.max_messages_per_subject != config.max_messages_per_subject
                || info.max_age != config.max_age
            {
                let mut updated = info;
                updated.max_messages_per_subject = config.max_messages_per_subject;
                updated.max_age = config.max_age;
                updated.duplicate_window = config.duplicate_window;
                tokio::time::timeout(bound, js.update_stream(updated))
                    .await
                    .map_err(|_| timed("updating its limits"))?
                    .map_err(|e| format!("updating its limits: {e}"))?;
            }
            Ok(stream)
        }
        Ok(Err(open_error)) => tokio::time::timeout(2 * bound, js.create_stream(config))
            .await
            .map_err(|_| timed("creating it"))?
            .map_err(|e| format!("creating it: {e} (opening it: {open_error})")),
        Err(_) => Err(timed("opening it")),
    }
}
