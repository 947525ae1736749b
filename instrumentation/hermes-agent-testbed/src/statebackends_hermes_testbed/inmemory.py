"""SDK tracer, meter and logger providers with in-memory exporters, for the tests that read everything emitted."""

from __future__ import annotations

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class InMemoryProviders:
    """``tracer_provider`` (its spans in ``spans``, after any ``span_processors`` given), ``meter_provider`` (read by
    ``reader``) and ``logger_provider`` (its records in ``logs``)."""

    def __init__(self, *span_processors: SpanProcessor) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        for processor in span_processors:
            self.tracer_provider.add_span_processor(processor)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.logs = InMemoryLogExporter()
        self.logger_provider = LoggerProvider()
        self.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))
