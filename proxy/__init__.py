"""The async streaming proxy to upstream APIs."""
