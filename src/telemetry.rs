//! OpenTelemetry traces (`[telemetry]`): the node's tracer, the spans it records, and the trace
//! context that travels with a publish through the mesh.
//!
//! A trace starts where a client's request arrives (`session.connect`, `room.join`,
//! `room.publish`, or the HTTP API's publish, which continues a `traceparent` the caller sent).
//! A publish's context then travels with its [`crate::room::Publication`]: in the W3C
//! `traceparent` / `tracestate` NATS headers of the request that forwards it to the room's owner
//! (`mesh.forward` → `room.sequence`), and in the headers of the message the owner publishes to
//! the room's subject (`room.sequence` → one `room.deliver` on every node with members). So one
//! publish through a non-owner node is one trace across the nodes.
//!
//! Off (no `telemetry.otlp_endpoint`), [`Telemetry`] holds nothing: every span is an empty
//! [`Span`] and every [`Trace`] an empty option, so the hot paths pay one pointer check, no
//! allocation, and no header is added to any NATS message.

use std::fmt::Display;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, Status, TraceContextExt, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::TelemetryConfig;

pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;

/// Attribute names of roomwire's spans (OpenTelemetry's own where one fits).
pub mod attr {
    pub const ROOM: &str = "roomwire.room";
    pub const EPOCH: &str = "roomwire.epoch";
    pub const SEQ: &str = "roomwire.seq";
    /// A retried publish answered from the owner's dedupe memory (not delivered again).
    pub const DUPLICATE: &str = "roomwire.duplicate";
    /// Stored in JetStream before it went out.
    pub const DURABLE: &str = "roomwire.durable";
    /// Sessions on this node the delivery reached.
    pub const DELIVERIES: &str = "roomwire.deliveries";
    /// The room's owner a forward went to.
    pub const OWNER: &str = "roomwire.owner";
    /// Publishes one forward request carried.
    pub const PUBLISHES: &str = "roomwire.publishes";
    pub const SESSION: &str = "roomwire.session";
    pub const TRANSPORT: &str = "roomwire.transport";
    pub const CLIENT_MSG_ID: &str = "roomwire.client_msg_id";
    pub const USER: &str = "enduser.id";
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const PAYLOAD_BYTES: &str = "messaging.message.body.size";
}

/// The position attributes of a sequenced message.
pub fn position(epoch: u64, seq: u64, duplicate: bool) -> [KeyValue; 3] {
    [
        KeyValue::new(attr::EPOCH, epoch as i64),
        KeyValue::new(attr::SEQ, seq as i64),
        KeyValue::new(attr::DUPLICATE, duplicate),
    ]
}

