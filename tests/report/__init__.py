"""Tests for pipeline.report."""
