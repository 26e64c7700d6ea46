//! `[telemetry]`: OpenTelemetry traces, exported over OTLP.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Traces of connects, joins and publishes (publish → sequence → delivery, across the mesh),
/// exported as OTLP/HTTP protobuf to a collector. Off unless `otlp_endpoint` is set: then no span
/// is made, no trace context travels in NATS headers, and no exporter thread runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://127.0.0.1:4318` (an OpenTelemetry
    /// Collector, Jaeger, Tempo): spans are POSTed as protobuf to `<endpoint>/v1/traces`. Plain
    /// `http://` only (a collector beside the node forwards over TLS). Empty: telemetry off.
    pub otlp_endpoint: String,
    /// `service.name` of the node's spans; each node is told apart by `service.instance.id`
    /// (its `node.id`) and `roomwire.region`.
    pub service_name: String,
    /// Share of new traces recorded, 0.0 to 1.0. A trace is started where a client's request
    /// arrives; every node it reaches follows that decision (it travels in the trace context),
    /// so a trace is recorded whole or not at all.
    pub sample_ratio: f64,
    /// Milliseconds between exports: finished spans wait this long at most in the node.
    pub batch_delay_ms: u64,
    /// Finished spans waiting for export at most; when the collector is slow or away, spans
    /// beyond this are dropped (never the node's work).
    pub max_queue_spans: usize,
    /// Milliseconds one export (an HTTP request to the collector) may take.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "roomwire".into(),
            sample_ratio: 1.0,
            batch_delay_ms: 5_000,
            max_queue_spans: 2_048,
            export_timeout_ms: 10_000,
        }
    }
}

impl TelemetryConfig {
    /// Whether spans are made and exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    /// Where spans are POSTed: `<otlp_endpoint>/v1/traces` (given as is when it already ends so).
    pub fn traces_url(&self) -> String {
        let base = self.otlp_endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if !self.enabled() {
            return Ok(());
        }
        match url::Url::parse(&self.otlp_endpoint) {
            Ok(url) if url.scheme() == "http" && url.host().is_some() => {}
            Ok(url) if url.scheme() == "https" => {
                return bad(
                    "telemetry.otlp_endpoint: https is not built in; point it at a collector's plain http:// OTLP port (e.g. a collector beside the node, which forwards over TLS)",
                );
            }
            _ => {
                return bad(
                    "telemetry.otlp_endpoint must be an http:// URL, e.g. http://127.0.0.1:4318",
                );
            }
        }
        if self.service_name.is_empty() {
            return bad("telemetry.service_name must not be empty");
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return bad("telemetry.sample_ratio must be within 0.0..=1.0");
        }
        if self.batch_delay_ms == 0 || self.export_timeout_ms == 0 {
            return bad("telemetry.batch_delay_ms and export_timeout_ms must be positive");
        }
        if self.max_queue_spans == 0 {
            return bad("telemetry.max_queue_spans must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn off_by_default_and_validated_when_on() {
        let config = Config::load(None, Vec::new(), &[]).unwrap();
        assert!(!config.telemetry.enabled());
        let on = Config::load(
            None,
            Vec::new(),
            &[
                r#"telemetry.otlp_endpoint="http://127.0.0.1:4318""#.into(),
                "telemetry.sample_ratio=0.25".into(),
            ],
        )
        .unwrap();
        assert!(on.telemetry.enabled());
        assert_eq!(on.telemetry.traces_url(), "http://127.0.0.1:4318/v1/traces");
        for bad in [
            r#"telemetry.otlp_endpoint="https://collector:4318""#,
            r#"telemetry.otlp_endpoint="collector:4318""#,
        ] {
            let err = Config::load(None, Vec::new(), &[bad.into()]).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
        for bad in [
            "telemetry.sample_ratio=1.5",
            "telemetry.batch_delay_ms=0",
            "telemetry.max_queue_spans=0",
        ] {
            let overrides = [
                r#"telemetry.otlp_endpoint="http://127.0.0.1:4318""#.into(),
                bad.into(),
            ];
            let err = Config::load(None, Vec::new(), &overrides).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_traces_path_is_added_once() {
        let mut config = TelemetryConfig {
            otlp_endpoint: "http://collector:4318/".into(),
            ..TelemetryConfig::default()
        };
        assert_eq!(config.traces_url(), "http://collector:4318/v1/traces");
        config.otlp_endpoint = "http://collector:4318/v1/traces".into();
        assert_eq!(config.traces_url(), "http://collector:4318/v1/traces");
    }
}