/// The node's tracer, or nothing when telemetry is off.
#[derive(Default)]
pub struct Telemetry {
    on: Option<Box<Exporting>>,
}

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Telemetry {
    /// Telemetry off: no span is recorded, no context travels.
    pub fn off() -> Telemetry {
        Telemetry::default()
    }

    /// The tracer `config` asks for: off without an endpoint; otherwise spans of this node
    /// (`service.instance.id` = `node_id`) are batched on a thread of the exporter's own and
    /// POSTed to the collector, dropped when more than `max_queue_spans` wait.
    pub fn start(config: &TelemetryConfig, node_id: &str, region: &str) -> anyhow::Result<Self> {
        if !config.enabled() {
            return Ok(Telemetry::off());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.traces_url())
            .with_timeout(Duration::from_millis(config.export_timeout_ms))
            .build()?;
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(config.batch_delay_ms))
            .with_max_queue_size(config.max_queue_spans)
            .build();
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", node_id.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("roomwire.region", region.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batches)
                    .build(),
            )
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("roomwire");
        tracing::info!(endpoint = %config.traces_url(), ratio = config.sample_ratio, "exporting OpenTelemetry traces");
        Ok(Telemetry {
            on: Some(Box::new(Exporting { provider, tracer })),
        })
    }

    /// Whether spans are recorded. Callers check this before building anything for a span.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// A span named `name`, child of `parent` (a new trace when `parent` is empty); its
    /// attributes are built only when telemetry is on.
    pub fn span<I>(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Trace,
        attributes: impl FnOnce() -> I,
    ) -> Span
    where
        I: IntoIterator<Item = KeyValue>,
    {
        self.span_linked(name, kind, parent, &[], attributes)
    }

    /// [`Telemetry::span`] with links to other traces' spans (work done for several at once).
    pub fn span_linked<I>(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Trace,
        links: &[&Trace],
        attributes: impl FnOnce() -> I,
    ) -> Span
    where
        I: IntoIterator<Item = KeyValue>,
    {
        let Some(on) = &self.on else {
            return Span::default();
        };
        let links: Vec<Link> = links
            .iter()
            .filter_map(|t| t.0.as_deref())
            .map(|context| Link::with_context(context.clone()))
            .collect();
        let mut builder = SpanBuilder::from_name(name)
            .with_kind(kind)
            .with_attributes(attributes());
        if !links.is_empty() {
            builder = builder.with_links(links);
        }
        let parent = match parent.0.as_deref() {
            Some(context) => Context::new().with_remote_span_context(context.clone()),
            None => Context::new(),
        };
        Span(Some(Box::new(
            builder.start_with_context(&on.tracer, &parent),
        )))
    }

    /// Exports what is left and stops the exporter's thread (blocks: call it off the runtime's
    /// workers, e.g. in `spawn_blocking`).
    pub fn shutdown(&self) {
        if let Some(on) = &self.on
            && let Err(error) = on.provider.shutdown()
        {
            tracing::warn!(%error, "telemetry: the last spans were not exported");
        }
    }
}

/// A span being recorded; nothing when telemetry is off. It ends when dropped.
#[derive(Default)]
pub struct Span(Option<Box<opentelemetry_sdk::trace::Span>>);

impl Span {
    /// Where this span's children belong.
    pub fn trace(&self) -> Trace {
        Trace(
            self.0
                .as_ref()
                .map(|span| Box::new(span.span_context().clone())),
        )
    }

    /// Adds attributes (built only when the span exists).
    pub fn record<I>(&mut self, attributes: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = KeyValue>,
    {
        if let Some(span) = &mut self.0 {
            span.set_attributes(attributes());
        }
    }

    /// Marks the span failed, with why.
    pub fn fail(&mut self, error: &dyn Display) {
        if let Some(span) = &mut self.0 {
            span.set_status(Status::error(error.to_string()));
        }
    }
}

/// Where a piece of work belongs in a trace: its parent span's context, carried with the work
/// (a publication on its way to the owner, a room message on its way to the members). Empty,
/// without allocating, when telemetry is off or the work is not traced.
#[derive(Debug, Clone, Default)]
pub struct Trace(Option<Box<SpanContext>>);

/// W3C Trace Context header names (lower case, as the propagator writes them).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

impl Trace {
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the context came from another node (or an HTTP caller).
    pub fn is_remote(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.is_remote())
    }

    /// The trace id as 32 hex digits, when there is one (for logs and tests).
    pub fn trace_id(&self) -> Option<String> {
        self.0.as_ref().map(|c| c.trace_id().to_string())
    }

    fn inject(&self, injector: &mut dyn Injector) {
        if let Some(context) = &self.0 {
            let cx = Context::new().with_remote_span_context((**context).clone());
            TraceContextPropagator::new().inject_context(&cx, injector);
        }
    }

    fn extract(extractor: &dyn Extractor) -> Trace {
        let cx = TraceContextPropagator::new().extract(extractor);
        let context = cx.span().span_context().clone();
        Trace(context.is_valid().then(|| Box::new(context)))
    }

