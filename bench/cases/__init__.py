"""The benchmark's cases, numbered as in issue 7; each returns table rows measured against its baselines."""
