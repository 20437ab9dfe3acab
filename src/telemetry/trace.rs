//! OTLP span export: settings (from the `OTEL_*` variables and their flags,
//! parsed in `config`) and the tracer built from them.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _};
use opentelemetry_sdk::Resource;

use super::export::{BatchOptions, SpanCounters, SpanQueue};
use super::TelemetryError;

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (collector port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collector port 4318, `/v1/traces`).
    HttpProtobuf,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// `OTEL_TRACES_SAMPLER` (with its argument, a ratio, where it takes one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerChoice {
    fn sampler(self) -> Sampler {
        match self {
            SamplerChoice::AlwaysOn => Sampler::AlwaysOn,
            SamplerChoice::AlwaysOff => Sampler::AlwaysOff,
            SamplerChoice::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            SamplerChoice::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerChoice::ParentBasedAlwaysOff => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
            }
            SamplerChoice::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }

    /// Parses a sampler name and its argument as the specification names
    /// them; the ratio defaults to 1.0.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(text) => match text.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(format!(
                        "`{text}` is not a sampling ratio between 0 and 1 (for `{name}`)"
                    )),
                },
            }
        };
        Ok(match name.trim() {
            "always_on" => SamplerChoice::AlwaysOn,
            "always_off" => SamplerChoice::AlwaysOff,
            "traceidratio" => SamplerChoice::TraceIdRatio(ratio()?),
            "parentbased_always_on" => SamplerChoice::ParentBasedAlwaysOn,
            "parentbased_always_off" => SamplerChoice::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => SamplerChoice::ParentBasedTraceIdRatio(ratio()?),
            other => {
                return Err(format!(
                "`{other}` is not a sampler leash supports (always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
            ))
            }
        })
    }
}

/// Where and how decision spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceOptions {
    /// The full URL spans are sent to (for HTTP, including `/v1/traces`).
    pub endpoint: String,
    pub protocol: Protocol,
    /// Longest one export request may take (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub timeout: Duration,
    pub batch: BatchOptions,
    pub sampler: SamplerChoice,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
}

impl TraceOptions {
    /// Export to `endpoint` with the specification's defaults otherwise.
    pub fn new(endpoint: impl Into<String>, protocol: Protocol) -> Self {
        Self {
            endpoint: endpoint.into(),
            protocol,
            timeout: Duration::from_secs(10),
            batch: BatchOptions::default(),
            sampler: SamplerChoice::ParentBasedAlwaysOn,
            service_name: "leash".to_owned(),
            resource: Vec::new(),
        }
    }
}

/// The tracer decisions use, and the queue behind it.
#[derive(Debug)]
pub(super) struct Traces {
    pub(super) tracer: SdkTracer,
    pub(super) queue: SpanQueue,
    /// Kept so the tracer stays usable; dropping it shuts the queue down.
    _provider: SdkTracerProvider,
}

impl Traces {
    pub(super) fn start(
        options: &TraceOptions,
        counters: Arc<SpanCounters>,
    ) -> Result<Self, TelemetryError> {
        let failed = |problem: String| TelemetryError::Exporter {
            endpoint: options.endpoint.clone(),
            problem,
        };
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let mut exporter = match options.protocol {
            Protocol::Grpc => builder
                .with_tonic()
                .with_endpoint(options.endpoint.clone())
                .with_timeout(options.timeout)
                .build(),
            Protocol::HttpProtobuf => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(options.endpoint.clone())
                .with_timeout(options.timeout)
                .build(),
        }
        .map_err(|e| failed(e.to_string()))?;

        let mut attributes: Vec<KeyValue> = options
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        if !options.resource.iter().any(|(k, _)| k == "service.version") {
            attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        }
        let resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(attributes)
            .with_service_name(options.service_name.clone())
            .build();
        // The queue owns the exporter, so it gets the resource here rather
        // than through the provider.
        exporter.set_resource(&resource);
        let queue = SpanQueue::start(exporter, options.batch, counters);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue.clone())
            .with_sampler(options.sampler.sampler())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("leash")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Self {
            tracer,
            queue,
            _provider: provider,
        })
    }
}