    /// NATS headers carrying this context (`traceparent`, `tracestate`); `None` when empty.
    pub fn nats_headers(&self) -> Option<async_nats::HeaderMap> {
        self.0.as_ref()?;
        let mut headers = NatsHeaders(async_nats::HeaderMap::new());
        self.inject(&mut headers);
        Some(headers.0)
    }

    /// The context NATS headers carry, if any.
    pub fn from_nats(headers: Option<&async_nats::HeaderMap>) -> Trace {
        match headers {
            Some(headers) if headers.get(TRACEPARENT).is_some() => {
                Trace::extract(&NatsHeadersRead(headers))
            }
            _ => Trace::default(),
        }
    }

    /// The context an HTTP request carries (a backend that traces its own call), if any.
    pub fn from_http(headers: &http::HeaderMap) -> Trace {
        let get = |key: &str| headers.get(key).and_then(|v| v.to_str().ok());
        match get(TRACEPARENT) {
            Some(traceparent) => Trace::from_traceparent(traceparent, get(TRACESTATE)),
            None => Trace::default(),
        }
    }

    /// This context as a W3C `traceparent` value (empty when there is none).
    pub fn traceparent(&self) -> String {
        let mut pair = Pair::default();
        self.inject(&mut pair);
        pair.traceparent.unwrap_or_default()
    }

    /// The context of a W3C `traceparent` value (and `tracestate`); empty when it is not one.
    pub fn from_traceparent(traceparent: &str, tracestate: Option<&str>) -> Trace {
        if traceparent.is_empty() {
            return Trace::default();
        }
        Trace::extract(&Pair {
            traceparent: Some(traceparent.to_string()),
            tracestate: tracestate.map(str::to_string),
        })
    }
}

/// Trace context in NATS headers; an empty `tracestate` is left out.
struct NatsHeaders(async_nats::HeaderMap);

impl Injector for NatsHeaders {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.insert(key, value);
        }
    }
}

/// Trace context read from NATS headers.
struct NatsHeadersRead<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeadersRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The two W3C values, outside any header map.
#[derive(Default)]
struct Pair {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Pair {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

impl Extractor for Pair {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn off_records_nothing_and_carries_nothing() {
        let telemetry = Telemetry::off();
        assert!(!telemetry.is_on());
        let mut span = telemetry.span("room.publish", SpanKind::Server, &Trace::default(), || {
            [KeyValue::new("roomwire.room", "lobby")]
        });
        span.record(|| -> Vec<KeyValue> { panic!("attributes are not built when off") });
        span.fail(&"refused");
        let trace = span.trace();
        assert!(!trace.is_some());
        assert!(trace.nats_headers().is_none());
        assert_eq!(trace.traceparent(), "");
    }

    #[test]
    fn a_context_crosses_nats_headers_and_a_traceparent_string() {
        let trace = Trace::from_traceparent(PARENT, Some("vendor=x"));
        assert_eq!(
            trace.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let headers = trace.nats_headers().expect("headers");
        assert_eq!(headers.get(TRACEPARENT).unwrap().as_str(), PARENT);
        assert_eq!(headers.get(TRACESTATE).unwrap().as_str(), "vendor=x");
        let back = Trace::from_nats(Some(&headers));
        assert_eq!(back.traceparent(), PARENT);
        assert!(!Trace::from_nats(None).is_some());
        assert!(!Trace::from_nats(Some(&async_nats::HeaderMap::new())).is_some());
        assert!(!Trace::from_traceparent("00-garbage", None).is_some());
        let mut http = http::HeaderMap::new();
        http.insert(TRACEPARENT, PARENT.parse().unwrap());
        assert_eq!(Trace::from_http(&http).traceparent(), PARENT);
    }

    #[test]
    fn an_empty_tracestate_adds_no_header() {
        let trace = Trace::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        );
        let headers = trace.nats_headers().expect("headers");
        assert!(headers.get(TRACESTATE).is_none());
        // Not sampled travels too: the next node follows the decision.
        assert!(headers.get(TRACEPARENT).unwrap().as_str().ends_with("-00"));
    }
}
