"""The audit trail: AuditEvent, the recorder, and the live activity feed."""
