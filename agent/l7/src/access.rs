//! What the filter reports: one [`AccessRecord`] per request, as a typed event stream, and
//! counters (by method, status class and verdict) with a latency histogram.

use std::net::SocketAddr;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// What the filter did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, EncodeLabelValue)]
#[serde(rename_all = "kebab-case")]
pub enum L7Verdict {
    /// Allowed and forwarded to the original destination.
    Forwarded,
    /// Denied by policy: answered 403.
    Denied,
    /// Not valid HTTP: answered 400 (431 for oversized headers), never forwarded.
    Malformed,
    /// Allowed, but the original destination could not be reached: answered 502.
    UpstreamError,
}

impl L7Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            L7Verdict::Forwarded => "forwarded",
            L7Verdict::Denied => "denied",
            L7Verdict::Malformed => "malformed",
            L7Verdict::UpstreamError => "upstream-error",
        }
    }
}

/// One request through the filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// Unix time in milliseconds when the request arrived.
    pub time_ms: u64,
    pub source: SocketAddr,
    pub source_identity: u32,
    /// `namespace/name` of the source when it is a local endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_endpoint: Option<String>,
    pub destination: SocketAddr,
    pub destination_identity: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_endpoint: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`.
    pub version: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path: String,
    pub status: u16,
    /// From the request head to the response head.
    pub latency_us: u64,
    pub verdict: L7Verdict,
    /// The rule that allowed the request, or the policies whose rules it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Configuration revision that decided.
    pub revision: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    status_class: String,
    verdict: L7Verdict,
}

/// Counters of requests by method (well-known methods, else `OTHER`), status class and
/// verdict, and a latency histogram, in a Prometheus registry of their own.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_l7");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by method, status class and verdict",
            requests.clone(),
        );
        // 50 µs .. ~1.6 s
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            50e-6, 2.0, 16,
        ));
        registry.register(
            "request_duration_seconds",
            "From request head to response head",
            latency.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "refused_connections",
            "Connections reset because the filter had no configuration yet",
            refused.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            refused,
        }
    }

    pub(crate) fn record(&self, r: &AccessRecord) {
        const KNOWN: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        let method = if KNOWN.contains(&r.method.as_str()) {
            r.method.clone()
        } else {
            "OTHER".to_string()
        };
        self.requests
            .get_or_create(&RequestLabels {
                method,
                status_class: format!("{}xx", r.status / 100),
                verdict: r.verdict,
            })
            .inc();
        self.latency.observe(r.latency_us as f64 / 1e6);
    }

    pub(crate) fn refused(&self) {
        self.refused.inc();
    }

    /// Requests counted with this method, status class (`"4xx"`) and verdict.
    pub fn requests(&self, method: &str, status_class: &str, verdict: L7Verdict) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                status_class: status_class.to_string(),
                verdict,
            })
            .get()
    }

    /// The `OpenMetrics` text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
