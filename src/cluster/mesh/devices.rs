//! The mesh's record of where each device has read its user room to (see
//! [`crate::cluster::devices`]), in a JetStream KV bucket `<prefix>_devices`: one key per user
//! (the hex SHA-256 of the user id, valid whatever the id holds) holding that user's devices as
//! JSON, updated by compare-and-set so two sessions of one user never undo each other. Entries
//! expire a day after the user room's retention (`max_age` of its class). Opened in the background like the token-id bucket;
//! while it is not open, a device connects without its position and `seen` is refused.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;

use super::Inner;
use super::replay::hashed_key;
use crate::clock::wall_ms;
use crate::cluster::BusError;
use crate::cluster::devices::Devices;
use crate::room::RoomName;

/// Pauses between attempts to open the bucket: from the first, doubling to the last.
const OPEN_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// Compare-and-set attempts before giving up (each conflict is another session's update).
const CAS_ATTEMPTS: usize = 5;

pub(super) struct DeviceStore {
    bucket: RwLock<Option<Arc<kv::Store>>>,
}

impl DeviceStore {
    /// Opens the bucket in the background when users' rooms keep history (else there is
    /// nothing to deliver later, and nothing is asked of JetStream).
    pub(super) fn start(inner: &Arc<Inner>) -> Arc<DeviceStore> {
        let store = Arc::new(DeviceStore {
            bucket: RwLock::new(None),
        });
        let history = inner.classes.of(&RoomName::for_user("any"));
        if history.keeps() {
            // A device's entry outlives the messages it could name by a day, so a device away
            // for longer than the retention learns that it missed some (a reset) instead of
            // being taken for a new one.
            let max_age = Duration::from_millis(history.max_age_ms) + Duration::from_secs(86_400);
            tokio::spawn(open_loop(inner.clone(), store.clone(), max_age));
        }
        store
    }

    fn bucket(&self) -> Result<Arc<kv::Store>, BusError> {
        self.bucket
            .read()
            .expect("devices lock poisoned")
            .clone()
            .ok_or_else(|| BusError::Unavailable("the device bucket is not open".into()))
    }

    async fn read(
        &self,
        inner: &Inner,
        user: &str,
    ) -> Result<(Arc<kv::Store>, Devices, Option<u64>), BusError> {
        let bucket = self.bucket()?;
        inner.check_link()?;
        let bound = Duration::from_millis(inner.config.request_timeout_ms);
        let entry = tokio::time::timeout(bound, bucket.entry(hashed_key(user)))
            .await
            .map_err(|_| BusError::Unavailable("the device bucket did not answer".into()))?
            .map_err(|e| BusError::Unavailable(format!("the device bucket: {e}")))?;
        Ok(match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let devices = serde_json::from_slice(&entry.value).unwrap_or_default();
                (bucket, devices, Some(entry.revision))
            }
            Some(entry) => (bucket, Devices::default(), Some(entry.revision)),
            None => (bucket, Devices::default(), None),
        })
    }

    pub(super) async fn position(
        &self,
        inner: &Inner,
        user: &str,
        device: &str,
    ) -> Result<Option<(u64, u64)>, BusError> {
        Ok(self.read(inner, user).await?.1.position(device))
    }

    pub(super) async fn seen(
        &self,
        inner: &Inner,
        user: &str,
        device: &str,
        position: (u64, u64),
    ) -> Result<(), BusError> {
        let bound = Duration::from_millis(inner.config.request_timeout_ms);
        for _ in 0..CAS_ATTEMPTS {
            let (bucket, mut devices, revision) = self.read(inner, user).await?;
            if !devices.seen(device, position, wall_ms()) {
                return Ok(());
            }
            let value = Bytes::from(serde_json::to_vec(&devices).expect("devices serialize"));
            let key = hashed_key(user);
            let written = match revision {
                Some(revision) => tokio::time::timeout(bound, bucket.update(&key, value, revision))
                    .await
                    .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
                None => tokio::time::timeout(bound, bucket.create(&key, value))
                    .await
                    .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            };
            match written {
                Ok(Ok(())) => return Ok(()),
                // Another session of the user wrote meanwhile: read again.
                Ok(Err(_conflict)) => continue,
                Err(_) => {
                    return Err(BusError::Unavailable(
                        "the device bucket did not answer".into(),
                    ));
                }
            }
        }
        Err(BusError::Unavailable(
            "the device bucket kept changing; try again".into(),
        ))
    }
}

async fn open_loop(inner: Arc<Inner>, store: Arc<DeviceStore>, max_age: Duration) {
    let bound = Duration::from_millis(inner.config.request_timeout_ms);
    let js = jetstream::ContextBuilder::new()
        .timeout(bound)
        .build(inner.nats.clone());
    let placement = &inner.config.jetstream_placement;
    let config = kv::Config {
        bucket: format!("{}_devices", inner.prefix),
        description: "roomwire: how far each device of a user has read the user's room".into(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: inner.config.jetstream_replicas,
        placement: (!placement.is_empty()).then(|| stream::Placement {
            cluster: Some(placement.clone()),
            tags: Vec::new(),
        }),
        ..Default::default()
    };
    let mut pause = OPEN_RETRY.0;
    loop {
        if inner.connected() {
            let opened = match tokio::time::timeout(bound, js.get_key_value(&config.bucket)).await {
                Ok(Ok(bucket)) => Ok(bucket),
                _ => match tokio::time::timeout(2 * bound, js.create_key_value(config.clone()))
                    .await
                {
                    Ok(Ok(bucket)) => Ok(bucket),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timed out".to_string()),
                },
            };
            match opened {
                Ok(bucket) => {
                    *store.bucket.write().expect("devices lock poisoned") = Some(Arc::new(bucket));
                    tracing::info!(bucket = %config.bucket, "mesh: device bucket open");
                    return;
                }
                Err(error) => {
                    tracing::warn!(bucket = %config.bucket, %error, retry_in_ms = pause.as_millis() as u64,
                        "mesh: cannot open the device bucket; devices connect without their position");
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(OPEN_RETRY.1);
    }
}
