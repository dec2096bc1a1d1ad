"""pipeline.detect: pure; change maps to candidate buildings and compounds."""
